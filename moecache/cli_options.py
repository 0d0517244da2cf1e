"""Click option types and the options several commands share, each defined once.

The types give the same input the same checks everywhere (the parsers of
:mod:`moecache.units`); the decorators give an option the same name, type, default and
help in every command that takes it. A help text may be specialised per command; the
name, type and default may not.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import click

from .errors import MoecacheError
from .units import BANDWIDTH_PRESETS, INT64_MAX, parse_bandwidth, parse_bytes, parse_duration
from .validate import SCOPES

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


class Parsed(click.ParamType):
    """A size, bandwidth or duration read by a parser of :mod:`moecache.units`."""

    def __init__(self, name: str, parse: Callable[[Any], Any]) -> None:
        self.name, self.parse = name, parse

    def convert(self, value, param, ctx):
        try:
            return self.parse(value)
        except MoecacheError as err:
            self.fail(str(err), param, ctx)


class FiniteFloat(click.FloatRange):
    """A float option that is finite (never nan or inf) and within the given range."""

    name = "finite float"

    def convert(self, value, param, ctx):
        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return super().convert(number, param, ctx)


SIZE = Parsed("size", parse_bytes)               # bytes: at least 1, fits int64
BANDWIDTH = Parsed("bandwidth", parse_bandwidth)  # bytes per second, or a preset such as ufs4
DURATION = Parsed("duration", parse_duration)     # seconds, finite, >= 0
COUNT = click.IntRange(1, INT64_MAX)               # a positive whole number that fits int64
SEED = click.IntRange(0, INT64_MAX)                # every seeded command takes 0 <= seed < 2**63


def combine(*decorators: Decorator) -> Decorator:
    """One decorator applying ``decorators`` so that --help lists them in the given order."""
    def apply(command: Callable[..., Any]) -> Callable[..., Any]:
        for decorator in reversed(decorators):
            command = decorator(command)
        return command

    return apply


# -- the cache: scope, budget, capacities ------------------------------------------------------------

scope_option = click.option("--scope", type=click.Choice(SCOPES), default="layer", show_default=True,
                            help="One cache per MoE layer, or one pool shared by all layers.")
memory_option = click.option("--memory", type=SIZE,
                             help="Byte budget instead of --capacity, e.g. 8GiB (uses expert_bytes).")


def capacity_option(help: str = "Experts the cache holds (per layer in layer scope).") -> Decorator:
    """``--capacity``/``-c``: one capacity in experts."""
    return click.option("--capacity", "-c", type=COUNT, help=help)


def capacities_option(flag: str = "--capacities", default: str | None = None) -> Decorator:
    """Capacities as a range or list, read by :func:`moecache.validate.chosen_capacities`
    (``compare`` names it ``--capacity`` and gives a default)."""
    every = " (default: every valid capacity)" if default is None else ""
    return click.option(flag, "capacities", default=default, show_default=default is not None,
                        help=f"START:STOP[:STEP] or a list, e.g. 8:64:4{every}; ranges stop where every "
                             "expert fits.")


per_token_option = click.option("--per-token", is_flag=True,
                                help="Every token is its own step (no prefill or batch unions).")
stream_option = click.option(
    "--stream/--no-stream", default=None,
    help="Read the trace a span of steps at a time, in bounded memory (same numbers, slower). "
         "Default: stream when an in-memory replay would need more than a quarter of this "
         "machine's memory.")

# -- I/O time ------------------------------------------------------------------------------------------

bandwidth_option = click.option(
    "--bandwidth", type=BANDWIDTH,
    help=f"Fetch bandwidth for I/O time, e.g. 4GB/s or a preset ({', '.join(BANDWIDTH_PRESETS)}).")
bandwidths_option = click.option(
    "--bandwidth", "bandwidths", default="ufs4,nvme4,pcie4x16", show_default=True,
    help=f"Profiles: presets ({', '.join(BANDWIDTH_PRESETS)}) or values like 3GB/s.")
latency_option = click.option("--latency", type=DURATION, default="0", show_default=True,
                              help="Fixed cost per fetched expert, e.g. 80us.")
io_options = combine(bandwidth_option, latency_option)


def seed_option(help: str = "Seed of the random policy.") -> Decorator:
    """``--seed``: 0 <= seed < 2**63 in every command."""
    return click.option("--seed", type=SEED, default=0, show_default=True, help=help)


# -- output ----------------------------------------------------------------------------------------------

def out_option(help: str, *, required: bool = False, folder: bool = False) -> Decorator:
    """``--out``/``-o``: a file to write (or, with ``folder``, a folder)."""
    kind = click.Path(file_okay=False) if folder else click.Path(dir_okay=False)
    return click.option("--out", "-o", required=required, type=kind, help=help)


def force_option(help: str = "Overwrite --out if it exists.") -> Decorator:
    return click.option("--force", is_flag=True, help=help)


def json_option(help: str = "Print JSON records instead of a table.") -> Decorator:
    return click.option("--json", "as_json", is_flag=True, help=help)
