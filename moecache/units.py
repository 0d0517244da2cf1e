"""Parsing of human-written sizes, bandwidths and durations ("8GiB", "4GB/s", "80us")."""

from __future__ import annotations

import re

from .errors import MoecacheError

_BYTE_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
}
_TIME_UNITS = {"": 1.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
_NUMBER = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([a-zA-Zµ]*)\s*$")


def _split(text: str, what: str) -> tuple[float, str]:
    match = _NUMBER.match(str(text))
    if not match:
        raise MoecacheError(f"cannot read {what} {text!r}: expected a number and a unit")
    return float(match.group(1)), match.group(2).lower()


def parse_bytes(text: str | int | float, what: str = "size") -> int:
    """Bytes from '8GiB', '512MB', '1.5G' (K/M/G/T alone are binary) or a plain number."""
    if isinstance(text, (int, float)):
        value, unit = float(text), ""
    else:
        value, unit = _split(text, what)
    if unit not in _BYTE_UNITS:
        raise MoecacheError(f"unknown unit in {what} {text!r}: use B, KB, MB, GB, KiB, MiB or GiB")
    result = int(value * _BYTE_UNITS[unit])
    if result <= 0:
        raise MoecacheError(f"{what} {text!r} must be positive")
    return result


def parse_bandwidth(text: str | int | float) -> float:
    """Bytes per second from '4GB/s', '900MiB/s' or a plain number of bytes per second."""
    cleaned = str(text).strip()
    if cleaned.lower().endswith("/s"):
        cleaned = cleaned[:-2]
    return float(parse_bytes(cleaned, "bandwidth"))


def parse_duration(text: str | int | float) -> float:
    """Seconds from '80us', '1.2ms', '0.5s' or a plain number of seconds."""
    if isinstance(text, (int, float)):
        value, unit = float(text), ""
    else:
        value, unit = _split(text, "duration")
    if unit not in _TIME_UNITS:
        raise MoecacheError(f"unknown time unit in {text!r}: use s, ms, us or ns")
    if value < 0:
        raise MoecacheError(f"duration {text!r} must not be negative")
    return value * _TIME_UNITS[unit]


def format_bytes(count: float) -> str:
    """Binary-prefixed size for tables: 1536 -> '1.50 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.2f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def parse_int_list(text: str, what: str = "capacities") -> list[int]:
    """Integers from '8:64:4' (inclusive range with step), '8:64' (step 1) or '8,16,32'."""
    values: list[int] = []
    try:
        for part in str(text).split(","):
            part = part.strip()
            if ":" in part:
                bounds = [int(x) for x in part.split(":")]
                if len(bounds) not in (2, 3) or (len(bounds) == 3 and bounds[2] <= 0):
                    raise ValueError
                values.extend(range(bounds[0], bounds[1] + 1, bounds[2] if len(bounds) == 3 else 1))
            elif part:
                values.append(int(part))
    except ValueError:
        raise MoecacheError(f"cannot read {what} {text!r}: use START:STOP[:STEP] or a comma list") from None
    if not values:
        raise MoecacheError(f"{what} {text!r} names no value")
    return sorted(set(values))
