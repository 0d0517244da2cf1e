"""Figures from a sweep's results table (``moecache plot RESULTS --out DIR``).

:func:`plot_results` writes, as PNG and PDF (each file atomically):

- ``hit_rate_vs_capacity``: hit rate (%) against cache capacity, one panel per scope,
  a colour per router (trace) and a line style per policy; ``opt`` (Belady, dashed) is
  the upper bound and a dotted horizontal line marks each router's reuse rate.
- ``bytes_per_token_vs_capacity``: MiB fetched per token against capacity (skipped with
  a note when the traces carry no expert sizes).
- ``reuse_vs_window``: share of a step's experts used within the previous w steps,
  w = 1..W (:func:`moecache.locality.reuse_by_window`), one line per router.
- ``per_layer_reuse``: reuse rate per MoE layer, grouped bars, one bar per router.

The last two need the traces themselves (the table only holds pooled numbers): by
default the trace paths named in the table, looked up as given and then beside the
results file. ``bootstrap=N`` adds percentile bands from N resamples of each trace's
sequences (:mod:`moecache.locality`); hit-rate and bytes bands are drawn for the
one-pass policies (lru, lfu, opt), whose curves cost one stack pass per resample:
``bootstrap=N`` costs about N times the lru/lfu/opt part of the sweep that made the
table, spread over ``workers`` threads.
Matplotlib is used through its object API with the Agg canvas: no display, no global
pyplot state.
"""

from __future__ import annotations

import contextlib
import os
import textwrap
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from moecache.policies import REGISTRY

from .curve import STACK_POLICIES, fetched_bytes, stack_hits
from .errors import MoecacheError
from .files import atomic_write, output_lock, remove_stale_temps, write_errors
from .locality import bootstrap_band, bootstrap_over_sequences, per_layer_reuse, reuse_by_window
from .requests import Requests
from .tables import read_table
from .trace import Trace

REQUIRED_COLUMNS = ("trace", "policy", "scope", "capacity", "hit_rate", "reuse_rate")
FIGURES = ("hit_rate_vs_capacity", "bytes_per_token_vs_capacity", "reuse_vs_window", "per_layer_reuse")
FORMATS = ("png", "pdf", "svg")
MAX_WINDOW = 4096  # steps of the reuse-by-window figure; farther windows are flat on real traces
MAX_BOOTSTRAP = 100_000  # resamples; each costs about one sweep of the trace's lru/lfu/opt cells
MIB = 2**20
DPI = 150

# Okabe-Ito: distinguishable in colour-blind vision and in print
_COLORS = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442"]
# from the policy registry: line styles, legend labels, legend order (online policies first)
_POLICY_STYLES: dict[str, dict[str, Any]] = {name: dict(p.style) for name, p in REGISTRY.items()}
_POLICY_LABELS = {name: p.legend for name, p in REGISTRY.items() if p.legend}
_POLICY_ORDER = tuple(REGISTRY)
_REUSE_STYLE = {"linestyle": ":", "linewidth": 1.6}
_SCOPE_TITLES = {"layer": "per-layer caches (scope = layer)",
                 "global": "one pool shared by all layers (scope = global)"}


class PlotNote(UserWarning):
    """Something :func:`plot_results` left out, and why (a missing trace, no expert sizes)."""


@dataclass(eq=False)
class _Series:
    """One router's routing: a trace (as named in the table) at one step mode."""

    name: str
    per_token: bool
    rows: pd.DataFrame
    label: str = ""
    color: str = "#000000"
    router: str | None = None
    model: str | None = None
    trace: Trace | None = None
    bands: dict = field(default_factory=dict)

    def first(self, column: str) -> Any:
        if column not in self.rows or not self.rows[column].notna().any():
            return None
        return self.rows[column].dropna().iloc[0]


