"""The node's parameters: ONE table (name, default, description, range, when it takes effect, validator).

Everything about a parameter lives in its row: ``declare_all`` turns the rows into ROS parameter descriptors
(description, FloatingPointRange / IntegerRange, read_only), ``check`` is the one validation applied both at
configure and to every runtime ``set_parameters`` (the node's on-set-parameters callback), and ``PARAMS``
(name -> default) is what ``config/robot.yaml`` must hold.

When a parameter takes effect (``Param.when``):
  ``live``       applied at once on a successful set (frame rate, generation, actions.mode, answer_stream,
                 watchdog and diagnostics periods, reset timeout)
  ``configure``  read at configure only; a set while the node is configured (inactive or active) is rejected
                 with a reason that says to reconfigure (deactivate, cleanup, set, configure)
  ``start``      read once at process start (read_only descriptor)

(``params.py`` is the launch file's helper for params files; this module is the node's own table.)
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

INT_MAX = 2**62  # anything near int64 is nonsense for every integer here; ranges below are much tighter


@dataclass(frozen=True)
class Param:
    name: str
    default: object
    description: str
    when: str = "configure"  # live | configure | start
    lo: float | None = None  # inclusive bounds for numbers (the descriptor's range)
    hi: float | None = None
    choices: tuple = ()
    extra: Callable[[object], str | None] | None = None  # further check: value -> reason or None

    @property
    def live(self) -> bool:
        return self.when == "live"


def _nonempty(v) -> str | None:
    return None if str(v).strip() else "must not be empty"


def _actions_file(v) -> str | None:
    return None if not v or Path(str(v)).is_file() else f"file {v!r} does not exist"


def _factory(v) -> str | None:
    if not v:
        return None
    from infmllm_ros.ros import session_factory as sf

    try:
        sf.load_factory(str(v))
    except Exception as e:  # ImportError, AttributeError, ValueError: all say the same thing to the user
        return f"cannot load session factory {v!r}: {type(e).__name__}: {e}"
    return None


def _prompt(v) -> str | None:
    try:
        str(v).format(instruction="x", schema="y")
    except (KeyError, IndexError, ValueError) as e:
        return f"may only use {{instruction}} and {{schema}}: {e!r}"
    return None


def _max_chunk(v) -> str | None:
    return None if v == 0 or v >= 64 else "must be 0 (auto) or >= 64 (a frame or an instruction must fit a chunk)"


_DUR = ("volatile", "transient_local")
# cache.budget / cache.window / cache.max_chunk: 0 = automatic (resolved by session_factory.make_session).
TABLE: tuple[Param, ...] = (
    Param("autostart", True, "main() configures and activates the node at start", when="start"),
    Param("model", "", "HF id, local directory, tiny:<family>[:seed], or empty for the embedded model"),
    Param("device", "cpu", "torch device: cpu, cuda, cuda:0", extra=_nonempty),
    Param("dtype", "auto", "model dtype (auto = bfloat16 on CUDA, float32 on CPU)",
          choices=("auto", "float32", "float16", "bfloat16")),
    Param("system_prompt", "", "first turn of the session; empty = none"),
    Param("session_factory", "", "module:callable building the session; empty = the engine", extra=_factory),
    Param("frame.tokens", 256, "target image tokens per frame", lo=1, hi=65536),
    Param("frame.max_side", 0, "longest image side fed to the model in pixels; 0 = from frame.tokens", lo=0, hi=16384),
    Param("cache.policy", "saddle", "eviction policy", choices=("saddle", "streaming_llm", "h2o", "full")),
    Param("cache.budget", 0, "tokens stored per layer after each eviction; 0 = auto (cache.budget_frames)",
          lo=0, hi=1 << 20),
    Param("cache.budget_frames", 8, "frames the auto budget holds (cache.budget 0)", lo=1, hi=4096),
    Param("cache.recent", 64, "newest tokens always kept", lo=0, hi=1 << 20),
    Param("cache.window", 0, "retrieval window (last queries of a chunk that vote); 0 = the whole chunk",
          lo=0, hi=1 << 20),
    Param("cache.sinks", 0, "first tokens of the stream always kept", lo=0, hi=1 << 20),
    Param("cache.bias", "linear", "tilt of eviction toward newer tokens", choices=("none", "linear", "age_decay")),
    Param("cache.bias_strength", 1.0, "strength of cache.bias; 0 = off", lo=0.0, hi=1000.0),
    Param("cache.positions", "reindex", "reindex (bounded positions) or absolute (test oracle)",
          choices=("reindex", "absolute")),
    Param("cache.max_chunk", 0, "largest prefill chunk in tokens; 0 = auto (from the model and frame.tokens)",
          lo=0, hi=1 << 20, extra=_max_chunk),
    Param("frame_rate", 1.0, "frames per second entering the session (newest wins)", when="live", lo=1e-3, hi=1000.0),
    Param("max_decode_s", 2.0, "seconds one JPEG/PNG decode may take; a slower one is stopped and the frame "
          "rejected", when="live", lo=0.01, hi=60.0),
    Param("max_frame_age", 5.0, "seconds: an answer on an older view says it is stale, actions are refused and "
          "/diagnostics warns; 0 = never stale", when="live", lo=0.0, hi=3600.0, extra=lambda v: None if v == 0 or
          v >= 0.05 else "must be 0 (off) or >= 0.05"),
    Param("max_image_pixels", 16 * 1024 * 1024, "larger frames are rejected (checked before decoding)",
          lo=1, hi=1 << 28),
    Param("generation.max_new_tokens", 64, "longest answer (live: at most the value at configure, which sized the"
          " cache)", when="live", lo=1, hi=1 << 16),
    Param("generation.temperature", 0.0, "sampling temperature; 0 = greedy", when="live", lo=0.0, hi=100.0),
    Param("generation.top_p", 1.0, "nucleus sampling mass (temperature > 0)", when="live", lo=1e-3, hi=1.0),
    Param("generation.stop", [""], "extra stop strings (empty entries ignored)", when="live"),
    Param("image_topic", "image", "camera topic (image_transport base name)", extra=_nonempty),
    Param("image_transport", "raw", "raw (sensor_msgs/Image on image_topic) or compressed (CompressedImage on "
          "image_topic/compressed)", choices=("raw", "compressed")),
    Param("image_reliability", "best_effort", "image subscription reliability", choices=("best_effort", "reliable")),
    Param("image_depth", 1, "image subscription queue depth", lo=1, hi=1000),
    Param("instruction_topic", "instruction", "std_msgs/String instructions", extra=_nonempty),
    Param("instruction_depth", 10, "bounded instruction queue (oldest dropped)", lo=1, hi=1000),
    Param("instruction_durability", "volatile", "instruction subscription durability", choices=_DUR),
    Param("max_instruction_chars", 4000, "longer instructions are rejected", lo=1, hi=1_000_000),
    Param("output_durability", "volatile", "durability of ~/answer and ~/result", choices=_DUR),
    Param("output_depth", 10, "queue depth of ~/answer and ~/result", lo=1, hi=1000),
    Param("cmd_vel_topic", "cmd_vel", "velocity command topic (published only while armed)", extra=_nonempty),
    Param("cmd_vel_stamped", True, "geometry_msgs/TwistStamped (the Jazzy+ diff_drive_controller convention); "
          "false = geometry_msgs/Twist"),
    Param("cmd_vel_frame_id", "base_link", "header.frame_id of TwistStamped velocity commands"),
    Param("answer_stream", True, "publish partial tokens on ~/answer_stream", when="live"),
    Param("actions.file", "", "allowed actions and limits; empty = the installed config/actions.yaml",
          extra=_actions_file),
    Param("actions.mode", "prefix", "prefix | always | off", when="live", choices=("prefix", "always", "off")),
    Param("actions.prefix", "action:", "case-insensitive prefix marking a command"),
    Param("actions.prompt", "{instruction}", "what the model is asked for a command ({instruction}, {schema})",
          extra=_prompt),
    Param("actions.grammar", "auto", "action constraint: auto (xgrammar, else lm-format-enforcer) | xgrammar | lmfe",
          choices=("auto", "xgrammar", "lmfe")),
    Param("actions.max_new_tokens", 64, "longest action JSON", lo=1, hi=1 << 16),
    Param("watchdog_rate", 10.0, "Hz: re-send the active motion, zero it when its duration ends", when="live",
          lo=0.1, hi=1000.0),
    Param("diagnostics_period", 1.0, "seconds between /diagnostics messages", when="live", lo=0.01, hi=3600.0),
    Param("reset_timeout", 5.0, "seconds ~/reset waits for the worker", when="live", lo=0.01, hi=3600.0),
    Param("memory.rate", 1.0, "Hz, at most, of ~/memory and ~/memory_image", lo=1e-3, hi=100.0),
    Param("memory.snapshot", "", "file ~/save writes the whole session to (atomically) and memory.restore resumes "
          "from; empty = saving and restoring off"),
    Param("memory.restore", False, "at configure, resume from memory.snapshot if it exists (another model, cache "
          "config or dtype, or a damaged file: logged, diagnostics WARN, fresh start)"),
    Param("memory.save_timeout", 30.0, "seconds ~/save waits for the worker to write the snapshot", when="live",
          lo=0.01, hi=3600.0),
    Param("memory.recall_frames", 0, "archived frames recalled per question (long-term memory); 0 = off, no archive",
          lo=0, hi=256),
    Param("memory.recall_placement", "past", "where recalled frames sit: past (positions before the held tokens) or "
          "question (right before the question)", choices=("past", "question")),
    Param("memory.archive_mb", 256.0, "bound of the on-disk frame archive in MiB (evenly thinned when full)",
          lo=0.01, hi=float(1 << 24)),
    Param("memory.archive_dir", "", "folder of the frame archive (cleared at configure and reset); empty = "
          "$ROS_HOME/infmllm_ros/archive (~/.ros/...)"),
)
BY_NAME = {p.name: p for p in TABLE}
PARAMS: dict[str, object] = {p.name: p.default for p in TABLE}


def check(name: str, value) -> str | None:
    """Why ``value`` is not valid for parameter ``name``, or None. Unknown names are not ours (use_sim_time)."""
    p = BY_NAME.get(name)
    if p is None:
        return None
    d = p.default
    if isinstance(d, bool):
        if not isinstance(value, bool):
            return f"must be a bool, got {value!r}"
    elif isinstance(d, (int, float)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"must be a number, got {value!r}"
        if isinstance(d, int) and not isinstance(value, int):
            return f"must be an integer, got {value!r}"
        if not math.isfinite(value):
            return f"must be finite, got {value}"
        if (p.lo is not None and value < p.lo) or (p.hi is not None and value > p.hi):
            return f"must be in [{p.lo}, {p.hi}], got {value}"
    elif isinstance(d, list):
        if not isinstance(value, (list, tuple)) or not all(isinstance(s, str) for s in value):
            return f"must be a list of strings, got {value!r}"
    elif not isinstance(value, str):
        return f"must be a string, got {value!r}"
    if p.choices and value not in p.choices:
        return f"must be one of {p.choices}, got {value!r}"
    return p.extra(value) if p.extra is not None else None


def check_all(values: dict) -> dict:
    """Every parameter checked (configure): the values, with generation.stop cleaned; ValueError names the first
    bad parameter."""
    for name in PARAMS:
        why = check(name, values[name])
        if why:
            raise ValueError(f"parameter {name} {why}")
    out = dict(values)
    out["generation.stop"] = [s for s in (out["generation.stop"] or []) if s]
    return out


def descriptor(p: Param):
    from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor, ParameterType

    d = ParameterDescriptor(name=p.name, description=p.description, read_only=p.when == "start")
    d.additional_constraints = {
        "live": "applied at once", "start": "read at process start",
        "configure": "takes effect at configure (rejected while configured: deactivate, cleanup, set, configure)",
    }[p.when] + (f"; one of {', '.join(p.choices)}" if p.choices else "")
    if isinstance(p.default, list):
        d.type = ParameterType.PARAMETER_STRING_ARRAY
    elif isinstance(p.default, bool):
        d.type = ParameterType.PARAMETER_BOOL
    elif isinstance(p.default, int):
        d.type = ParameterType.PARAMETER_INTEGER
        d.integer_range = [IntegerRange(from_value=int(p.lo), to_value=int(p.hi), step=1)]
    elif isinstance(p.default, float):
        d.type = ParameterType.PARAMETER_DOUBLE
        d.floating_point_range = [FloatingPointRange(from_value=float(p.lo), to_value=float(p.hi), step=0.0)]
    else:
        d.type = ParameterType.PARAMETER_STRING
    return d


def declare_all(node) -> dict[str, str]:
    """Declare every row on ``node``. A start-up override that the descriptor refuses (``-p frame_rate:=-5``)
    must not kill the process: the default is declared instead and the reason returned (name -> reason), so
    configure fails and says why until the parameter is set to a valid value."""
    from rclpy.exceptions import InvalidParameterValueException

    bad = {}
    for p in TABLE:
        try:
            node.declare_parameter(p.name, p.default, descriptor(p))
        except InvalidParameterValueException as e:
            node.declare_parameter(p.name, p.default, descriptor(p), ignore_override=True)
            bad[p.name] = f"start-up value refused ({e})"
    return bad


def default_actions_file() -> str:
    """The installed share/infmllm_ros/config/actions.yaml, else the source tree's config/actions.yaml."""
    try:
        from ament_index_python.packages import get_package_share_directory

        p = Path(get_package_share_directory("infmllm_ros")) / "config" / "actions.yaml"
        if p.exists():
            return str(p)
    except Exception:  # not installed through colcon / no AMENT_PREFIX_PATH
        pass
    for base in (Path(sys.prefix) / "share" / "infmllm_ros", Path(__file__).resolve().parents[2]):
        p = base / "config" / "actions.yaml"
        if p.exists():
            return str(p)
    return ""
