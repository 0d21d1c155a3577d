"""Strict JSON for every JSON file and line hpo writes (exports, retrain files, ``--json``
outputs): NaN and ±Infinity are not JSON (JavaScript's and Go's parsers refuse them), so a
non-finite number is written as null and named, with its value, in a ``non_finite`` note beside it.
"""

from __future__ import annotations

import json
import math
from typing import Any

NOTE = "non_finite"


def _finite(value: Any, where: str, notes: dict[str, str]) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        notes[where or "."] = repr(value)  # 'inf', '-inf', 'nan'
        return None
    if isinstance(value, dict):
        return {k: _finite(v, f"{where}.{k}" if where else str(k), notes) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v, f"{where}[{i}]", notes) for i, v in enumerate(value)]
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # NumPy and torch scalars
        return _finite(value.item(), where, notes)
    return value


def strict_dumps(data: Any, *, indent: int | None = 2, sort_keys: bool = False, default=None) -> str:
    """``data`` as strict JSON. Non-finite floats become null; when ``data`` is a mapping, a
    ``non_finite`` key maps each one's path (``value``, ``per_fold[2].test_loss``) to what it was."""
    notes: dict[str, str] = {}
    clean = _finite(data, "", notes)
    if notes and isinstance(clean, dict):
        clean[NOTE] = notes
    return json.dumps(clean, indent=indent, sort_keys=sort_keys, default=default, allow_nan=False)
