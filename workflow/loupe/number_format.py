"""Numbers as people read them, in the card, the logs and the upload plan: one function per kind
of quantity, so that a quantity reads the same wherever it is shown. Python's own `{:,}` (a
count with thousands separators) and `{:.1%}` need no function here.

A missing value (None, or "" as csv.DictReader gives an empty cell) reads as `missing`; NaN
and infinities read as Python writes them ("nan", "inf"): a metric that came out NaN must not
pass for one that was never measured."""

from __future__ import annotations

MISSING = "n/a"


def _number(value) -> float | None:
    """`value` as a float; None where it is missing; ValueError where it is no number."""
    if value is None or value == "":
        return None
    return float(value)


def measured(value, missing: str = MISSING) -> str:
    """A measured or configured value (a cell of metrics.csv, a config float) to 4 significant
    digits, a whole number from 1 up as an integer: 0.1235, 8, 1.5e-05, 262144; text that is no
    number as it is."""
    try:
        v = _number(value)
    except (TypeError, ValueError):
        return str(value)
    if v is None:
        return missing
    return str(int(v)) if v.is_integer() and abs(v) >= 1 else f"{v:.4g}"


def fixed(value, digits: int, missing: str = MISSING) -> str:
    """A score or loss with `digits` digits after the point, so a column of them aligns:
    fixed(0.5, 3) is 0.500."""
    v = _number(value)
    return missing if v is None else f"{v:.{digits}f}"


def tokens(n: int) -> str:
    """A token count as people say it, never rounded: 1B, 10M, 1.5M, but 262,144."""
    for unit, size in (("B", 10**9), ("M", 10**6)):
        if n >= size and n % (size // 10) == 0:
            return f"{n / size:g}{unit}"
    return f"{n:,}"


def size(n: int) -> str:
    """Bytes in decimal units, as the Hub lists file sizes: 512 B, 1.5 KB, 604.0 MB, 2.1 TB."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
