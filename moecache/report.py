"""Plain-text rendering of traces and results for the terminal."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .results import ReplayResult
from .timeline import TimelineResult
from .trace import Trace
from .trace_format import DECODE, FORMAT_VERSION, OPTIONAL_COLUMNS, PREFILL
from .units import format_bytes

if TYPE_CHECKING:
    import pandas as pd


def _pct(value: float | None) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.2f}%"


def _rows(pairs: list[tuple[str, object]]) -> str:
    width = max(len(k) for k, _ in pairs)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in pairs)


def trace_summary(trace: Trace, path: str | Path | None = None, size: int | None = None,
                  id_bytes: float | None = None, columns: list[str] | None = None,
                  tokens: Mapping[str, np.ndarray] | None = None) -> str:
    """What `moecache info` prints; ``tokens`` (step, seq, phase) stand for the tokens of a
    trace read without them (``moecache.streaming.scan``)."""
    meta = trace.meta
    model = meta.get("model") or {}
    sizes = trace.expert_bytes
    if tokens is None:
        tokens = {"step": trace.step, "seq": trace.seq, "phase": trace.phase}
    step = tokens["step"]
    phases = np.bincount(tokens["phase"], minlength=2)
    pairs: list[tuple[str, object]] = [
        ("trace", path or trace.source),
        ("status", "PARTIAL (interrupted capture: holds every completed step)"
         if trace.partial else "complete"),
        ("model", f"{model.get('name') or '-'} ({model.get('architecture') or '-'})"),
        ("router", meta.get("router") or "-"),
        ("layers", f"{trace.num_layers} MoE of {meta.get('num_layers', '-')}: {_layer_list(trace.layers)}"),
        ("experts", f"E = {trace.num_experts}, top-K = {trace.top_k}, "
                    f"shared = {meta.get('num_shared_experts', 0)}"),
        ("expert size", "-" if sizes is None else _sizes(sizes)),
        ("dtype", meta.get("dtype") or "-"),
        ("sequences", int(len(np.unique(tokens["seq"])))),
        ("steps", int(np.count_nonzero(np.diff(step))) + 1 if len(step) else 0),
        *_import_steps(meta.get("capture")),
        ("tokens", f"{len(step)} ({phases[PREFILL]} prefill, {phases[DECODE]} decode)"),
        ("optional columns", ", ".join(
            c for c in OPTIONAL_COLUMNS
            if c in (columns or []) or getattr(trace, c) is not None) or "none"),
    ]
    if size is not None:
        pairs.append(("size on disk", format_bytes(size)))
        version = meta.get("format_version")
        pairs.append(("format", f"v{version}" + ("" if version == FORMAT_VERSION else
                                                 f" (read; saving it writes v{FORMAT_VERSION})")))
    if id_bytes is not None:
        pairs.append(("bytes per expert id", f"{id_bytes:.3f} (int16 ids, zstd)"))
    return _rows(pairs)


def _import_steps(capture: object) -> list[tuple[str, object]]:
    """How an imported trace's steps were formed (``moecache import`` records one sentence)."""
    if not isinstance(capture, dict) or capture.get("mode") != "import":
        return []
    formed = capture.get("steps_formed")
    if not isinstance(formed, str):
        formed = (f"not recorded (imported by moecache {capture.get('moecache_version', '-')} "
                  f"with order {capture.get('order', '-')})")
    return [("steps formed", formed.removeprefix("steps: "))]


def _layer_list(layers: np.ndarray) -> str:
    values = layers.tolist()
    if len(values) > 2 and values == list(range(values[0], values[-1] + 1)):
        return f"{values[0]}..{values[-1]}"
    return ",".join(map(str, values))


def _sizes(sizes: np.ndarray) -> str:
    unique = np.unique(sizes)
    if len(unique) == 1:
        return format_bytes(int(unique[0]))
    return f"{format_bytes(int(sizes.min()))} to {format_bytes(int(sizes.max()))}"


def result_summary(result: ReplayResult, source: str | None = None, partial: bool = False) -> str:
    """What `moecache replay` prints: pooled metrics."""
    if result.memory_bytes is not None:
        budget = f"{format_bytes(result.memory_bytes)}" + (
            f" (= {result.capacity} experts)" if result.capacity is not None else "")
    else:
        budget = f"{result.capacity} experts"
    pairs: list[tuple[str, object]] = []
    if source:
        pairs.append(("trace", f"{source}{'  [PARTIAL]' if partial else ''}"))
    pairs += [
        ("policy", result.policy),
        ("scope", "per-layer caches" if result.scope == "layer" else "one pool for all layers"),
        ("capacity", budget + (" per layer" if result.scope == "layer" else "")),
        ("steps / tokens", f"{result.steps} / {result.tokens}"),
        ("requests", result.requests),
        ("hits", result.hits),
        ("misses", f"{result.misses} ({result.cold_misses} cold)"),
        ("hit rate", _pct(result.hit_rate)),
        ("reuse rate", _pct(result.reuse_rate)),
    ]
    if result.miss_bytes is not None:
        pairs += [("miss bytes", format_bytes(result.miss_bytes)),
                  ("bytes per token", format_bytes(result.bytes_per_token or 0))]
    if result.io_seconds is not None:
        pairs += [("I/O time", f"{result.io_seconds:.3f} s"),
                  ("I/O per token", f"{1e3 * (result.io_seconds_per_token or 0):.3f} ms")]
    return _rows(pairs)


