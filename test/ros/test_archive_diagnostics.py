"""/diagnostics' verdict on the frame archive (outputs.archive_fault), from FrameArchive.stats() records."""

from infmllm_ros.ros.outputs import archive_fault

HEALTHY = dict(frames=12, used_bytes=9000, max_bytes=10000, write_errors=0, damaged=0, skipped=0, dropped=4,
               stopped=None)


def test_off_or_healthy_archive_is_no_fault():
    assert archive_fault({}) == ""
    assert archive_fault(HEALTHY) == ""
    assert archive_fault(dict(HEALTHY, skipped=3)) == ""  # frames larger than the whole archive: not a fault


def test_full_disk_stop_and_damaged_pages_are_named():
    full = dict(HEALTHY, write_errors=1, skipped=7, stopped="write failed: [Errno 28] No space left on device")
    msg = archive_fault(full)
    assert msg.startswith("frame archive: stopped (write failed: [Errno 28] No space left on device)")
    assert "1 write error(s)" in msg and msg.endswith("answering continues")
    assert archive_fault(dict(HEALTHY, damaged=2)) == "frame archive: 2 damaged page(s) skipped; answering continues"
    assert "stats failed: OSError" in archive_fault({"stats_error": "OSError: boom"})
