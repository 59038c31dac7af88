"""`make demo`: the node watches a generated robot-world stream replayed from a rosbag2 bag and answers as it goes.

What runs is what a user runs: `infmllm-make-bag`-style bag writing, the node in its own process
(`python -m infmllm_ros.ros.node`, use_sim_time), `infmllm-replay --clock` in another process, and this script
as an ordinary ROS client that arms actions, listens to `~/result`, `~/action`, `cmd_vel` and `/diagnostics`,
and prints each instruction, the answer, the action, the latency, the KV memory against its budget and the answer's
evidence (the frames the question attended to most); at the end it writes the last `~/memory_image` mosaic (the
frames the cache still holds) to memory.png in its output folder.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict, deque
from pathlib import Path

from infmllm_ros import world

NODE = "infmllm_node"
ACTION_PREFIX = "action: "


def write_episode_bag(episode: world.Episode, path: Path, start_sec: int = 1_000) -> list[tuple[str, world.Event]]:
    """Frames as sensor_msgs/Image (rgb8) and questions as std_msgs/String; returns (sent text, event) in order.
    A question is stamped just after the frame it is about, so the newest frame replayed before it is that one."""
    from infmllm_ros.ros import bag

    ts = bag.typestore()
    Image, Header, Time, String = (ts.types[t] for t in ("sensor_msgs/msg/Image", "std_msgs/msg/Header",
                                                         "builtin_interfaces/msg/Time", "std_msgs/msg/String"))
    sent = []
    w = bag.open_writer(path, storage="mcap")
    try:
        c_img = bag.add_connection(w, "/image", "sensor_msgs/msg/Image")
        c_txt = bag.add_connection(w, "/instruction", "std_msgs/msg/String")
        msgs = []
        for f in episode.frames:
            ns = int((start_sec + f.t) * 1e9)
            h, wd = f.rgb.shape[:2]
            img = Image(header=Header(stamp=Time(sec=ns // 10**9, nanosec=ns % 10**9), frame_id="camera"),
                        height=h, width=wd, encoding="rgb8", is_bigendian=0, step=wd * 3, data=f.rgb.reshape(-1))
            msgs.append((ns, 0, c_img, bag.serialize(img, "sensor_msgs/msg/Image")))
        for e in episode.events:
            text = (ACTION_PREFIX + e.question) if e.kind == "action" else e.question
            ns = int((start_sec + e.t) * 1e9) + 50_000_000  # 50 ms after its frame
            msgs.append((ns, 1, c_txt, bag.serialize(String(data=text), "std_msgs/msg/String")))
            sent.append((text, e))
        for ns, _order, conn, raw in sorted(msgs, key=lambda m: (m[0], m[1])):
            w.write(conn, ns, raw)
    finally:
        w.close()
    return sent


def is_correct(event: world.Event, result: dict) -> bool:
    if event.kind == "action":
        got = result.get("action")
        if not isinstance(got, dict):
            return False
        want = json.loads(event.answer) if isinstance(event.answer, str) else dict(event.answer)
        if got.get("action") != want.get("action"):
            return False
        # Same kind of action; for motion also the same turning direction.
        sign = lambda v: (v > 0) - (v < 0)  # noqa: E731
        return sign(float(got.get("angular_z", 0.0))) == sign(float(want.get("angular_z", 0.0)))
    return world.normalize_answer(result.get("answer", "")) == world.normalize_answer(event.answer)


def _bar(done: int, total: int, width: int = 24) -> str:
    filled = int(width * done / max(total, 1))
    return "[" + "#" * filled + "." * (width - filled) + f"] {done}/{total}"


def _evidence(ev: dict | None) -> str:
    if not ev:
        return "none"
    frames = ", ".join(f"t={_t(f['stamp']):.1f}s ({f['weight']:.2f})" for f in ev.get("frames", []))
    return (f"{frames or 'no frame held'}; mass on frames {ev.get('frame_share', 0):.2f}, "
            f"text {ev.get('text_share', 0):.2f}")


def _t(stamp: dict, start_sec: int = 1_000) -> float:
    return (stamp or {}).get("sec", 0) - start_sec + (stamp or {}).get("nanosec", 0) / 1e9


def write_png(msg, path: Path) -> Path:
    """sensor_msgs/Image rgb8 -> PNG."""
    import numpy as np
    from PIL import Image as PILImage

    rgb = np.frombuffer(bytes(msg.data), np.uint8).reshape(msg.height, msg.step)[:, :msg.width * 3]
    PILImage.fromarray(rgb.reshape(msg.height, msg.width, 3)).save(path)
    return path


def _mib(n) -> str:
    return f"{(n or 0) / 2**20:.2f} MiB"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="infmllm-demo", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="", help="HF id, local dir or tiny:<family>; empty = the embedded model "
                                               "(or a tiny random-weight model when none ships yet)")
    p.add_argument("--frames", type=int, default=60, help="frames in the generated stream")
    p.add_argument("--questions", type=int, default=8, help="instructions in the stream")
    p.add_argument("--fps", type=float, default=2.0, help="camera rate of the generated stream")
    p.add_argument("--seed", type=int, default=7, help="robot-world seed (held out from training)")
    p.add_argument("--rate", type=float, default=1.0, help="replay speed factor")
    p.add_argument("--policy", default="saddle", help="cache policy")
    p.add_argument("--budget", type=int, default=512, help="cache budget (tokens)")
    p.add_argument("--timeout", type=float, default=240.0, help="give up after this many seconds")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("ROS_DOMAIN_ID", str(70 + os.getpid() % 20))
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from infmllm_ros.ros.session_factory import embedded_model

    model = args.model or embedded_model()
    if not model:
        model = "tiny:llava_llama"
        print("note: no embedded model ships yet; running a tiny RANDOM-WEIGHT LLaVA, so answers are gibberish. "
              "Everything else (stream, bounded cache, actions, diagnostics) is real.", flush=True)
    episode = world.make_episode(seed=args.seed, n_frames=args.frames, n_questions=args.questions)
    work = Path(tempfile.mkdtemp(prefix="infmllm_demo_"))
    bag_path = work / "robot_world"
    sent = write_episode_bag(episode, bag_path)
    print(f"bag: {bag_path} ({len(episode.frames)} frames at {args.fps:g} fps, {len(sent)} instructions)")

    node_log = open(work / "node.log", "wb")
    node_cmd = [sys.executable, "-m", "infmllm_ros.ros.node", "--ros-args", "-p", f"model:={model}",
                "-p", "use_sim_time:=true", "-p", "image_reliability:=reliable", "-p", f"frame_rate:={args.fps}",
                "-p", "instruction_durability:=transient_local", "-p", "output_durability:=transient_local",
                "-p", f"cache.policy:={args.policy}", "-p", f"cache.budget:={args.budget}",
                "-p", "answer_stream:=false", "-p", "actions.mode:=prefix", "-r", "image:=/image",
                "-r", "instruction:=/instruction"]
    node = subprocess.Popen(node_cmd, stdout=node_log, stderr=subprocess.STDOUT)
    print(f"node: pid {node.pid}, model {model}, policy {args.policy}, budget {args.budget} tokens "
          f"(log: {work / 'node.log'})", flush=True)

    import rclpy
    from diagnostic_msgs.msg import DiagnosticArray
    from geometry_msgs.msg import TwistStamped
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import Image
    from std_msgs.msg import String
    from std_srvs.srv import SetBool

    rclpy.init()
    client = rclpy.create_node("infmllm_demo")
    latched = QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
    results, diags, twists = deque(), {}, []
    client.create_subscription(String, f"/{NODE}/result", lambda m: results.append(json.loads(m.data)), latched)
    client.create_subscription(TwistStamped, "/cmd_vel",  # the node's default (cmd_vel_stamped: true)
                               lambda m: twists.append((m.twist.linear.x, m.twist.angular.z)), 10)
    memory_image = deque(maxlen=1)  # subscribing makes the node render it (only while someone watches)
    client.create_subscription(Image, f"/{NODE}/memory_image", lambda m: memory_image.append(m), 1)

    def on_diag(msg):
        for st in msg.status:
            diags.update({kv.key: kv.value for kv in st.values})

    client.create_subscription(DiagnosticArray, "/diagnostics", on_diag, 10)
    replay = None
    t0 = time.monotonic()
    expected = defaultdict(deque)
    for text, e in sent:
        expected[text].append(e)
    rows, kv_seen = [], set()
    try:
        print("loading the model ...", flush=True)
        while not diags and time.monotonic() - t0 < args.timeout:  # the first diagnostics = configured + active
            rclpy.spin_once(client, timeout_sec=0.2)
            if node.poll() is not None:
                raise RuntimeError(f"the node exited with code {node.returncode}; see {work / 'node.log'}")
        arm = client.create_client(SetBool, f"/{NODE}/enable_actions")
        if arm.wait_for_service(timeout_sec=10.0):
            fut = arm.call_async(SetBool.Request(data=True))
            rclpy.spin_until_future_complete(client, fut, timeout_sec=10.0)
            print("actions armed (limits from config/actions.yaml)", flush=True)
        replay = subprocess.Popen([sys.executable, "-m", "infmllm_ros.ros.replay", str(bag_path), "--clock",
                                   "--rate", str(args.rate), "--wait-for-subscribers", "1", "--quiet"])
        print(f"replaying {episode.frames[-1].t:.0f} s of robot camera ...\n", flush=True)
        while len(rows) < len(sent) and time.monotonic() - t0 < args.timeout:
            rclpy.spin_once(client, timeout_sec=0.2)
            while results:
                r = results.popleft()
                queue = expected.get(r.get("instruction", ""))
                event = queue.popleft() if queue else None
                ok = event is not None and is_correct(event, r)
                rows.append(ok)
                cache = r.get("cache") or {}
                kv_seen.add(cache.get("kv_bytes"))
                print(f"{_bar(len(rows), len(sent))}  t={_t(r.get('frame_stamp')):5.1f}s "
                      f"[{event.kind if event else '?'}] {r.get('instruction')!r}")
                print(f"    answer: {r.get('answer', '')!r}  expected: {event.answer if event else '?'!r}  "
                      f"{'CORRECT' if ok else 'wrong'}")
                print(f"    evidence: {_evidence(r.get('evidence'))}")
                if r.get("action") or r.get("action_error"):
                    print(f"    action: {json.dumps(r.get('action')) if r.get('action') else r.get('action_error')}")
                stored = cache.get("tokens_stored", cache.get("stored", "?"))
                seen = cache.get("tokens_seen", cache.get("seen", "?"))
                print(f"    latency {r.get('latency_s', 0):.2f} s | KV {_mib(cache.get('kv_bytes'))} fixed, "
                      f"{stored} tokens stored (budget {args.budget} after each chunk), {seen} seen", flush=True)
        if replay.poll() is None:
            replay.wait(timeout=max(1.0, args.timeout - (time.monotonic() - t0)))
        for _ in range(10):  # one more diagnostics message (and memory image) after the stream
            rclpy.spin_once(client, timeout_sec=0.2)
        if memory_image:
            print(f"memory image (frames the cache holds, evidence outlined): "
                  f"{write_png(memory_image[-1], work / 'memory.png')}", flush=True)
    finally:
        for proc in (replay, node):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
        client.destroy_node()
        rclpy.try_shutdown()

    moves = sum(1 for lx, az in twists if lx or az)
    print("\nsummary")
    print(f"  correct answers: {sum(rows)}/{len(sent)} ({len(rows)} answered)")
    print(f"  KV bytes: {' / '.join(_mib(b) for b in sorted(kv_seen, key=lambda b: b or 0))} "
          f"({'flat' if len(kv_seen) == 1 else 'CHANGED'}) over {diags.get('tokens_seen', '?')} tokens seen, "
          f"{diags.get('evictions', '?')} evictions")
    print(f"  frames: {diags.get('frames_in', '?')} in, {diags.get('frames_used', '?')} used, "
          f"{diags.get('frames_dropped', '?')} dropped; cmd_vel: {moves} motion / {len(twists) - moves} zero messages")
    p50, p95 = diags.get("answer_latency_p50_s", "?"), diags.get("answer_latency_p95_s", "?")
    print(f"  answer latency p50 {p50} s, p95 {p95} s")
    print(f"  wall time {time.monotonic() - t0:.0f} s; node log {work / 'node.log'}")
    return 0 if len(rows) == len(sent) else 1


if __name__ == "__main__":
    sys.exit(main())
