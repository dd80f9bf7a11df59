"""The report's text primitives: numbers as a person reads them, and HTML escaping (every piece of
text from a summary goes through `esc`)."""

from __future__ import annotations

import math
from html import escape
from typing import Any


def is_num(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def num(value: Any, decimals_below_10: int = 2) -> str:
    if not is_num(value):
        return "—"
    a = abs(value)
    if a >= 100:
        return f"{value:,.0f}"
    if a >= 10:
        return f"{value:.1f}"
    if a >= 0.01 or a == 0:
        return f"{value:.{decimals_below_10}f}"
    return f"{value:.2g}"


def esc(value: Any) -> str:
    return escape(str(value), quote=True)
