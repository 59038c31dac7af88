"""Shared pieces of the benchmarks: the machine, the git commit, writing results (JSON + markdown + PNG)."""

from __future__ import annotations

import json
import math
import os
import platform
import resource
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
# Results go to the folder a user runs from, never into the installed package: `make bench` in the source tree
# passes --out docs/bench (the committed results).
DEFAULT_OUT = Path("bench_results")
ASSET_MODEL = Path(__file__).resolve().parents[1] / "assets" / "kjv_lm"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict:
    """The machine a benchmark ran on (recorded in every results file)."""
    import torch

    gpu = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu = {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
               "count": torch.cuda.device_count()}
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_avg_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "gpu": gpu,
    }


def _version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return None


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10)
        sha = out.stdout.strip() or "unknown"
        return sha + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def describe_machine(m: dict) -> str:
    gpu = f"{m['gpu']['name']} x{m['gpu']['count']}" if m.get("gpu") else "no GPU"
    load = f", load average {m['load_avg_1min']}" if m.get("load_avg_1min") is not None else ""
    return (f"{m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads{load}), {gpu}; torch {m['torch']}, "
            f"transformers {m['transformers']}; {m['platform']}")


def print_machine(m: dict) -> None:
    print(f"machine: {describe_machine(m)}", flush=True)


def command_line(argv) -> str:
    return "infmllm-bench " + " ".join(str(a) for a in argv)


def md_table(header: list[str], rows: list[list]) -> str:
    def cell(v):
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def wilson(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a binomial rate (95 % for z = 1.96): honest at small n and near 0 or 1."""
    if n <= 0:
        return (0.0, 1.0)
    p, z2 = hits / n, z * z
    centre, half = (p + z2 / (2 * n)), z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return ((centre - half) / (1 + z2 / n), (centre + half) / (1 + z2 / n))


def write_results(out_dir: Path | str, name: str, results: dict, markdown: str) -> dict[str, Path]:
    """Writes <name>.json and <name>.md under out_dir; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{name}.json", "md": out / f"{name}.md"}
    paths["json"].write_text(json.dumps(results, indent=1, sort_keys=False) + "\n")
    paths["md"].write_text(markdown)
    return paths


def finish(out_dir: Path | str, name: str, results: dict, markdown, plot) -> int:
    """A bench's last step: write <name>.json/.md and <name>.png, print the markdown and where it went."""
    text = markdown(results)
    paths = write_results(out_dir, name, results, text)
    plot(results, Path(out_dir) / f"{name}.png")
    print(text)
    print(f"wrote {paths['json']}")
    return 0


def pyplot():
    """matplotlib.pyplot with the Agg backend (no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path) -> None:
    """Lay out, write (100 dpi) and close a matplotlib figure: every benchmark plot ends this way."""
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    pyplot().close(fig)


def style_length_axes(axes, titles) -> None:
    """Log-log panels over stream length (tokens), one title each, with a legend."""
    for ax, title in zip(axes, titles, strict=True):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("stream tokens")
        ax.set_title(title)
        ax.legend(fontsize=7)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (getrusage; Linux reports KiB)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def current_rss_bytes() -> int:
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return peak_rss_bytes()


def pick_device(name: str | None = None):
    import torch

    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def machine_note(m: dict, memory_gib: float | None = None) -> str:
    """'shared 2-core <cpu>, 24 GiB, no GPU' from the machine record (the CPU model changes between sessions)."""
    mem = f", {memory_gib:.0f} GiB" if memory_gib else ""
    gpu = m["gpu"]["name"] if m.get("gpu") else "no GPU"
    return f"shared {m.get('cores')}-core {m.get('cpu')}{mem}, {gpu}"


def memory_gib() -> float | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return None
