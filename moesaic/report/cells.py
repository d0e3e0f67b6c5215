"""How the reports write numbers in table cells: fixed digits, counts with a unit, a Stat as
`mean [low, high]`, p-values; "—" for anything missing or not finite."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from moesaic.analysis.stats import format_interval
from moesaic.jsonsafe import as_float


def num(v: Any, digits: int = 4) -> str:
    x = as_float(v)
    return f"{x:.{digits}f}" if math.isfinite(x) else "—"


def count(v: Any) -> str:
    x = as_float(v)
    if not math.isfinite(x):
        return "—"
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def interval(s: Mapping[str, Any] | None, digits: int = 4, unit: str = "", signed=False) -> str:
    """`mean [low, high]` of a summary Stat ("—" if missing)."""
    if not s:
        return "—"
    low, high = s.get("ci95") or (None, None)
    return format_interval(s.get("mean"), low, high, digits, unit, signed)


def p_value(p: Any) -> str:
    x = as_float(p)
    return "—" if not math.isfinite(x) else ("< 0.001" if x < 0.001 else f"{x:.3f}")
