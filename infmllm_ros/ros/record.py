"""infmllm-record: record live topics into a rosbag2 bag (the `ros2 bag record` this project needs).

Subscriptions take raw CDR bytes (raw=True) and write them unchanged, stamped with the receive time of the node
clock (system time, or /clock with --use-sim-time). Topic types come from the graph, or are given as TOPIC:TYPE.
`--ros-args -r /a:=/b` records the live topic /b under the name /a in the bag.
SIGINT / SIGTERM, --duration and --max-messages stop it cleanly: what was already received is taken from the
queues and written, and the bag is closed (metadata.yaml written), so it is valid after Ctrl-C.
A SIGKILL loses at most the last --flush-interval seconds or --flush-messages messages: the mcap chunk is closed
and the sqlite3 transaction committed (WAL) that often (written through to the OS, not fsynced: a power cut can
lose more). Such a bag has no metadata.yaml (and an mcap file no footer); `infmllm-record --reindex BAG` repairs
it in place, like `ros2 bag reindex`.
metadata.yaml lists each topic's offered QoS profiles (its publishers' when recording starts, or for a typed topic
with no publisher yet, when its first message arrives), and ros_distro from $ROS_DISTRO (else kilted).
Exit status: 0 recorded (or repaired), 1 bad arguments or output, 2 topics not found in time.
"""

from __future__ import annotations

import argparse
import signal
import sqlite3
import sys
import time
from pathlib import Path

from infmllm_ros.ros import bag, bag_reindex
from infmllm_ros.ros.replay import QOS_CHOICES, qos_profile, split_ros_args, start_ros


def parse_topic(spec: str) -> tuple[str, str | None]:
    """'/image' -> ('/image', None); '/image:sensor_msgs/msg/Image' -> ('/image', 'sensor_msgs/msg/Image')."""
    topic, _, msgtype = spec.partition(":")
    if not topic:
        raise bag.BagError(f"bad topic {spec!r}: expected TOPIC or TOPIC:pkg/msg/Type")
    topic = topic if topic.startswith("/") else "/" + topic
    return topic, (bag.normalize_type(msgtype) if msgtype else None)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="infmllm-record", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  infmllm-record out/run1 --topics /image /instruction /infmllm/answer:std_msgs/msg/String\n"
               "  infmllm-record --reindex out/run1      # repair a recording whose recorder was killed\n"
               "  ros2 run infmllm_ros infmllm-record ...  # the same after colcon build (tools are not on PATH)")
    p.add_argument("bag", nargs="?", help="output bag folder (must not exist unless --overwrite)")
    p.add_argument("--topics", nargs="+", metavar="TOPIC[:TYPE]",
                   help="topics to record; TYPE (pkg/msg/Name) skips waiting for the topic to appear in the graph")
    p.add_argument("--storage", choices=sorted(bag.STORAGES), default="mcap", help="default mcap")
    p.add_argument("--qos", choices=("auto",) + QOS_CHOICES, default="auto",
                   help="auto (default) = what the topic's publishers offer (transient_local and reliable only if "
                        "all of them offer it); reliable = reliable + transient_local; sensor = best effort; "
                        "volatile = reliable + volatile")
    p.add_argument("--depth", type=int, default=1000, help="subscription queue depth (default 1000)")
    p.add_argument("--duration", type=float, metavar="S", help="stop after S seconds of recording")
    p.add_argument("--max-messages", type=int, metavar="N", help="stop after N messages (all topics together)")
    p.add_argument("--discovery-timeout", type=float, default=10.0, metavar="S",
                   help="wait at most S seconds for untyped topics to appear in the graph (default 10)")
    p.add_argument("--use-sim-time", action="store_true", help="stamp messages with /clock time")
    p.add_argument("--overwrite", action="store_true", help="replace the output bag if it exists")
    p.add_argument("--flush-interval", type=float, default=1.0, metavar="S",
                   help="write recorded messages through to the file at least every S seconds (default 1): "
                        "a killed recorder loses at most that much")
    p.add_argument("--flush-messages", type=int, default=1000, metavar="N",
                   help="... and at least every N messages (default 1000), which bounds the loss at high rates")
    p.add_argument("--reindex", metavar="BAG",
                   help="instead of recording: repair BAG, a recording whose recorder was killed (rebuilds the "
                        "mcap summary and footer, or recovers the sqlite3 WAL, and writes metadata.yaml)")
    p.add_argument("--quiet", action="store_true", help="no summary line")
    return p


