"""Budget values as people type them: FLOPs counts with K/M/G/T suffixes, and precision lists; shared by the image
and decoder picks (``klas_runtime.runtime``, ``klas_runtime.decoder_pick``)."""
from __future__ import annotations

import math
import re

from klas_runtime.errors import ZooError
from klas_runtime.manifest import PRECISIONS

_SUFFIX = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
_COUNT = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([KMGTkmgt]?)\s*$")
STATS = ("p50", "p90", "p99", "mean")  # latency statistics a budget may be checked against


def parse_count(text: str | float | int, flag: str = "--max-flops") -> float:
    """'40M' -> 4e7; suffixes K/M/G/T (powers of 1000, case-insensitive); plain numbers pass through."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        m = _COUNT.match(str(text))
        if not m:
            raise ZooError(f"{flag} {text!r}: expected a number with an optional K/M/G suffix, e.g. 40M")
        value = float(m.group(1)) * _SUFFIX[m.group(2).upper()]
    if not math.isfinite(value):  # '1e400' overflows to inf, as 'inf' is refused by the pattern
        raise ZooError(f"{flag} {text!r}: expected a finite number with an optional K/M/G suffix, e.g. 40M")
    if value < 0:
        raise ZooError(f"{flag} {text!r}: must not be negative")
    return value


def check_budget(value, flag: str, hi: float | None = None, unit: str = "") -> float | None:
    """A numeric budget flag (``--max-latency-ms``, ``--min-accuracy``, ...) as given: None, or a finite number in
    [0, ``hi``]; else one line blaming the flag (not the zoo: 'nan' fits no comparison, so nothing would fit)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0 \
            or (hi is not None and value > hi):
        span = f"between 0 and {hi:g}" if hi is not None else ">= 0"
        raise ZooError(f"{flag} {value!r}: expected a finite number {span}{unit}")
    return float(value)


def format_count(n: float) -> str:
    """4e7 -> '40.0M' (three significant figures, as budgets are read)."""
    for suffix, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{suffix}"
    return f"{n:.3g}"


def _precisions(value, allowed: tuple[str, ...] = PRECISIONS) -> tuple[str, ...] | None:
    """None, 'int8', 'fp32,int8' or a list of them -> the precisions asked for (checked against ``allowed``, the
    zoo kind's precisions)."""
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else [p for v in value for p in str(v).split(",")]
    got = [p.strip().lower() for p in items if p.strip()]
    bad = [p for p in got if p not in allowed]
    if bad or not got:
        raise ZooError(f"--precision {value!r}: expected one or more of {', '.join(allowed)}")
    return tuple(p for p in allowed if p in got)
