"""A Gantt chart of a decode timeline: what the device, the host and each link do over a
few tokens (``moecache timeline ... --figure FILE``)."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from .errors import MoecacheError
from .files import output_lock
from .plots import DPI, FORMATS, save_figure
from .timeline import TimelineResult

KIND_COLORS = {"dense": "#999999", "expert": "#0072B2", "demand fetch": "#D55E00", "prefetch": "#009E73"}


def timeline_figure(result: TimelineResult, path: str | os.PathLike, steps: int = 3,
                    first_step: int = 0, *, overwrite: bool = False) -> list[Path]:
    """Draw ``steps`` steps of ``result`` (run with ``record=True``) from ``first_step`` into
    ``path`` (its suffix: png, pdf or svg), atomically, replacing an existing file only with
    ``overwrite``; returns the file written."""
    if result.events is None:
        raise MoecacheError("the timeline was run without recording its events (record=True)")
    target = Path(path)
    fmt = target.suffix.lstrip(".").lower()
    if fmt not in FORMATS:
        raise MoecacheError(f"{target}: a figure is written as {', '.join(FORMATS)} (by its suffix)")
    events = result.events
    shown = events[(events["step"] >= first_step) & (events["step"] < first_step + steps)].dropna(
        subset=["start"])
    if shown.empty:
        raise MoecacheError(f"the timeline has no step {first_step}")
    resources = ["device"] + (["host"] if (shown["resource"] == "host").any() else []) + [
        link["name"] for link in result.links]
    origin = shown["start"].min()
    fig = Figure(figsize=(11, 1.0 + 0.55 * len(resources)), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    for row, resource in enumerate(resources):
        mine = shown[shown["resource"] == resource]
        for kind, color in KIND_COLORS.items():
            spans = mine[mine["kind"] == kind]
            if len(spans):
                left, width = 1e3 * (spans["start"] - origin), 1e3 * (spans["end"] - spans["start"])
                bars = zip(left, width, strict=True)
                ax.broken_barh(list(bars), (row - 0.35, 0.7), facecolors=color, edgecolors="white",
                               linewidth=0.3)
    _mark_steps(ax, shown, origin)
    ax.set_yticks(range(len(resources)), resources)
    ax.invert_yaxis()
    ax.set_xlabel("time (ms)")
    prefetch = ("no prefetch" if result.prefetch is None
                else f"prefetch {result.prefetch} (depth {result.depth})")
    ax.set_title(f"{result.policy}, capacity {result.capacity}, {result.hardware}"
                 f"{'' if result.model is None else ' / ' + result.model}, {prefetch}: steps "
                 f"{first_step}..{first_step + steps - 1}", fontsize=9)
    ax.legend(handles=[Patch(color=c, label=k) for k, c in KIND_COLORS.items()], loc="upper center",
              bbox_to_anchor=(0.5, -0.35), ncol=4, fontsize=8, frameon=False)
    with output_lock(target):
        if target.is_dir():
            raise MoecacheError(f"{target}: is a folder, expected a figure file path")
        if target.exists() and not overwrite:
            raise MoecacheError(f"{target}: already exists (pass --force to overwrite)")
        return save_figure(fig, target.with_suffix(""), [fmt])


def _mark_steps(ax, shown: pd.DataFrame, origin: float) -> None:
    """A thin line where each step's first dense compute starts."""
    starts = shown[(shown["kind"] == "dense") & (shown["layer"] == shown["layer"].min())]
    for start in starts["start"]:
        ax.axvline(1e3 * (start - origin), color="#333333", linewidth=0.6, linestyle=":")
