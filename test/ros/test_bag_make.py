"""infmllm-make-bag on real video (vtest.avi from Debian's opencv-doc) and on a folder of images. No ROS traffic."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import replay_support as rs  # noqa: E402

from infmllm_ros.ros import bag, make_bag, media  # noqa: E402

START = make_bag.DEFAULT_START


@pytest.fixture(scope="module")
def vtest():
    return media.vtest_path()


@pytest.fixture(scope="module")
def native_frames(vtest):
    return list(media.iter_frames(vtest, max_frames=24, size=(160, 120)))


def test_vtest_is_real_video(vtest):
    assert vtest.stat().st_size > 8_000_000
    assert media.video_fps(vtest) == pytest.approx(10.0)
    first = next(media.iter_frames(vtest))
    assert first.shape == (576, 768, 3) and first.dtype == np.uint8 and first.std() > 10


def test_video_to_rgb8_bag(tmp_path, native_frames):
    out = rs.make_video_bag(tmp_path / "b", "--resize", "160x120", "--max-frames", "24", "--frame-id", "cam0")
    msgs = rs.by_topic(bag.read_all(out))
    frames, said = msgs["/image"], msgs["/instruction"]
    assert len(frames) == 24 and [m.data for _, m in said] == [
        "What is in front of the robot?", "How many people are walking?", "Describe the scene."]
    for i, (t, m) in enumerate(frames):
        expected_ns = round((START + i / 10) * 1e9)
        assert t == expected_ns and rs.stamp_ns(m) == expected_ns
        assert (m.header.frame_id, m.encoding, m.width, m.height, m.step) == ("cam0", "rgb8", 160, 120, 480)
        assert np.array_equal(m.data.reshape(120, 160, 3), native_frames[i])
    assert [t for t, _ in said] == [round((START + s) * 1e9) for s in (0.55, 1.55, 2.95)]
    # the bag's time order interleaves each instruction after the frames before it
    order = [(c.topic, t) for c, t, _ in bag.iter_messages(bag.open_reader(out))]
    assert order == sorted(order, key=lambda x: x[1])


def test_fps_subsamples_and_sqlite3(tmp_path, native_frames):
    out = rs.make_video_bag(tmp_path / "b", "--resize", "160x120", "--fps", "5", "--max-frames", "10",
                            "--storage", "sqlite3", "--start", "100.25")
    assert list(out.glob("*.db3"))
    frames = rs.by_topic(bag.read_all(out))["/image"]
    assert len(frames) == 10
    for i, (t, m) in enumerate(frames):
        assert rs.stamp_ns(m) == t == round((100.25 + i / 5) * 1e9)
        assert np.array_equal(m.data.reshape(120, 160, 3), native_frames[2 * i])  # every other 10 fps frame


def test_compressed_jpeg(tmp_path, native_frames):
    import io

    from PIL import Image

    out = rs.make_video_bag(tmp_path / "b", "--resize", "160x120", "--max-frames", "5", "--compressed")
    conns = {c.topic: c.msgtype for c in bag.open_reader(out).connections}
    assert conns["/image"] == "sensor_msgs/msg/CompressedImage"
    frames = rs.by_topic(bag.read_all(out))["/image"]
    for i, (_, m) in enumerate(frames):
        assert m.format == "jpeg" and bytes(m.data[:2]) == b"\xff\xd8"
        rgb = np.asarray(Image.open(io.BytesIO(bytes(m.data))).convert("RGB")).astype(int)
        assert rgb.shape == (120, 160, 3) and np.abs(rgb - native_frames[i]).mean() < 6


def test_image_folder_and_inline_say(tmp_path, native_frames):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(4):
        Image.fromarray(native_frames[i]).save(folder / f"f{i:03d}.png")
    (folder / "notes.txt").write_text("not an image")
    proc = rs.run("infmllm-make-bag", folder, tmp_path / "b", "--fps", "2", "--say", "0.75:go left",
                  "--resize", "80x60", "--image-topic", "/camera/image_raw", domain=0)
    assert proc.returncode == 0, proc.stderr
    msgs = rs.by_topic(bag.read_all(tmp_path / "b"))
    frames = msgs["/camera/image_raw"]
    assert [rs.stamp_ns(m) for _, m in frames] == [round((START + i / 2) * 1e9) for i in range(4)]
    assert all((m.width, m.height) == (80, 60) for _, m in frames)
    assert [(t, m.data) for t, m in msgs["/instruction"]] == [(round((START + 0.75) * 1e9), "go left")]


@pytest.mark.parametrize("args, words", [
    (["{missing}", "{out}"], "input not found"),
    (["{video}", "{out}", "--resize", "12"], "bad size"),
    (["{video}", "{out}", "--fps", "30"], "above the video"),
    (["{video}", "{out}", "--script", "{bad_script}"], "expected {t: seconds, say: text}"),
    (["{video}", "{out}", "--say", "soon:hello"], "t must be a number"),
    (["{video}", "{exists}"], "already exists"),
    (["{empty_dir}", "{out}"], "no images"),
])
def test_errors_are_one_line(tmp_path, vtest, args, words):
    (tmp_path / "bad.yaml").write_text("- {when: 1, say: hi}\n")
    (tmp_path / "exists").mkdir()
    (tmp_path / "empty").mkdir()
    paths = {"missing": tmp_path / "nope.avi", "out": tmp_path / "out", "video": vtest,
             "bad_script": tmp_path / "bad.yaml", "exists": tmp_path / "exists", "empty_dir": tmp_path / "empty"}
    proc = rs.run("infmllm-make-bag", *[a.format(**paths) for a in args], domain=0)
    assert words in rs.one_line_error(proc, "infmllm-make-bag")
    assert not (tmp_path / "out").exists()


def test_stream_for_demos(tmp_path, native_frames):
    """bag.stream(): the ROS-free view a demo feeds a session (frames as RGB arrays, instructions as text)."""
    raw = rs.make_video_bag(tmp_path / "raw", "--resize", "160x120", "--max-frames", 12)
    jpeg = rs.make_video_bag(tmp_path / "jpeg", "--resize", "160x120", "--max-frames", 12, "--compressed")
    items = list(bag.stream(raw))
    assert [k for k, _, _ in items] == ["frame"] * 6 + ["instruction"] + ["frame"] * 6 + ["instruction"] * 2
    frames = [(t, rgb) for k, t, rgb in items if k == "frame"]
    assert [t for t, _ in frames] == pytest.approx([START + i / 10 for i in range(12)])
    assert all(np.array_equal(rgb, native_frames[i]) for i, (_, rgb) in enumerate(frames))
    assert items[6][1:] == (pytest.approx(START + 0.55), "What is in front of the robot?")
    decoded = [rgb for k, _, rgb in bag.stream(jpeg) if k == "frame"]
    assert len(decoded) == 12 and np.abs(decoded[3].astype(int) - native_frames[3]).mean() < 6


@pytest.mark.parametrize("storage", ["mcap", "sqlite3"])
def test_full_disk_removes_the_partial_bag(tmp_path, vtest, storage):
    import resource
    import signal
    import subprocess

    def limit():  # writes past 3 MB fail with EFBIG, like a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (3_000_000, 3_000_000))

    proc = subprocess.run(rs.cli("infmllm-make-bag", vtest, tmp_path / "out", "--max-frames", 10, "--storage",
                                 storage), env=rs.env(0), capture_output=True, text=True, preexec_fn=limit)
    assert f"writing {tmp_path / 'out'} failed" in rs.one_line_error(proc, "infmllm-make-bag")
    assert not (tmp_path / "out").exists()
