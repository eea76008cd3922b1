"""Argument checks shared across the library: bad input fails early with a message naming it.

Example::

    width = check_positive_int("width", width)   # ValueError: width must be a positive integer, got 0
    base = check_positive_number("MuCelo2: base_width", 128)   # 128.0
"""

from __future__ import annotations

from typing import Any


def check_positive_int(name: str, value: Any) -> int:
    """``value`` if it is a positive ``int`` (not a bool), else a ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def check_positive_number(name: str, value: Any) -> float:
    """``float(value)`` if it is a positive ``int`` or ``float`` (not a bool), else a ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a positive number or None, got {value!r}")
    return float(value)
