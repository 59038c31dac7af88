"""infmllm-replay: play a rosbag2 bag into a live ROS graph (the `ros2 bag play` this project needs).

Each message's stored CDR bytes are published unchanged through rclpy on a publisher of the real message class,
at the recorded timing scaled by --rate. With --clock, /clock (rosgraph_msgs/Clock) carries the bag time, so
nodes started with use_sim_time:=true follow the bag. Exit status: 0 done, 1 bad bag or bad arguments,
2 timed out waiting for subscribers or for acknowledgements, 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

from infmllm_ros.ros import bag

QOS_CHOICES = ("reliable", "sensor", "volatile")


def qos_profile(kind: str, depth: int):
    """reliable: RELIABLE + TRANSIENT_LOCAL (late joiners get the last `depth`); sensor: BEST_EFFORT + VOLATILE;
    volatile: RELIABLE + VOLATILE. All KEEP_LAST(depth)."""
    from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

    reliability = ReliabilityPolicy.BEST_EFFORT if kind == "sensor" else ReliabilityPolicy.RELIABLE
    durability = DurabilityPolicy.TRANSIENT_LOCAL if kind == "reliable" else DurabilityPolicy.VOLATILE
    return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=depth, reliability=reliability, durability=durability)


def split_ros_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """(our arguments, ['--ros-args', ...]) so `--ros-args -r __node:=x` reaches rclpy untouched."""
    if "--ros-args" in argv:
        i = argv.index("--ros-args")
        return argv[:i], argv[i:]
    return argv, []


def start_ros(ros_args: list[str], node_name: str, **node_kwargs):
    """rclpy.init (our own signal handlers stay in charge) + a node; a bad --ros-args or domain is a BagError."""
    import rclpy
    from rclpy.signals import SignalHandlerOptions

    domain = os.environ.get("ROS_DOMAIN_ID", "").strip()
    if domain and not (domain.isdigit() and int(domain) <= 232):  # Fast DDS would exit(1) with no message of ours
        raise bag.BagError(f"ROS_DOMAIN_ID={domain!r} is not a domain id from 0 to 232")
    try:
        rclpy.init(args=ros_args or None, signal_handler_options=SignalHandlerOptions.NO)
        return rclpy.create_node(node_name, **node_kwargs)
    except Exception as exc:
        rclpy.try_shutdown()
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise bag.BagError(f"cannot start ROS: {first.split(', at /')[0]}") from None


def parse_remaps(items: list[str] | None) -> dict[str, str]:
    remaps = {}
    for item in items or []:
        old, sep, new = item.partition(":=")
        if not sep or not old or not new:
            raise bag.BagError(f"bad --remap {item!r}: expected OLD:=NEW, e.g. /image:=/camera/image_raw")
        remaps[_absolute(old)] = _absolute(new)
    return remaps


def _absolute(topic: str) -> str:
    return topic if topic.startswith("/") else "/" + topic


class Progress:
    """One self-rewriting line on stderr: elapsed / bag duration, messages sent, rate."""

    def __init__(self, duration_s: float, total: int | None, enabled: bool):
        self.duration_s, self.total, self.enabled = duration_s, total, enabled
        self.last = 0.0

    def update(self, bag_elapsed_s: float, sent: int, force: bool = False):
        now = time.monotonic()
        if not self.enabled or (not force and now - self.last < 0.1):
            return
        self.last = now
        frac = min(1.0, bag_elapsed_s / self.duration_s) if self.duration_s > 0 else float(bool(sent))
        filled = int(round(frac * 24))
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (24 - filled)}] {bag_elapsed_s:7.2f} / {self.duration_s:.2f} s"
                         f"  {sent}{f'/{self.total}' if self.total is not None else ''} msgs ")
        sys.stderr.flush()

    def finish(self):
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="infmllm-replay", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example: infmllm-replay out/vtest --clock --wait-for-subscribers 1 --remap /image:=/camera/image\n"
               "ROS arguments go last: infmllm-replay BAG --ros-args -r __node:=player\n"
               "after colcon build (tools are not on PATH): ros2 run infmllm_ros infmllm-replay BAG ...\n"
               "a recording whose recorder was killed: infmllm-record --reindex BAG first")
    p.add_argument("bag", help="bag folder, or a single .mcap / .db3 file")
    p.add_argument("--rate", type=float, default=1.0, help="playback speed factor (default 1.0; 0 = as fast as "
                                                           "possible)")
    p.add_argument("--loop", action="store_true", help="play again from the start until interrupted")
    p.add_argument("--start-offset", type=float, default=0.0, metavar="S", help="skip the first S seconds of the bag")
    p.add_argument("--topics", nargs="+", metavar="TOPIC", help="play only these topics (names as in the bag)")
    p.add_argument("--remap", action="append", metavar="OLD:=NEW", help="publish topic OLD as NEW (repeatable)")
    p.add_argument("--clock", nargs="?", type=float, const=50.0, default=None, metavar="HZ",
                   help="publish /clock with the bag time, at HZ (default 50) and before every message")
    p.add_argument("--qos", choices=QOS_CHOICES, default="reliable",
                   help="reliable = reliable + transient_local (default, no loss with matching subscribers); "
                        "sensor = best effort + volatile; volatile = reliable + volatile")
    p.add_argument("--depth", type=int, default=100, help="publisher history depth (default 100)")
    p.add_argument("--no-flow-control", action="store_true",
                   help="do not wait for acknowledgements every depth/2 messages (reliable QoS): faster than a "
                        "slow subscriber, but the history may overwrite what it has not received yet")
    p.add_argument("--wait-for-subscribers", type=int, default=0, metavar="N",
                   help="before playing, wait until every played topic has N subscribers (default 0)")
    p.add_argument("--wait-timeout", type=float, default=30.0, metavar="S",
                   help="give up waiting for subscribers or acknowledgements after S seconds (default 30)")
    p.add_argument("--delay", type=float, default=0.0, metavar="S", help="sleep S seconds before playing")
    p.add_argument("--skip-unknown", action="store_true",
                   help="skip topics whose message type is not installed instead of failing")
    p.add_argument("--progress", choices=("auto", "always", "never"), default="auto",
                   help="progress line on stderr: auto = only when stderr is a terminal")
    p.add_argument("--quiet", action="store_true", help="no progress line and no summary")
    return p


class _Stop:
    requested = False
    signum = 0


def _install_signals(stop: _Stop):
    def handler(signum, _frame):
        stop.requested, stop.signum = True, signum

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def _select(reader, topics, remaps, skip_unknown):
    """{connection id: (connection, published topic, message class)}, after checks; BagError on problems."""
    conns = reader.connections
    known = {c.topic for c in conns}
    if topics:
        missing = [t for t in topics if t not in known]
        if missing:
            raise bag.BagError(f"topic(s) not in bag: {', '.join(missing)} (bag has: {', '.join(sorted(known))})")
        conns = [c for c in conns if c.topic in topics]
    chosen, skipped = {}, []
    for c in conns:
        try:
            cls = bag.ros_type(c.msgtype)
        except bag.BagError:
            if not skip_unknown:
                raise
            skipped.append(f"{c.topic} ({c.msgtype})")
            continue
        chosen[c.id] = (c, remaps.get(c.topic, c.topic), cls)
    if not chosen:
        raise bag.BagError("nothing to play: no topic with an installed message type" if skipped else
                           "nothing to play: the bag has no topics")
    if sum(c.msgcount for c, _, _ in chosen.values()) == 0:
        raise bag.BagError(f"bag {reader.path} is empty: no messages on the selected topics")
    return chosen, skipped


def main(argv: list[str] | None = None) -> int:
    ours, ros_args = split_ros_args(list(sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(ours)
    stop = _Stop()
    try:
        if args.rate < 0:
            raise bag.BagError("--rate must be >= 0")
        if args.depth < 1:
            raise bag.BagError("--depth must be >= 1")
        remaps = parse_remaps(args.remap)
        reader = bag.open_reader(args.bag)
    except bag.BagError as exc:
        print(f"infmllm-replay: error: {exc}", file=sys.stderr)
        return 1
    try:
        chosen, skipped = _select(reader, args.topics, remaps, args.skip_unknown)
        for name in skipped:
            print(f"infmllm-replay: skipping {name}: message type not installed", file=sys.stderr)
        _install_signals(stop)
        return _play(reader, chosen, args, ros_args, stop)
    except bag.BagError as exc:
        newline = "\n" if sys.stderr.isatty() else ""  # end a progress line cut short
        print(f"{newline}infmllm-replay: error: {exc}", file=sys.stderr)
        return 1
    finally:
        reader.close()


def _play(reader, chosen, args, ros_args, stop: _Stop) -> int:
    import rclpy
    from rclpy.duration import Duration

    node = start_ros(ros_args, "infmllm_replay")
    try:
        qos = qos_profile(args.qos, args.depth)
        pubs, by_conn = {}, {}
        for cid, (conn, topic, cls) in chosen.items():
            key = (topic, conn.msgtype)
            if key not in pubs:
                pubs[key] = node.create_publisher(cls, topic, qos)
            by_conn[cid] = pubs[key]
        clock_pub = clock_cls = None
        if args.clock:
            from rosgraph_msgs.msg import Clock as clock_cls

            clock_pub = node.create_publisher(clock_cls, "/clock", qos_profile("volatile", 1))
        if args.wait_for_subscribers > 0 and not _wait_for_subscribers(pubs, args, stop):
            return 130 if stop.requested else 2
        if args.delay > 0:
            _sleep_until(time.monotonic() + args.delay, stop)

        selected = [c for c, _, _ in chosen.values()]
        start_ns = reader.start_time + round(args.start_offset * 1e9)
        total = sum(c.msgcount for c in selected) if args.start_offset <= 0 else None  # unknown without a scan
        duration_s = max(0.0, (reader.end_time - start_ns) / 1e9)
        show = not args.quiet and (args.progress == "always" or (args.progress == "auto" and sys.stderr.isatty()))
        progress = Progress(duration_s, total, show)
        sent = nbytes = stalled = 0
        # reliable QoS keeps the last `depth` messages: wait for acknowledgements every depth/2 messages so a slow
        # subscriber slows the replay down instead of losing what the history overwrote
        flow_every = max(1, args.depth // 2) if args.qos != "sensor" and not args.no_flow_control else 0
        unacked: dict = {}
        wall0 = time.monotonic()

        def publish_clock(ns: int):
            if clock_pub is not None:
                msg = clock_cls()
                msg.clock.sec, msg.clock.nanosec = divmod(ns, 10**9)
                clock_pub.publish(msg)

        def clock_ns(play_start, first_ns) -> int:
            return first_ns + round((time.monotonic() - play_start) * 1e9 * (args.rate or 1.0))

        while not stop.requested:
            play_start, first_ns = time.monotonic(), None
            sent_this_loop = 0
            for conn, t_ns, raw in bag.iter_messages(reader, selected, start=start_ns):
                if first_ns is None:
                    first_ns = t_ns
                    publish_clock(first_ns)
                if args.rate > 0:
                    due = play_start + (t_ns - first_ns) / 1e9 / args.rate
                    period = 1.0 / args.clock if args.clock else None
                    while not stop.requested and time.monotonic() < due:
                        _sleep_until(min(due, time.monotonic() + (period or 0.1)), stop)
                        if period:
                            publish_clock(min(t_ns, clock_ns(play_start, first_ns)))
                        progress.update((clock_ns(play_start, first_ns) - start_ns) / 1e9, sent)
                if stop.requested:
                    break
                publish_clock(t_ns)
                pub = by_conn[conn.id]
                pub.publish(bytes(raw))
                unacked[pub] = unacked.get(pub, 0) + 1
                if flow_every and unacked[pub] >= flow_every:  # back-pressure: never overrun the history
                    unacked[pub] = 0
                    if not pub.wait_for_all_acked(Duration(seconds=args.wait_timeout)):
                        stalled += 1
                sent += 1
                sent_this_loop += 1
                nbytes += len(raw)
                progress.update((t_ns - start_ns) / 1e9, sent)
            if first_ns is not None:
                progress.update((t_ns - start_ns) / 1e9, sent, force=True)
            if sent_this_loop == 0 and not stop.requested:
                raise bag.BagError(f"nothing to play after --start-offset {args.start_offset:g} s "
                                   f"(bag lasts {reader.duration / 1e9:.2f} s)")
            if not args.loop:
                break
        progress.finish()
        wall = time.monotonic() - wall0
        acked = all(p.wait_for_all_acked(Duration(seconds=args.wait_timeout)) for p in pubs.values()
                    if p.get_subscription_count() > 0) if not stop.requested else True
        if not args.quiet:
            print(f"infmllm-replay: sent {sent} messages ({nbytes / 1e6:.2f} MB) on {len(pubs)} topics in {wall:.2f} s"
                  f" ({sent / wall if wall > 0 else 0:.0f} msg/s, {nbytes / 1e6 / wall if wall > 0 else 0:.1f} MB/s)"
                  + ("" if acked else "; WARNING: not every subscriber acknowledged everything")
                  + (f"; WARNING: {stalled} waits for slow subscribers timed out" if stalled else "")
                  + (" [interrupted]" if stop.requested else ""), file=sys.stderr)
        if stop.requested:
            return 130
        return 0 if acked else 2
    finally:
        node.destroy_node()
        rclpy.try_shutdown()


def _wait_for_subscribers(pubs, args, stop: _Stop) -> bool:
    deadline = time.monotonic() + args.wait_timeout
    while not stop.requested:
        waiting = [topic for (topic, _), p in pubs.items() if p.get_subscription_count() < args.wait_for_subscribers]
        if not waiting:
            return True
        if time.monotonic() > deadline:
            print(f"infmllm-replay: error: timed out after {args.wait_timeout:g} s waiting for "
                  f"{args.wait_for_subscribers} subscriber(s) on {', '.join(waiting)}", file=sys.stderr)
            return False
        time.sleep(0.02)
    return False


def _sleep_until(deadline: float, stop: _Stop):
    while not stop.requested:
        left = deadline - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(left, 0.05))


if __name__ == "__main__":
    sys.exit(main())
