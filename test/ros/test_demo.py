"""`make demo` smoke run: a short stream through the real node, replay and client processes."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_demo_runs_end_to_end_and_reports_flat_kv_memory():
    env = dict(os.environ, ROS_DOMAIN_ID=str(90 + os.getpid() % 10), ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST",
               HF_HUB_OFFLINE="1")
    run = subprocess.run([sys.executable, "-m", "infmllm_ros.ros.demo", "--frames", "12", "--questions", "3",
                          "--timeout", "180"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    out = run.stdout
    assert run.returncode == 0, out + run.stderr
    # Every instruction was answered, each with its latency and KV line, and the summary says memory stayed flat.
    assert out.count("    answer: ") == 3, out
    assert out.count("    latency ") == 3, out
    assert "(3 answered)" in out and "(flat)" in out, out
    # Each answer names its evidence frames; the last memory mosaic is written as a PNG whose path is printed.
    assert out.count("    evidence: t=") == 3, out
    png = Path(out.split("memory image (frames the cache holds, evidence outlined): ")[1].split()[0])
    from PIL import Image

    with Image.open(png) as im:
        assert im.format == "PNG" and im.mode == "RGB" and min(im.size) >= 64