def per_layer_table(result: ReplayResult) -> str:
    import pandas as pd

    frame = result.per_layer[["layer", "requests", "hits", "misses", "cold_misses"]].copy()
    frame["hit_rate"] = result.per_layer["hit_rate"].map(_pct)
    frame["reuse_rate"] = result.per_layer["reuse_rate"].map(_pct)
    return pd.DataFrame(frame).to_string(index=False)


def curve_table(frame: pd.DataFrame) -> str:
    """Capacity, hits, rates and (when known) bytes and I/O per token, one row per capacity."""
    import pandas as pd

    shown = pd.DataFrame({"capacity": frame["capacity"], "hits": frame["hits"],
                          "misses": frame["misses"], "hit_rate": frame["hit_rate"].map(_pct),
                          "reuse_rate": frame["reuse_rate"].map(_pct)})
    if frame["bytes_per_token"].notna().any():
        shown["MiB/token"] = (frame["bytes_per_token"] / 2**20).map(lambda v: f"{v:.2f}")
    if frame["io_seconds_per_token"].notna().any():
        shown["I/O ms/token"] = (frame["io_seconds_per_token"] * 1e3).map(lambda v: f"{v:.3f}")
    return shown.to_string(index=False)


def comparison_table(frame: pd.DataFrame) -> str:
    """The `moecache compare` table: base and ReMoE side by side with their change."""
    import pandas as pd

    base, remoe = frame.columns[4], frame.columns[5]
    lines = []
    for row in frame.itertuples(index=False):
        metric, policy, capacity, profile, before, after, change, change_pp = row
        what = metric
        if policy is not None and metric != "reuse rate":
            what += f" {policy}"
        if capacity is not None and not pd.isna(capacity):
            what += f" @C={int(capacity)}"
        if profile is not None and not pd.isna(profile):
            what += f", {profile}"
        relative = "-" if math.isnan(change) else f"{100 * change:+.1f}%"
        if metric in ("reuse rate", "hit rate"):
            cells = (_pct(before), _pct(after),
                     "-" if math.isnan(change_pp) else f"{change_pp:+.2f} pp ({relative})")
        elif metric == "decode speedup":
            cells = ("1.00x", f"{after:.2f}x", relative)
        else:
            cells = (f"{before:.3f}", f"{after:.3f}", relative)
        lines.append((what, *cells))
    header = ("", str(base), str(remoe), "change")
    widths = [max(len(str(r[i])) for r in [header, *lines]) for i in range(4)]
    return "\n".join(f"{r[0]:<{widths[0]}}  " + "  ".join(f"{r[i]:>{widths[i]}}" for i in (1, 2, 3))
                     for r in [header, *lines])


def timeline_summary(result: TimelineResult, source: str | None = None) -> str:
    """What `moecache timeline` prints."""
    budget = (f"{format_bytes(result.memory_bytes)}" if result.memory_bytes is not None
              else f"{result.capacity} experts") + (" per layer" if result.scope == "layer" else " pooled")
    prefetch = "none" if result.prefetch is None else (
        f"{result.prefetch} (depth {result.depth}, budget {result.budget}; accuracy "
        f"{_pct(result.prefetch_accuracy)}, wasted {format_bytes(result.wasted_bytes)})")
    pairs: list[tuple[str, object]] = []
    if source:
        pairs.append(("trace", source))
    pairs += [
        ("hardware / model", f"{result.hardware} / {result.model or 'the trace metadata'}"),
        ("cache", f"{result.policy}, {budget}, {'overlap' if result.overlap else 'no overlap'}, "
                  f"misses {'computed on the host' if result.miss == 'host' else 'fetched'}"),
        ("prefetch", prefetch),
        ("steps / tokens", f"{result.steps} / {result.tokens} ({result.decode_steps} single-token steps)"),
        ("TPOT mean / p50 / p95", f"{1e3 * result.tpot_s:.3f} / {1e3 * result.tpot_p50_s:.3f} / "
                                  f"{1e3 * result.tpot_p95_s:.3f} ms"),
        ("tokens/s", f"{result.tokens_per_s:.2f}"),
        ("stall", f"{result.stall_s:.3f} s ({_pct(result.stall_share)} of {result.total_s:.3f} s)"),
        ("I/O busy", _pct(result.io_busy_share) + " (the busiest link)"),
        ("hit rate", _pct(result.hit_rate)),
        ("hits per tier", ", ".join(f"{name} {count}" for name, count in result.tier_hits.items())),
        ("bytes per token", f"{format_bytes(result.demand_bytes_per_token)} demand, "
                            f"{format_bytes(result.prefetch_bytes_per_token)} prefetch"),
    ]
    return _rows(pairs)
