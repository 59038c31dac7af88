"""Parameter-file helpers for the launch file (no ROS imports, so they are unit-tested here).

A params file keyed by the bare node name (``infmllm_node: ros__parameters: ...``, as ``config/robot.yaml``) only
applies to ``/infmllm_node``: once the node is launched into a namespace, rcl no longer matches it and every
parameter silently falls back to its default. :func:`node_parameters` reads such a file and returns the parameter
dict itself, which launch_ros applies to the node whatever its namespace; files keyed otherwise (``/**``, a fully
qualified name) are passed through unchanged, as the user wrote them.
"""

from __future__ import annotations

import yaml


def node_parameters(path: str, node_name: str) -> dict | str:
    """The ``ros__parameters`` dict for ``node_name`` in ``path`` (nested as in the file), or ``path`` itself."""
    with open(path, encoding="utf-8") as f:
        doc = yaml.safe_load(f) or {}
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: a ROS 2 parameters file must be a mapping, got {type(doc).__name__}")
    for key in (node_name, "/" + node_name):
        section = doc.get(key)
        if isinstance(section, dict) and isinstance(section.get("ros__parameters"), dict):
            return section["ros__parameters"]
    return path


def flatten(params: dict, prefix: str = "") -> dict:
    """Nested parameter dict -> {"a.b": value} (what launch_ros does with nested dicts)."""
    out = {}
    for k, v in params.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + str(k)] = v
    return out