class _Stop:
    requested = False
    reason = ""


def main(argv: list[str] | None = None) -> int:
    ours, ros_args = split_ros_args(list(sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(ours)
    stop = _Stop()

    def on_signal(signum, _frame):
        stop.requested, stop.reason = True, signal.Signals(signum).name

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        if args.reindex is not None:
            if args.bag or args.topics:
                raise bag.BagError("--reindex BAG takes no output bag and no --topics")
            print(bag_reindex.report(bag_reindex.reindex(args.reindex)), file=sys.stderr)
            return 0
        if not args.bag or not args.topics:
            raise bag.BagError("give an output bag and --topics (or --reindex BAG)")
        if not args.flush_interval > 0 or args.flush_interval == float("inf"):
            raise bag.BagError("--flush-interval must be a finite number of seconds > 0")
        if args.depth < 1 or args.flush_messages < 1 or (args.max_messages is not None and args.max_messages < 1):
            raise bag.BagError("--depth, --flush-messages and --max-messages must be >= 1")
        if Path(args.bag).exists() and not args.overwrite:
            raise bag.BagError(f"output bag {args.bag} already exists (use --overwrite to replace it)")
        specs = dict(parse_topic(s) for s in args.topics)
        for msgtype in filter(None, specs.values()):
            bag.ros_type(msgtype)
            bag.ensure_type(msgtype)
        return _record(args, ros_args, specs, stop)
    except bag.BagError as exc:
        print(f"infmllm-record: error: {exc}", file=sys.stderr)
        return 1


def _record(args, ros_args, specs: dict, stop: _Stop) -> int:
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.parameter import Parameter

    node = start_ros(ros_args, "infmllm_record", parameter_overrides=[
        Parameter("use_sim_time", Parameter.Type.BOOL, True)] if args.use_sim_time else [])
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    writer = None
    counts: dict[str, int] = {}
    total = nbytes = 0
    t_start = time.monotonic()
    try:
        types = _discover(node, specs, args.discovery_timeout, stop)
        if types is None:
            return 130 if stop.requested else 2
        writer = bag.open_writer(args.bag, storage=args.storage, overwrite=args.overwrite,
                                 flush_interval=args.flush_interval, flush_messages=args.flush_messages)
        clock = node.get_clock()

        conns = {}

        def connection(topic: str):
            """The topic's bag connection, made when its publishers are known: their offered QoS goes into the
            channel record (mcap) / topics row (sqlite3) at once, so even a killed recording keeps it."""
            if topic not in conns:
                conns[topic] = bag.add_connection(writer, topic, types[topic],
                                                  qos=[bag_qos(q) for q in _offered_qos(node, topic)])
            return conns[topic]

        def make_callback(topic):
            def on_message(raw: bytes):
                nonlocal total, nbytes
                if args.max_messages is not None and total >= args.max_messages:
                    return
                writer.write(connection(topic), clock.now().nanoseconds, raw)
                counts[topic] += 1
                total += 1
                nbytes += len(raw)
                if args.max_messages is not None and total >= args.max_messages:
                    stop.requested, stop.reason = True, "max-messages"
            return on_message

        for topic, msgtype in types.items():
            offered = _offered_qos(node, topic)
            if offered:  # else a typed topic with no publisher yet: its connection comes with the first message
                connection(topic)
            counts[topic] = 0
            node.create_subscription(bag.ros_type(msgtype), topic, make_callback(topic), _qos_for(offered, args),
                                     raw=True)
        print(f"infmllm-record: recording {len(types)} topic(s) to {args.bag}", file=sys.stderr, flush=True)
        t_start = time.monotonic()
        try:
            while not stop.requested:
                executor.spin_once(timeout_sec=0.05)
                writer.flush_if_due()  # the last messages before a pause are not held back until the next one
                if args.duration is not None and time.monotonic() - t_start >= args.duration:
                    stop.requested, stop.reason = True, "duration"
            _drain(executor, lambda: total)
        except (OSError, sqlite3.Error) as exc:  # disk full: keep what was written, say why, exit 1
            stop.reason = f"write failed: {exc}"
            print(f"infmllm-record: error: writing {args.bag} failed: {exc}", file=sys.stderr)
            return 1
        return 0
    finally:
        if writer is not None:
            try:
                for topic in types:  # topics that got no message are in the bag too (with no QoS if none offered)
                    connection(topic)
                writer.close()  # writes the summary and metadata.yaml: the bag is valid from here on
            except (OSError, sqlite3.Error) as exc:
                print(f"infmllm-record: error: closing {args.bag} failed, the bag is not valid: {exc}",
                      file=sys.stderr)
        node.destroy_node()
        rclpy.try_shutdown()
        if writer is not None and not args.quiet:
            wall = time.monotonic() - t_start
            per_topic = ", ".join(f"{t} {n}" for t, n in counts.items())
            print(f"infmllm-record: wrote {total} messages ({nbytes / 1e6:.2f} MB) in {wall:.2f} s to {args.bag} "
                  f"[{per_topic}]" + (f" (stopped: {stop.reason})" if stop.reason else ""), file=sys.stderr)


def _drain(executor, count):
    """Take what already arrived before closing: spin until two quiet passes in a row."""
    quiet = 0
    deadline = time.monotonic() + 2.0
    while quiet < 2 and time.monotonic() < deadline:
        before = count()
        executor.spin_once(timeout_sec=0.02)
        quiet = quiet + 1 if count() == before else 0


def _discover(node, specs: dict, timeout: float, stop: _Stop) -> dict[str, str] | None:
    """{topic: msgtype} for every topic; untyped ones are looked up in the graph until `timeout`."""
    types = {t: m for t, m in specs.items() if m}
    deadline = time.monotonic() + timeout
    while not stop.requested:
        graph = dict(node.get_topic_names_and_types())
        for topic in specs:
            names = graph.get(node.resolve_topic_name(topic))  # after --ros-args -r remapping
            if topic not in types and names:
                if len(names) > 1:
                    raise bag.BagError(f"topic {topic} has several types {names}: give one as {topic}:TYPE")
                bag.ros_type(names[0])
                bag.ensure_type(names[0])
                types[topic] = bag.normalize_type(names[0])
        missing = [t for t in specs if t not in types]
        if not missing:
            return types
        if time.monotonic() > deadline:
            print(f"infmllm-record: error: topic(s) not found in the graph after {timeout:g} s: {', '.join(missing)}"
                  f" (give the type as TOPIC:pkg/msg/Type to record before a publisher appears)", file=sys.stderr)
            return None
        time.sleep(0.05)
    return None


def _offered_qos(node, topic: str) -> list:
    """The rclpy QoS profiles the topic's publishers offer right now (the graph's endpoint info)."""
    return [info.qos_profile for info in node.get_publishers_info_by_topic(node.resolve_topic_name(topic))]


def bag_qos(profile):
    """rclpy QoSProfile -> rosbags Qos (what metadata.yaml's offered_qos_profiles stores), enums by name."""
    from rosbags.interfaces import Qos, QosDurability, QosHistory, QosLiveliness, QosReliability, QosTime

    def enum(kind, policy):
        return kind.__members__.get(policy.name, kind.UNKNOWN)

    def duration(d):
        return QosTime(*divmod(d.nanoseconds, 10**9))  # infinite = 2^63-1 ns, as rosbag2 writes it

    return Qos(enum(QosHistory, profile.history), profile.depth, enum(QosReliability, profile.reliability),
               enum(QosDurability, profile.durability), duration(profile.deadline), duration(profile.lifespan),
               enum(QosLiveliness, profile.liveliness), duration(profile.liveliness_lease_duration),
               profile.avoid_ros_namespace_conventions)


def _qos_for(offered: list, args):
    if args.qos != "auto":
        return qos_profile(args.qos, args.depth)
    from rclpy.qos import DurabilityPolicy, ReliabilityPolicy

    if not offered:
        return qos_profile("volatile", args.depth)
    if all(q.reliability == ReliabilityPolicy.RELIABLE for q in offered):
        if all(q.durability == DurabilityPolicy.TRANSIENT_LOCAL for q in offered):
            return qos_profile("reliable", args.depth)
        return qos_profile("volatile", args.depth)
    return qos_profile("sensor", args.depth)


if __name__ == "__main__":
    sys.exit(main())