def plot_results(
    results: str | os.PathLike | pd.DataFrame,
    out_dir: str | os.PathLike,
    *,
    traces: Iterable[str | os.PathLike] | None = None,
    bootstrap: int = 0,
    max_window: int = 16,
    formats: Sequence[str] = ("png", "pdf"),
    seed: int = 0,
    level: float = 0.95,
    workers: int | None = None,
    on_note: Callable[[str], None] | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """Write the figures of a results table into ``out_dir``; returns the files written.

    ``results`` is a table from ``moecache sweep`` (.parquet or .csv path, or a DataFrame).
    ``traces`` names the trace files for the routing figures (default: the table's own
    trace paths that exist); a trace is matched to table rows by path, else by file name.
    ``bootstrap`` > 0 draws ``level`` percentile bands from that many resamples of
    sequences (seeded by ``seed``, resamples run on ``workers`` threads, None = one per
    CPU); ``max_window`` is W of the reuse-by-window figure (at most :data:`MAX_WINDOW`).
    Skipped figures and bands are reported through ``on_note`` (default: a PlotNote warning).
    A folder already holding figures of these names (any format) is refused unless
    ``overwrite``; then the figures this run does not write (other formats, figures
    skipped now) are removed, so none is left stale. The folder's write lock is held; a
    folder this call creates is removed again if it fails.
    """
    note = on_note or (lambda message: warnings.warn(message, PlotNote, stacklevel=3))
    formats = _check_formats(formats)
    if not 1 <= int(max_window) <= MAX_WINDOW:
        raise MoecacheError(f"--window must be from 1 to {MAX_WINDOW} steps, got {max_window}")
    if not 0 <= int(bootstrap) <= MAX_BOOTSTRAP:
        raise MoecacheError(f"--bootstrap must be from 0 to {MAX_BOOTSTRAP} resamples, got {bootstrap}")
    if not 0.0 < level < 1.0:
        raise MoecacheError(f"the confidence level must lie in (0, 1), got {level}")
    out = Path(out_dir)
    with output_lock(out):
        if out.exists() and not out.is_dir():
            raise MoecacheError(f"{out}: exists and is not a folder")
        for name in FIGURES if out.is_dir() else ():
            for fmt in FORMATS:
                remove_stale_temps(out / f"{name}.{fmt}")
        earlier = _our_figures(out)
        if earlier and not overwrite:
            raise MoecacheError(f"{out}: holds figures of an earlier plot ({earlier[0].name}); "
                                "pass --force to replace them")
        created = not out.exists()
        try:
            written = _plot(results, out, traces, int(bootstrap), int(max_window), formats, seed, level,
                            workers, note)
        except BaseException:
            if created:  # a failed or interrupted plot leaves no folder it made
                for figure in _our_figures(out):
                    figure.unlink()
                with contextlib.suppress(OSError):
                    out.rmdir()
            raise
        for stale in set(_our_figures(out)) - set(written):
            with write_errors(stale):
                stale.unlink()
    return written


def _our_figures(out: Path) -> list[Path]:
    """The figure files (any format) a plot writes that exist in ``out``."""
    if not out.is_dir():
        return []
    return sorted(path for name in FIGURES for fmt in FORMATS if (path := out / f"{name}.{fmt}").exists())


def _plot(results: str | os.PathLike | pd.DataFrame, out: Path, traces: Iterable[str | os.PathLike] | None,
          bootstrap: int, max_window: int, formats: list[str], seed: int, level: float,
          workers: int | None, note: Callable[[str], None]) -> list[Path]:
    table, base_dir = _load_results(results)
    series = _series_from_table(table)
    _attach_traces(series, traces, base_dir, note)
    _label(series)
    if bootstrap:
        for s in series:
            _bootstrap(s, bootstrap, max_window, seed, level, workers, note)

    written: list[Path] = []
    figures = {
        "hit_rate_vs_capacity": lambda: _hit_rate_figure(series, table, bootstrap, level),
        "bytes_per_token_vs_capacity": lambda: _bytes_figure(series, table, bootstrap, level, note),
        "reuse_vs_window": lambda: _window_figure(series, max_window, bootstrap, level, note),
        "per_layer_reuse": lambda: _layer_figure(series, bootstrap, level, note),
    }
    for name, make in figures.items():
        fig = make()
        if fig is not None:
            written += save_figure(fig, out / name, formats)
    return written


# -- input -----------------------------------------------------------------------------------

def _check_formats(formats: Sequence[str]) -> list[str]:
    chosen = [str(f).lower().lstrip(".") for f in ([formats] if isinstance(formats, str) else formats)]
    bad = [f for f in chosen if f not in FORMATS]
    if bad or not chosen:
        what = bad[0] if bad else ""
        raise MoecacheError(f"unknown figure format {what!r}: choose from {', '.join(FORMATS)}")
    return list(dict.fromkeys(chosen))


def _load_results(results: str | os.PathLike | pd.DataFrame) -> tuple[pd.DataFrame, Path | None]:
    if isinstance(results, pd.DataFrame):
        table, where, base_dir = results.copy(), "results table", None
    else:
        path = Path(results)
        if path.is_dir():
            raise MoecacheError(f"{path}: is a folder, expected a results table (.parquet or .csv)")
        table, where, base_dir = read_table(path), str(path), path.parent
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise MoecacheError(f"{where}: not a moecache sweep table: missing column"
                            f"{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))}")
    if table.empty:
        raise MoecacheError(f"{where}: the results table is empty: nothing to plot")
    table = table.copy()
    table["trace"] = table["trace"].astype(str)
    table["policy"] = table["policy"].astype(str)
    table["scope"] = table["scope"].astype(str)
    table["per_token"] = _as_bool(table["per_token"]) if "per_token" in table else False
    for column in ("capacity", "hit_rate", "reuse_rate", "bytes_per_token"):
        if column in table:
            table[column] = pd.to_numeric(table[column], errors="coerce")
    table = table.dropna(subset=["capacity", "hit_rate"])
    if table.empty:
        raise MoecacheError(f"{where}: no row has both a capacity and a hit rate: nothing to plot")
    keys = ["trace", "per_token", "policy", "scope", "capacity"]
    table = table.drop_duplicates(keys, keep="last").sort_values(keys, ignore_index=True)
    return table, base_dir


def _as_bool(column: pd.Series) -> pd.Series:
    if column.dtype == bool:
        return column
    return column.astype(str).str.strip().str.lower().isin(("true", "1", "yes"))


def _series_from_table(table: pd.DataFrame) -> list[_Series]:
    series = []
    for (name, per_token), rows in table.groupby(["trace", "per_token"], sort=False):
        s = _Series(name=name, per_token=bool(per_token), rows=rows)
        s.router, s.model = s.first("router"), s.first("model")
        series.append(s)
    return series


def _attach_traces(series: list[_Series], traces: Iterable | None, base_dir: Path | None,
                   note: Callable[[str], None]) -> None:
    if traces is None:
        for s in series:
            found = _find(s.name, base_dir)
            if found is None:
                note(f"{s.name}: trace not found; it is left out of the reuse figures")
                continue
            try:
                s.trace = _load_trace(found)
            except MoecacheError as err:
                note(f"{err}; it is left out of the reuse figures")
        return
    for given in traces:
        path = Path(given)
        trace = _load_trace(path)  # the user named it: a bad file is an error
        matches = [s for s in series if _same_file(s.name, path, base_dir)]
        if not matches:
            matches = [s for s in series if Path(s.name).name == path.name]
        if not matches:
            names = sorted({s.name for s in series})
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            raise MoecacheError(f"--traces {path}: not a trace of the results table (it holds {shown})")
        for s in matches:
            s.trace = trace


def _find(name: str, base_dir: Path | None) -> Path | None:
    candidates = [Path(name)]
    if base_dir is not None and not Path(name).is_absolute():
        candidates.append(base_dir / name)
    return next((p for p in candidates if p.exists()), None)


def _same_file(name: str, path: Path, base_dir: Path | None) -> bool:
    found = _find(name, base_dir)
    try:
        return found is not None and path.exists() and os.path.samefile(found, path)
    except OSError:
        return False


def _load_trace(path: Path) -> Trace:
    return Trace.load(path, weights=False, lookahead=False)


def _label(series: list[_Series]) -> None:
    """Legend names: the router label, made unique with the model, then the file name."""
    bases = [s.router or Path(s.name).stem for s in series]
    labels = list(bases)
    for i, s in enumerate(series):
        twins = [j for j, b in enumerate(bases) if b == bases[i] and series[j].per_token == s.per_token]
        if len(twins) > 1 and len({series[j].model for j in twins}) == len(twins):
            labels[i] = f"{bases[i]} · {s.model}"
        elif len(twins) > 1:
            labels[i] = f"{bases[i]} ({Path(s.name).stem})"
    if len({s.per_token for s in series}) > 1:
        labels = [f"{lab}, per token" if s.per_token else lab for lab, s in zip(labels, series, strict=True)]
    order = sorted(range(len(series)), key=lambda i: labels[i])
    for rank, i in enumerate(order):
        series[i].label = labels[i]
        series[i].color = _COLORS[rank % len(_COLORS)]
    series.sort(key=lambda s: s.label)


# -- bootstrap -------------------------------------------------------------------------------

def _bootstrap(s: _Series, n: int, max_window: int, seed: int, level: float, workers: int | None,
               note: Callable[[str], None]) -> None:
    if s.trace is None:
        return
    cells = {}
    if len(s.rows):
        for (policy, scope), rows in s.rows.groupby(["policy", "scope"], sort=False):
            if policy in STACK_POLICIES:
                cells[(policy, scope)] = sorted(int(c) for c in rows["capacity"])
    skipped = sorted({p for p in s.rows.get("policy", []) if p not in STACK_POLICIES})
    if skipped:
        note(f"{s.label}: no bootstrap bands for {', '.join(skipped)} (one replay per capacity "
             "and resample would be needed); bands cover lru, lfu and opt")

    def statistic(trace: Trace) -> dict:
        req = Requests.from_trace(trace, per_token=s.per_token)
        out: dict[Any, np.ndarray] = {
            "window": reuse_by_window(trace, max_window, requests=req)["reuse"].to_numpy(),
            "layer": per_layer_reuse(trace, requests=req)["reuse"].to_numpy(),
        }
        for (policy, scope), capacities in cells.items():
            out[("hit_rate", policy, scope)], out[("bytes_per_token", policy, scope)] = curve_at(
                trace, req, policy, scope, capacities)
        return out

    try:
        samples = bootstrap_over_sequences(s.trace, statistic, n, seed, workers=workers)
    except MoecacheError as err:
        note(f"{err}; no confidence bands for {s.label}")
        return
    s.bands = {key: bootstrap_band(values, level) for key, values in samples.items()}


def curve_at(trace: Trace, req: Requests, policy: str, scope: str,
             capacities: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Hit rate and bytes per token at ``capacities``: ``curve``'s numbers from its stack
    pass, without building a result row per capacity (the bootstrap's inner loop)."""
    sizes = trace.expert_bytes
    cumulative = stack_hits(req, policy, scope, sizes)
    hits = cumulative[np.minimum(np.asarray(capacities), len(cumulative) - 1)]
    layer_requests = req.layer_totals["requests"]
    hit_rate = hits.sum(axis=1) / max(int(layer_requests.sum()), 1)
    if sizes is None or not req.num_tokens:
        return hit_rate, np.full(len(capacities), np.nan)
    return hit_rate, fetched_bytes(hits, layer_requests, sizes) / req.num_tokens


# -- figures ---------------------------------------------------------------------------------

LEGEND_WIDTH = 2.7  # inches: a column right of the panels, under the title


def _new_figure(panels: int, panel_width: float, height: float = 4.6) -> tuple[Figure, list, Any]:
    """A figure of ``panels`` axes side by side and a legend column; (figure, axes, legend axes).

    Legends live in their own axes so that they never cover a line nor the title.
    """
    fig = Figure(figsize=(panels * panel_width + LEGEND_WIDTH, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = list(fig.subplots(1, panels + 1, width_ratios=[panel_width] * panels + [LEGEND_WIDTH]))
    legend_ax = axes.pop()
    legend_ax.axis("off")
    return fig, axes, legend_ax


def _legend(legend_ax, handles: list, title: str, top: bool = True, **kwargs: Any) -> None:
    legend = legend_ax.legend(handles=handles, title=title, loc="upper left" if top else "lower left",
                              bbox_to_anchor=(0.0, 1.0 if top else 0.0), borderaxespad=0.0,
                              fontsize=8, title_fontsize=9, frameon=False, **kwargs)
    legend.set_alignment("left")
    legend_ax.add_artist(legend)


def _describe_models(series: list[_Series]) -> str:
    """'model X · 8 MoE layers · 64 experts · top-8' (what the series share)."""
    models = sorted({str(s.model) for s in series if s.model is not None})
    text = ("model " + ", ".join(models)) if models else "model not recorded"
    shapes = set()
    for s in series:
        if s.trace is not None:
            shapes.add((s.trace.num_layers, s.trace.num_experts, s.trace.top_k))
        else:
            shape = tuple(s.first(c) for c in ("num_layers", "num_experts", "top_k"))
            if None not in shape:
                shapes.add(tuple(int(v) for v in shape))
    if len(shapes) == 1:
        layers, experts, top_k = shapes.pop()
        text += f" · {layers} MoE layers · {experts} experts · top-{top_k}"
    return text


def _caption(fig: Figure, lines: list[str]) -> None:
    """Notes under the plots, wrapped to the figure's width, with room kept for them."""
    if not lines:
        return
    columns = int(fig.get_figwidth() * 15.5)  # characters of 8 pt text per line
    lines = [row for line in lines for row in textwrap.wrap(line, columns, subsequent_indent="  ")]
    height = fig.get_figheight()
    share = min(0.35, (0.2 + 0.15 * len(lines)) / height)
    fig.get_layout_engine().set(rect=(0, share, 1, 1 - share))
    fig.text(0.01, share * 0.45, "\n".join(lines), ha="left", va="center", fontsize=8, color="#333333")


def _band_note(bootstrap: int, level: float) -> str:
    return (f"Shaded: {level:.0%} percentile bootstrap interval over {bootstrap} resamples "
            "of the trace's sequences (drawn with replacement).")


def _capacity_axis(ax, scope: str, series: list[_Series]) -> None:
    totals = set()
    for s in series:
        experts, layers = s.first("num_experts"), s.first("num_layers")
        if s.trace is not None:
            experts, layers = s.trace.num_experts, s.trace.num_layers
        if experts is not None and layers is not None:
            totals.add(int(experts) * (int(layers) if scope == "global" else 1))
    if scope == "global":
        ax.set_xlabel("cache capacity (experts, one pool for all layers)")
    else:
        ax.set_xlabel("cache capacity (experts per layer)")
    if len(totals) == 1:
        total = totals.pop()
        top = ax.secondary_xaxis("top", functions=(lambda c: 100.0 * np.asarray(c) / total,
                                                   lambda p: np.asarray(p) * total / 100.0))
        where = "of all layers' experts" if scope == "global" else "of a layer's experts"
        top.set_xlabel(f"% {where} cached", fontsize=8)
        top.tick_params(labelsize=8)


def _policy_handles(policies: list[str], with_reuse: bool) -> list[Line2D]:
    handles = [Line2D([], [], color="#444444", label=_POLICY_LABELS.get(p, p), **policy_style(p, 2))
               for p in policies]
    if with_reuse:
        handles.append(Line2D([], [], color="#444444", label="reuse rate (routing only)", **_REUSE_STYLE))
    return handles


def _router_handles(series: list[_Series]) -> list[Patch]:
    return [Patch(color=s.color, label=s.label) for s in series]


def _legends(legend_ax, series: list[_Series], policies: list[str], with_reuse: bool) -> None:
    _legend(legend_ax, _router_handles(series), "router")
    if policies or with_reuse:
        _legend(legend_ax, _policy_handles(policies, with_reuse), "policy", top=False, handlelength=4)


def policy_style(policy: str, points: int) -> dict[str, Any]:
    """Line style of ``policy`` from the registry, with markers spaced for ``points`` points."""
    style = dict(_POLICY_STYLES.get(policy, {"linestyle": "-", "marker": "v"}))
    style.setdefault("linewidth", 1.5)
    if style.get("marker"):
        style["markevery"] = max(1, points // 8)
        style["markersize"] = 4
        style["markerfacecolor"] = "white"
    return style


def _policies(table: pd.DataFrame) -> list[str]:
    present = list(dict.fromkeys(table["policy"]))
    return sorted(present, key=lambda p: (_POLICY_ORDER.index(p) if p in _POLICY_ORDER else -1, p))


def _scopes(table: pd.DataFrame) -> list[str]:
    present = list(dict.fromkeys(table["scope"]))
    return sorted(present, key=lambda s: (s != "layer", s))


def _curve_figure(series: list[_Series], table: pd.DataFrame, column: str, scale: float,
                  with_reuse: bool) -> tuple[Figure, list, bool]:
    """Panels per scope of ``column`` x ``scale`` against capacity; (figure, axes, banded)."""
    scopes, policies = _scopes(table), _policies(table)
    fig, axes, legend_ax = _new_figure(len(scopes), 5.2)
    banded, drawn_series, drawn_policies = False, set(), set()
    for ax, scope in zip(axes, scopes, strict=True):
        for s in series:
            for policy in policies:
                rows = s.rows[(s.rows["policy"] == policy) & (s.rows["scope"] == scope)]
                rows = rows[rows[column].notna()] if column in rows else rows.iloc[0:0]
                if rows.empty:
                    continue
                x = rows["capacity"].to_numpy(float)
                ax.plot(x, rows[column].to_numpy(float) * scale, color=s.color,
                        **policy_style(policy, len(x)))
                drawn_series.add(id(s))
                drawn_policies.add(policy)
                band = s.bands.get((column, policy, scope))
                if band is not None and np.isfinite(band[0]).any():
                    ax.fill_between(x, band[0] * scale, band[1] * scale, color=s.color, alpha=0.15,
                                    linewidth=0)
                    banded = True
            if with_reuse and s.first("reuse_rate") is not None and len(s.rows[s.rows["scope"] == scope]):
                ax.axhline(100.0 * float(s.first("reuse_rate")), color=s.color, **_REUSE_STYLE)
        ax.set_title(_SCOPE_TITLES.get(scope, f"scope = {scope}"), fontsize=10)
        _capacity_axis(ax, scope, series)
        ax.grid(True, alpha=0.3)
        ax.margins(x=0.02)
    _legends(legend_ax, [s for s in series if id(s) in drawn_series],
             [p for p in policies if p in drawn_policies], with_reuse)
    return fig, axes, banded


def _hit_rate_figure(series: list[_Series], table: pd.DataFrame, bootstrap: int, level: float) -> Figure:
    fig, axes, banded = _curve_figure(series, table, "hit_rate", 100.0, with_reuse=True)
    for ax in axes:
        ax.set_ylim(0, 100)
    axes[0].set_ylabel("hit rate (% of expert requests)")
    fig.suptitle(f"Expert-cache hit rate vs cache capacity\n{_describe_models(series)}", fontsize=11)
    lines = ["Dashed: opt (Belady), the offline optimum and the upper bound of every demand-fetch policy.",
             "Dotted: the router's reuse rate, the share of a step's experts the previous step also used "
             "(with per-layer LRU and capacity >= K, LRU hits at least these)."]
    if banded:
        lines.append(_band_note(bootstrap, level))
    _caption(fig, lines)
    return fig


def _bytes_figure(series: list[_Series], table: pd.DataFrame, bootstrap: int, level: float,
                  note: Callable[[str], None]) -> Figure | None:
    if "bytes_per_token" not in table or not table["bytes_per_token"].notna().any():
        note("bytes_per_token_vs_capacity skipped: the traces record no expert_bytes, "
             "so bytes per token are unknown")
        return None
    missing = sorted({s.label for s in series if len(s.rows) and not s.rows["bytes_per_token"].notna().any()})
    if missing:
        note(f"bytes_per_token_vs_capacity: no expert sizes for {', '.join(missing)}; left out")
    fig, axes, banded = _curve_figure(series, table, "bytes_per_token", 1.0 / MIB, with_reuse=False)
    for ax in axes:
        ax.set_ylim(bottom=0)
    axes[0].set_ylabel("expert bytes fetched per token (MiB)")
    fig.suptitle(f"Expert weights fetched per token vs cache capacity\n{_describe_models(series)}",
                 fontsize=11)
    lines = ["Each miss fetches one expert's weights (sizes from the trace metadata); "
             "MiB = 2^20 bytes. Dashed: opt, the fewest fetches possible."]
    if banded:
        lines.append(_band_note(bootstrap, level))
    _caption(fig, lines)
    return fig


def _routed(series: list[_Series], figure: str, note: Callable[[str], None]) -> list[_Series]:
    routed = [s for s in series if s.trace is not None]
    if not routed:
        note(f"{figure} skipped: no trace file found (pass the traces explicitly)")
    return routed


def _window_figure(series: list[_Series], max_window: int, bootstrap: int, level: float,
                   note: Callable[[str], None]) -> Figure | None:
    routed = _routed(series, "reuse_vs_window", note)
    if not routed:
        return None
    fig, (ax,), legend_ax = _new_figure(1, 5.5)
    banded = False
    for s in routed:
        frame = reuse_by_window(s.trace, max_window, per_token=s.per_token)
        x = frame["window"].to_numpy()
        ax.plot(x, 100.0 * frame["reuse"].to_numpy(), color=s.color, marker="o", markersize=4,
                linewidth=1.6, label=s.label)
        band = s.bands.get("window")
        if band is not None:
            ax.fill_between(x, 100.0 * band[0], 100.0 * band[1], color=s.color, alpha=0.15, linewidth=0)
            banded = True
    ax.set_xlabel("window w (previous steps)")
    ax.set_ylabel("reused experts (% of a step's experts)")
    ax.set_xlim(0.5, max_window + 0.5)
    ax.set_ylim(0, 100)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    handles = [Line2D([], [], color=s.color, marker="o", markersize=4, label=s.label) for s in routed]
    _legend(legend_ax, handles, "router")
    fig.suptitle(f"Expert reuse within the previous w steps\n{_describe_models(routed)}", fontsize=11)
    lines = ["Share of a step's experts that the same layer used in one of the previous w steps, "
             "pooled over layers (steps t >= 1).",
             "w = 1 is the reuse rate; steps run in trace order, across sequence boundaries."]
    if banded:
        lines.append(_band_note(bootstrap, level))
    _caption(fig, lines)
    return fig


def _layer_figure(series: list[_Series], bootstrap: int, level: float,
                  note: Callable[[str], None]) -> Figure | None:
    routed = _routed(series, "per_layer_reuse", note)
    if not routed:
        return None
    frames = {id(s): per_layer_reuse(s.trace, per_token=s.per_token) for s in routed}
    layers = sorted({int(x) for f in frames.values() for x in f["layer"]})
    position = {layer: i for i, layer in enumerate(layers)}
    width = 0.8 / len(routed)
    fig, (ax,), legend_ax = _new_figure(1, min(16.0, max(5.0, 0.28 * len(layers) * len(routed) + 1.0)))
    banded, handles = False, []
    for i, s in enumerate(routed):
        frame = frames[id(s)]
        x = np.array([position[int(v)] for v in frame["layer"]]) + (i - (len(routed) - 1) / 2) * width
        y = 100.0 * frame["reuse"].to_numpy()
        pooled = frame["reused"].sum() / max(frame["requests"].sum(), 1)
        band = s.bands.get("layer")
        err = None
        if band is not None:
            err = np.abs(np.vstack([y - 100.0 * band[0], 100.0 * band[1] - y]))
            banded = True
        ax.bar(x, y, width=width * 0.95, color=s.color, yerr=err,
               error_kw={"elinewidth": 0.8, "capsize": 1.5, "ecolor": "#333333"})
        handles.append(Patch(color=s.color, label=f"{s.label}\n(all layers: {100 * pooled:.1f}%)"))
    step = max(1, int(np.ceil(len(layers) / 32)))
    ax.set_xticks(range(0, len(layers), step), [str(v) for v in layers[::step]])
    ax.set_xlim(-0.6, len(layers) - 0.4)
    ax.set_xlabel("MoE layer (model layer index)")
    ax.set_ylabel("reuse rate (% of a step's experts)")
    ax.set_ylim(0, 100)
    ax.grid(True, axis="y", alpha=0.3)
    _legend(legend_ax, handles, "router", labelspacing=0.9)
    fig.suptitle(f"Expert reuse per MoE layer\n{_describe_models(routed)}", fontsize=11)
    lines = ["Reuse rate: share of a step's experts that the same layer used at the previous step (t >= 1)."]
    if banded:
        lines.append(f"Error bars: {level:.0%} percentile bootstrap interval over {bootstrap} resamples "
                     "of the trace's sequences.")
    _caption(fig, lines)
    return fig


# -- output ----------------------------------------------------------------------------------

def save_figure(fig: Figure, stem: Path, formats: list[str]) -> list[Path]:
    """Each format through a temporary file and a rename: never a half-written figure."""
    written = []
    for fmt in formats:
        path = stem.with_name(f"{stem.name}.{fmt}")
        with atomic_write(path) as tmp:
            metadata = {"CreationDate": None} if fmt == "pdf" else None
            fig.savefig(tmp, format=fmt, dpi=DPI, metadata=metadata)
        written.append(path)
    return written
