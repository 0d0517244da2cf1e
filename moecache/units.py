"""Parsing of human-written sizes, bandwidths and durations ("8GiB", "4GB/s", "80us").

Every parser rejects what would later become a wrong number or a crash: sizes are
whole, positive and fit int64; bandwidths are such a size per second or a named
storage profile (:data:`BANDWIDTH_PRESETS`); durations are finite and not negative.
"""

from __future__ import annotations

import math
import numbers
import re

from .errors import MoecacheError

INT64_MAX = 2**63 - 1
MAX_LIST = 1_000_000  # values a list or range of integers may name
MAX_SECONDS = 1e12  # a duration beyond 30,000 years is a typo

# Nominal sequential-read bandwidths; pass a measured figure ("3.1GB/s") for real numbers.
BANDWIDTH_PRESETS = {
    "ufs3.1": ("UFS 3.1", 2.1e9),
    "ufs4": ("UFS 4.0", 4.2e9),
    "nvme3": ("NVMe PCIe Gen3 x4", 3.5e9),
    "nvme4": ("NVMe PCIe Gen4 x4", 7.0e9),
    "nvme5": ("NVMe PCIe Gen5 x4", 14.0e9),
    "pcie4x16": ("PCIe 4.0 x16 (host to GPU)", 25.0e9),
    "pcie5x16": ("PCIe 5.0 x16 (host to GPU)", 50.0e9),
}

_BYTE_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
}
_TIME_UNITS = {"": 1.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
_NUMBER = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([a-zA-Zµ]*)\s*$")


def _split(text: str | int | float, what: str) -> tuple[int | float, str]:
    """(finite value, lower-case unit) of ``text``; a plain number has the unit ''. Whole
    numbers stay exact integers."""
    value: int | float
    if isinstance(text, numbers.Integral) and not isinstance(text, bool):
        value, unit = int(text), ""
    elif isinstance(text, float):
        value, unit = text, ""
    else:
        match = _NUMBER.match(str(text))
        if not match:
            raise MoecacheError(f"cannot read {what} {text!r}: expected a number and a unit")
        number, unit = match.group(1), match.group(2).lower()
        value = int(number) if number.isdigit() else float(number)
    if isinstance(value, float) and not math.isfinite(value):  # integers are exact, however long
        raise MoecacheError(f"{what} {text!r} must be a finite number")
    return value, unit


def parse_bytes(text: str | int | float, what: str = "size") -> int:
    """Bytes from '8GiB', '512MB', '1.5G' (K/M/G/T alone are binary) or a plain number.

    The result is at least 1 byte and fits int64, so traces and tables can store it.
    """
    value, unit = _split(text, what)
    if unit not in _BYTE_UNITS:
        raise MoecacheError(f"unknown unit in {what} {text!r}: use B, KB, MB, GB, KiB, MiB or GiB")
    scaled = value * _BYTE_UNITS[unit]
    if scaled > INT64_MAX:
        raise MoecacheError(f"{what} {text!r} is too large: at most {INT64_MAX} bytes (8 EiB)")
    result = int(scaled)
    if result <= 0:
        raise MoecacheError(f"{what} {text!r} must be at least 1 byte")
    return result


def parse_bandwidth(text: str | int | float) -> float:
    """Bytes per second from a preset name ('ufs4', see :data:`BANDWIDTH_PRESETS`), '4GB/s',
    '900MiB/s' or a plain number of bytes per second."""
    return bandwidth_profile(text)[1]


def bandwidth_profile(text: str | int | float) -> tuple[str, float]:
    """(label, bytes per second) for a preset name or a custom value such as 3GB/s (whose
    label is the text itself). A rate keeps its fraction: it is not a size."""
    cleaned = str(text).strip()
    if cleaned.lower() in BANDWIDTH_PRESETS:
        return BANDWIDTH_PRESETS[cleaned.lower()]
    value = cleaned[:-2] if cleaned.lower().endswith("/s") else cleaned
    try:
        number, unit = _split(value if isinstance(text, str) else text, "bandwidth")
        if unit not in _BYTE_UNITS:
            raise MoecacheError(f"unknown unit in bandwidth {text!r}: use B/s, KB/s, MB/s, GB/s, MiB/s "
                                "or GiB/s")
        try:
            rate = float(number) * _BYTE_UNITS[unit]
        except OverflowError:  # an integer of hundreds of digits
            rate = math.inf
        if not math.isfinite(rate):
            raise MoecacheError(f"bandwidth {value!r} must be a finite number")
        if rate < 1:
            raise MoecacheError(f"bandwidth {value!r} must be at least 1 byte per second")
        return cleaned, rate
    except MoecacheError as err:
        raise MoecacheError(f"{err}; or a preset: {', '.join(BANDWIDTH_PRESETS)}") from None


def parse_duration(text: str | int | float) -> float:
    """Seconds from '80us', '1.2ms', '0.5s' or a plain number of seconds (finite, >= 0)."""
    value, unit = _split(text, "duration")
    if unit not in _TIME_UNITS:
        raise MoecacheError(f"unknown time unit in {text!r}: use s, ms, us or ns")
    if value < 0:
        raise MoecacheError(f"duration {text!r} must not be negative")
    seconds = value * _TIME_UNITS[unit] if value <= MAX_SECONDS else math.inf
    if not math.isfinite(seconds) or seconds > MAX_SECONDS:
        raise MoecacheError(f"duration {text!r} is too long: at most {MAX_SECONDS:.0e} s")
    return seconds


def check_seed(seed: int) -> int:
    """``seed`` if it is a whole number in [0, 2**63), the range every seeded command takes."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed <= INT64_MAX:
        raise MoecacheError(f"seed must be a whole number from 0 to 2**63 - 1, got {seed!r}")
    return int(seed)


def format_bytes(count: float) -> str:
    """Binary-prefixed size for tables: 1536 -> '1.50 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.2f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def parse_int_list(text: str, what: str = "capacities", *, high: int | None = None) -> list[int]:
    """Integers from '8:64:4' (inclusive range with step), '8:64' (step 1) or '8,16,32'.

    Every value must fit int64. A range stops at ``high`` when given (for capacities:
    past the point where every expert fits, every row is the same), though never before
    its start; at most :data:`MAX_LIST` values in all, so a mistyped bound is an error,
    not a hang.
    """
    spans: list[range] = []
    try:
        for part in str(text).split(","):
            part = part.strip()
            if ":" in part:
                bounds = [int(x) for x in part.split(":")]
                if len(bounds) not in (2, 3) or (len(bounds) == 3 and bounds[2] <= 0):
                    raise ValueError
                start, stop = bounds[0], bounds[1]
                if high is not None:
                    stop = min(stop, max(start, high))
                spans.append(range(start, stop + 1, bounds[2] if len(bounds) == 3 else 1))
            elif part:
                value = int(part)
                spans.append(range(value, value + 1))
    except ValueError:
        raise MoecacheError(f"cannot read {what} {text!r}: use START:STOP[:STEP] or a comma list") from None
    spans = [span for span in spans if len(span)]
    if not spans:
        raise MoecacheError(f"{what} {text!r} names no value")
    if sum(len(span) for span in spans) > MAX_LIST:
        raise MoecacheError(f"{what} {text!r} names more than {MAX_LIST:,} values")
    if max(span[-1] for span in spans) > INT64_MAX or min(span[0] for span in spans) < -INT64_MAX - 1:
        raise MoecacheError(f"{what} {text!r}: every value must fit a 64-bit integer")
    return sorted({value for span in spans for value in span})
