"""Human-readable numbers, one convention everywhere: counts in SI (K, M, G), bytes in binary units
(KiB, MiB, GiB)."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["KIB", "MIB", "format_bytes", "format_count", "format_value"]

KIB = 1024
MIB = 1024 ** 2


def format_count(n: float | None) -> str:
    """Short human form with 3 significant digits: 999 -> '999', 4500 -> '4.5K', 1234567 -> '1.23M'."""
    if n is None:
        return "-"
    if isinstance(n, float) and not math.isfinite(n):
        return str(n)
    sign, value = ("-" if n < 0 else ""), abs(n)
    units = ("", "K", "M", "G", "T", "P")
    i = 0
    while value >= 999.5 and i < len(units) - 1:
        value /= 1000.0
        i += 1
    if i == 0 and float(value).is_integer():
        return f"{sign}{int(value)}"
    return f"{sign}{value:.3g}{units[i]}"


def format_bytes(n: float | None) -> str:
    """Binary units: 100 -> '100 B', 1536 -> '1.5 KiB', 4194304 -> '4 MiB'."""
    if n is None:
        return "-"
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    value, i = float(n), 0
    while abs(value) >= 1023.5 and i < len(units) - 1:
        value /= 1024.0
        i += 1
    return f"{value:.0f} B" if i == 0 else f"{value:.3g} {units[i]}"


def format_value(value: Any, spec: str) -> str:
    """``spec.format(value)``, ``-`` for None, a string as it is (an error message in a number column)."""
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return spec.format(value)
