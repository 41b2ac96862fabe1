"""Byte sizes and durations as people write them (``20G``, ``24h``) and read them (``1.5 GiB``)."""

from __future__ import annotations

from typing import Any


def parse_size(text: Any) -> int:
    """``10G``, ``512M``, ``1T``, ``4096`` (or an int) → bytes (binary units); ValueError if not."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text <= 0:
            raise ValueError("must be positive")
        return text
    if not isinstance(text, str):
        raise ValueError("expected a size such as 512M, 20G or 1T")
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(t[-1:], 1)
    try:
        value = float(t[:-1] if mult > 1 else t)
    except ValueError:
        raise ValueError(f"invalid size {text!r}: use e.g. 512M, 20G, 1T") from None
    if not value > 0:
        raise ValueError(f"invalid size {text!r}: must be positive")
    return int(value * mult)


def parse_duration(text: Any) -> float:
    """``90s``, ``30m``, ``24h``, ``7d``, ``0`` or plain seconds → seconds; ValueError if not."""
    t = str(text).strip().lower()
    mult = {"s": 1, "m": 60, "h": 3600, "d": 86400}.get(t[-1:], 0)
    try:
        value = float(t[:-1] if mult else t)
    except ValueError:
        raise ValueError(f"invalid duration {text!r}: use e.g. 90s, 30m, 24h, 7d") from None
    if not 0 <= value < 1e9:
        raise ValueError(f"invalid duration {text!r}: must be 0 or more")
    return value * (mult or 1)


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def count(n: int, word: str) -> str:
    """``1 chunk``, ``2 chunks``."""
    return f"{n} {word}{'' if n == 1 else 's'}"
