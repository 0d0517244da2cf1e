"""ReMoE router fine-tuning of the toy MoE, end to end (``make remoe-experiment``).

1. The toy model (``experiments/toy_model.py``; trained here if ``--model`` is missing)
   and its three splits: train (fine-tuning), validation (choosing), test (reporting).
2. Locality-weight sweep: for each weight in ``--weights`` and each seed in ``--seeds``,
   the base model's routers are fine-tuned in memory with
   :func:`moecache.remoe.finetune_model` on the training split (same steps, lr, window,
   KL weight for every point; the seed orders the batches; weight 0 is the control: LM +
   KL only). Each run is measured on validation (perplexity, reuse: the reuse rate of
   docs/semantics.md, w = 1) and on test at ``--lengths`` times the fine-tuning length
   (the same ``--test-tokens`` tokens cut into blocks of each length) with
   :func:`moecache.remoe.evaluate_quality`: perplexity, reuse, top-1 agreement with the
   baseline, KL(baseline || model), next-token accuracy on closing brackets and on
   repeated identifiers. One row per run, split and length: ``runs.csv``.
3. The choice, on validation only: with ``--main-weight auto``, the weight > 0 of largest
   mean validation reuse whose mean validation perplexity rises by at most
   ``--max-ppl-increase`` percent. Every reported number is a test number: mean and
   standard deviation over the seeds, ``summary.md`` and ``locality_tradeoff.png``
   (bands: one standard deviation).
4. The ReMoE model (the chosen weight, first seed) saved to ``--remoe-out``; forward-mode
   captures (teacher-forced test prompts, no logits) of both models:
   ``traces/toy-baseline.parquet`` (label ``baseline``) and ``traces/toy-remoe.parquet``
   (label ``remoe``); then ``moecache compare``, ``moecache sweep`` and ``moecache plot``
   on the pair, into ``--results``. ``summary.json`` holds every number.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

import moecache as mc

sys.path.insert(0, str(Path(__file__).resolve().parent))

import toy_model  # noqa: E402
from toy_model import as_command, number, refuse_existing  # noqa: E402

from moecache.capture import capture, load_model  # noqa: E402
from moecache.errors import MoecacheError  # noqa: E402
from moecache.remoe import (  # noqa: E402
    FinetuneSettings,
    biased_routing,
    code_tasks,
    evaluate_quality,
    finetune_model,
    load_texts,
    reference_outputs,
)
from moecache.remoe.train import find_model_routers  # noqa: E402
from moecache.reroute import check_bias  # noqa: E402

MC = str(Path(sys.executable).with_name("moecache"))
METRICS = ("ppl", "reuse", "agreement", "kl", "brackets_acc", "identifiers_acc", "lru_hit_c8", "lru_hit_c12")
HIT_CAPACITIES = (8, 12)  # LRU per layer, of E = 32
PATHS = {  # per architecture: model, ReMoE model, results, baseline trace, ReMoE trace
    "olmoe": ("models/toy-moe", "models/toy-moe-remoe", "results/remoe", "traces/toy-baseline.parquet",
              "traces/toy-remoe.parquet"),
    "qwen2_moe": ("models/toy-qwen2moe", "models/toy-qwen2moe-remoe", "results/remoe/qwen2_moe",
                  "traces/toy-qwen2moe-baseline.parquet", "traces/toy-qwen2moe-remoe.parquet"),
    "deepseek_v3": ("models/toy-deepseek", "models/toy-deepseek-remoe", "results/remoe/deepseek_v3",
                    "traces/toy-deepseek-baseline.parquet", "traces/toy-deepseek-remoe.parquet"),
}


def quality_row(quality, num_experts: int) -> dict:
    """A quality's numbers, with the LRU hit rates of its routing (blocks one after another,
    one step per token) when it kept it."""
    row = quality.to_dict()
    if quality.routing is not None:
        tokens = len(quality.routing)
        trace = mc.Trace.from_arrays(quality.routing, num_experts)
        row.update({f"lru_hit_c{c}": mc.replay(trace, "lru", c).hit_rate for c in HIT_CAPACITIES},
                   routed_tokens=tokens)
    return row


def run(cmd: list[str], log: Path | None = None) -> None:
    """Run a moecache command, print (and with ``log`` keep) its output; its failure is one
    MoecacheError naming the command and its own one-line error."""
    print("+", " ".join(cmd), flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        reason = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise MoecacheError(f"moecache {cmd[1]} failed: {reason}")
    print(done.stdout)
    if log is not None:
        log.write_text(done.stdout)


def _as_float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan


def spread(values: list[float]) -> tuple[float, float]:
    """(mean, sample standard deviation; 0 for one value)."""
    array = np.asarray(values, float)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0


def aggregate(rows: list[dict], base: dict[tuple[str, int], dict]) -> list[dict]:
    """Per weight, split and length: each metric's mean and spread over the seeds, with the
    perplexity and reuse changes relative to the baseline's."""
    groups: dict[tuple[float, str, int], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["locality_weight"], row["split"], row["length"]), []).append(row)
    out = []
    for (weight, split, length), runs in groups.items():
        ref = base[(split, length)]
        entry = {"locality_weight": weight, "split": split, "length": length, "seeds": len(runs)}
        for metric in METRICS:
            values = [r[metric] for r in runs if r.get(metric) is not None]
            if values:
                entry[metric], entry[f"{metric}_sd"] = spread(values)
        entry["ppl_change_pct"], entry["ppl_change_pct_sd"] = spread(
            [100 * (r["ppl"] / ref["ppl"] - 1) for r in runs])
        entry["reuse_gain_pct"], entry["reuse_gain_pct_sd"] = spread(
            [100 * (r["reuse"] / ref["reuse"] - 1) for r in runs])
        out.append(entry)
    return out


def choose(summary: list[dict], main_weight: str, max_increase: float) -> float:
    """The shipped weight: given, or (auto) the largest mean validation reuse among weights
    > 0 within ``max_increase`` percent of the baseline's validation perplexity."""
    if main_weight != "auto":
        return float(main_weight)
    validation = [s for s in summary if s["split"] == "validation"]
    ok = [s for s in validation if s["locality_weight"] > 0 and s["ppl_change_pct"] <= max_increase]
    return max(ok or validation, key=lambda s: s["reuse"])["locality_weight"]


def markdown(summary: list[dict], base: dict[tuple[str, int], dict], split: str, length: int,
             chosen: float) -> str:
    """One table: the baseline, then each weight's mean ± spread over the seeds."""
    ref = base[(split, length)]
    head = ("| λ | perplexity | change | reuse | change | top-1 agreement | KL (nats) | brackets acc "
            "| identifiers acc |")
    lines = [head, "|" + "---|" * 9]
    nan = float("nan")
    lines.append(f"| baseline | {ref['ppl']:.2f} | | {ref['reuse']:.4f} | | | | "
                 f"{ref.get('brackets_acc', nan):.4f} | {ref.get('identifiers_acc', nan):.4f} |")

    def cell(entry: dict, name: str, digits: int, signed: bool = False) -> str:
        if name not in entry:
            return ""
        sign = "+" if signed else ""
        return f"{entry[name]:{sign}.{digits}f} ± {entry[f'{name}_sd']:.{digits}f}"
    for entry in sorted((s for s in summary if s["split"] == split and s["length"] == length),
                        key=lambda s: s["locality_weight"]):
        label = f"{entry['locality_weight']:g}" + (" (chosen)" if entry["locality_weight"] == chosen else "")
        lines.append(" | ".join([
            f"| {label}", cell(entry, "ppl", 2), cell(entry, "ppl_change_pct", 2, True) + "%",
            cell(entry, "reuse", 4), cell(entry, "reuse_gain_pct", 1, True) + "%",
            cell(entry, "agreement", 4), cell(entry, "kl", 4), cell(entry, "brackets_acc", 4),
            cell(entry, "identifiers_acc", 4)]) + " |")
    return "\n".join(lines)


def plot_tradeoff(summary: list[dict], lengths: list[int], seq_len: int, chosen: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for length in lengths:
        points = sorted((s for s in summary if s["split"] == "test" and s["length"] == length),
                        key=lambda s: s["locality_weight"])
        x = np.array([s["ppl_change_pct"] for s in points])
        y = np.array([s["reuse_gain_pct"] for s in points])
        dy = np.array([s["reuse_gain_pct_sd"] for s in points])
        dx = np.array([s["ppl_change_pct_sd"] for s in points])
        line = ax.errorbar(x, y, xerr=dx, fmt="o-", ms=4, capsize=2,
                           label=f"test, {length} tokens ({length // seq_len}x)")[0]
        ax.fill_between(x, y - dy, y + dy, color=line.get_color(), alpha=0.15, lw=0)
        if length == lengths[0]:
            for s in points:
                mark = "*" if s["locality_weight"] == chosen else ""
                ax.annotate(f"λ={s['locality_weight']:g}{mark}", (s["ppl_change_pct"], s["reuse_gain_pct"]),
                            textcoords="offset points", xytext=(5, -10), fontsize=8)
    ax.axvline(3, color="grey", ls=":", lw=1)
    ax.axhline(20, color="grey", ls=":", lw=1)
    ax.set_xlabel("test perplexity change vs baseline (%)")
    ax.set_ylabel("test reuse gain vs baseline (% relative)")
    ax.set_title("ReMoE router fine-tuning of the toy MoE (mean ± sd over seeds)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def alternatives(model, blocks, reference, tasks, base: dict, args, experts: int) -> list[dict]:
    """The inference-time alternatives on the baseline model, test blocks of the fine-tuning
    length: routing biased toward the experts of the previous token (``recent``, w = 1) or
    toward those resident in an LRU cache of ``--cache-capacity`` per layer (``cache``), at
    each strength of ``--recent-biases`` and ``--cache-biases``."""
    rows: list[dict] = []
    try:
        with biased_routing(model, mode="recent", bias=0.0):
            evaluate_quality(model, blocks[:1])
    except MoecacheError as err:  # a sigmoid router (DeepSeek-V3)
        print(f"inference-time alternatives skipped: {err}", flush=True)
        return rows
    for mode, biases in (("recent", args.recent_biases), ("cache", args.cache_biases)):
        for bias in biases:
            capacity = args.cache_capacity if mode == "cache" else None
            with biased_routing(model, mode=mode, bias=bias, capacity=capacity):
                quality = evaluate_quality(model, blocks, reference, tasks, keep_routing=True)
            row = quality_row(quality, experts)
            row.update(method=f"{mode} bias", strength=bias, capacity=capacity,
                       ppl_change_pct=100 * (row["ppl"] / base["ppl"] - 1),
                       reuse_gain_pct=100 * (row["reuse"] / base["reuse"] - 1))
            rows.append(row)
            print(f"{mode} bias {bias:g}: test ppl {row['ppl']:.3f} ({row['ppl_change_pct']:+.2f}%), reuse "
                  f"{row['reuse']:.4f}, LRU hits C=8 {row['lru_hit_c8']:.4f}", flush=True)
    return rows


def methods_table(summary: list[dict], others: list[dict], base: dict, length: int) -> str:
    """ReMoE (mean ± sd over seeds) beside the inference-time alternatives, test blocks of
    ``length`` tokens: locality against perplexity."""
    lines = ["| method | strength | perplexity change | reuse | LRU hits C=8 | LRU hits C=12 "
             "| top-1 agreement | KL (nats) |", "|" + "---|" * 8,
             f"| baseline | | | {base['reuse']:.4f} | {base['lru_hit_c8']:.4f} | "
             f"{base['lru_hit_c12']:.4f} | | |"]
    for entry in sorted((e for e in summary if e["split"] == "test" and e["length"] == length),
                        key=lambda e: e["locality_weight"]):
        lines.append(f"| ReMoE | λ={entry['locality_weight']:g} | {entry['ppl_change_pct']:+.2f} ± "
                     f"{entry['ppl_change_pct_sd']:.2f}% | {entry['reuse']:.4f} ± {entry['reuse_sd']:.4f} | "
                     f"{entry['lru_hit_c8']:.4f} ± {entry['lru_hit_c8_sd']:.4f} | "
                     f"{entry['lru_hit_c12']:.4f} ± {entry['lru_hit_c12_sd']:.4f} | "
                     f"{entry['agreement']:.4f} | {entry['kl']:.4f} |")
    if not others:
        lines.append("| (the inference-time alternatives need a softmax router: none for this model) "
                     "| | | | | | | |")
    for row in others:
        lines.append(f"| {row['method']} | {row['strength']:g} | {row['ppl_change_pct']:+.2f}% | "
                     f"{row['reuse']:.4f} | {row['lru_hit_c8']:.4f} | {row['lru_hit_c12']:.4f} | "
                     f"{row['agreement']:.4f} | {row['kl']:.4f} |")
    return "\n".join(lines)


def plot_methods(summary: list[dict], others: list[dict], base: dict, length: int, path: Path) -> None:
    """Reuse and LRU hit rates (C = 8, 12) against the test perplexity change: ReMoE's
    locality weights (mean ± sd over seeds) and each alternative's strengths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    remoe = sorted((e for e in summary if e["split"] == "test" and e["length"] == length),
                   key=lambda e: e["locality_weight"])
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, metric, title in zip(axes, ("reuse", "lru_hit_c8", "lru_hit_c12"),
                                 ("reuse rate", "LRU hit rate, C = 8 of 32", "LRU hit rate, C = 12 of 32"),
                                 strict=True):
        x = [e["ppl_change_pct"] for e in remoe]
        ax.errorbar(x, [e[metric] for e in remoe], xerr=[e["ppl_change_pct_sd"] for e in remoe],
                    yerr=[e[f"{metric}_sd"] for e in remoe], fmt="o-", ms=4, capsize=2,
                    label="ReMoE (router fine-tuning, λ)")
        for method, style in (("recent bias", "s--"), ("cache bias", "^:")):
            rows = [r for r in others if r["method"] == method]
            if not rows:
                continue
            ax.plot([r["ppl_change_pct"] for r in rows], [r[metric] for r in rows], style, ms=4,
                    label=f"{method} at inference")
        ax.scatter([0], [base[metric]], color="black", zorder=5, label="baseline")
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xlabel("test perplexity change vs baseline (%)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Locality bought per point of perplexity (toy MoE, test blocks of {length} tokens)",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--arch", choices=toy_model.ARCHS, default="olmoe",
        help="the toy model's architecture; the paths below default to its own (see PATHS)")
    add("--model", type=Path)
    add("--data-dir", type=Path, default=Path("models/toy-data"))
    add("--remoe-out", type=Path)
    add("--results", type=Path)
    add("--base-trace", type=Path)
    add("--remoe-trace", type=Path)
    add("--weights", type=number(float, 0, many=True), default="0,0.03,0.1,0.3,1",
        help="locality weights of the sweep")
    add("--seeds", type=number(int, 0, many=True), default="0,1,2",
        help="fine-tuning seeds (batch order), each weight run once per seed")
    add("--main-weight", default="auto", help="the weight of the shipped ReMoE model, or auto")
    add("--max-ppl-increase", type=number(float, 0), default=3.0,
        help="percent on validation, for --main-weight auto")
    add("--window", type=int, default=1)
    add("--kl-weight", type=float, default=1.0)
    add("--steps", type=int, default=80)
    add("--lr", type=float, default=1e-3)
    add("--seq-len", type=int, default=128, help="fine-tuning block length")
    add("--batch-size", type=int, default=4)
    add("--val-blocks", type=number(int, 1), default=64, help="validation blocks of 256 tokens")
    add("--test-tokens", type=number(int, 1), default=32768,
        help="test tokens, cut into blocks of each length")
    add("--lengths", type=number(int, 1, many=True), default="1,4,16",
        help="test block lengths, in multiples of --seq-len")
    add("--recent-biases", type=number(float, 0, many=True), default="0.5,1,2,4,8",
        help="strengths of routing biased toward the previous token's experts (an alternative)")
    add("--cache-biases", type=number(float, 0, many=True), default="0.5,1,2,4,8",
        help="strengths of routing biased toward cache-resident experts (the other alternative)")
    add("--cache-capacity", type=number(int, 1), default=8,
        help="the per-layer LRU cache the cache bias favours")
    add("--capacities", default="8,12", help="moecache compare capacities (E=32, K=4)")
    add("--sweep-capacities", default="4:32:4")
    add("--policies", default="lru,lfu,fifo,opt")
    add("--bandwidth", default="ufs4,nvme4,pcie4x16")
    add("--compute-ms", default="5")
    add("--threads", type=number(int, 1), default=2)
    add("--force", action="store_true", help="replace the ReMoE model, traces and results of an earlier run")
    args = parser.parse_args(argv)
    if args.main_weight != "auto" and _as_float(args.main_weight) not in args.weights:
        parser.error(f"--main-weight must be auto or one of --weights, got {args.main_weight}")
    longest = args.seq_len * max(args.lengths)
    if args.test_tokens < longest:
        parser.error(f"--test-tokens must hold one block of the longest length ({longest} tokens)")
    for name, default in zip(("model", "remoe_out", "results", "base_trace", "remoe_trace"), PATHS[args.arch],
                             strict=True):
        if getattr(args, name) is None:
            setattr(args, name, Path(default))
    shared = FinetuneSettings(window=args.window, kl_weight=args.kl_weight, steps=args.steps, lr=args.lr,
                              seq_len=args.seq_len, batch_size=args.batch_size, log_every=10).check()
    refuse_existing([args.remoe_out, args.base_trace, args.remoe_trace, args.results / "summary.json"],
                    args.force)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # saturated routers (large λ) give subnormal floats: very slow on CPU
    args.results.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if not (args.model / "config.json").exists():
        # the splits of --data-dir are rewritten (the same text for the same corpus settings)
        toy_model.main(["--arch", args.arch, "--out", str(args.model), "--data-dir", str(args.data_dir),
                        "--force"])
    missing = [name for name in ("train", "validation", "test", "test_prompts")
               if not (args.data_dir / f"{name}.jsonl").exists()]
    if missing:
        raise MoecacheError(f"{args.data_dir}: no {missing[0]}.jsonl (made by an older make "
                            f"toy-model?): remove {args.model} and run this again to rebuild the model "
                            "and its three splits")

    weights, seeds = args.weights, args.seeds
    lengths = [args.seq_len * m for m in args.lengths]
    model, tokenizer = load_model(args.model, device="cpu", dtype="float32")
    routers = find_model_routers(model, tokenizer)
    experts = routers.num_experts
    check_bias("cache", 1.0, 1, args.cache_capacity, routers.top_k)  # before hours of fine-tuning
    validation = toy_model.split_blocks(tokenizer, args.data_dir, "validation", 256, args.val_blocks)
    stream = toy_model.split_blocks(tokenizer, args.data_dir, "test", longest, args.test_tokens // longest)
    tests = {length: stream.reshape(-1, length) for length in lengths}
    tasks = {length: code_tasks(tokenizer, blocks) for length, blocks in tests.items()}
    train = load_texts(args.data_dir / "train.jsonl")
    print(f"validation {validation.size:,} tokens; test {stream.size:,} tokens in blocks of "
          f"{', '.join(map(str, lengths))}", flush=True)

    base = {("validation", 256): evaluate_quality(model, validation).to_dict()}
    references = {}
    for length, blocks in tests.items():
        references[length] = reference_outputs(model, blocks)
        base[("test", length)] = quality_row(
            evaluate_quality(model, blocks, references[length], tasks[length], keep_routing=True), experts)
        print(f"baseline, test {length}: ppl {base[('test', length)]['ppl']:.3f}, reuse "
              f"{base[('test', length)]['reuse']:.4f}", flush=True)

    rows, routers = [], {}
    for weight in weights:
        for seed in seeds:
            model, tokenizer = load_model(args.model, device="cpu", dtype="float32")
            t0 = time.perf_counter()
            settings = dataclasses.replace(shared, locality_weight=weight, seed=seed)
            report = finetune_model(model, tokenizer, train, settings)
            seconds = round(time.perf_counter() - t0, 1)
            routers[(weight, seed)] = {n: p.detach().clone() for n, p in model.named_parameters()
                                       if n in report.router_parameters}
            common = dict(locality_weight=weight, seed=seed, window=settings.window,
                          kl_weight=settings.kl_weight, steps=settings.steps, lr=settings.lr,
                          finetune_s=seconds)
            rows.append({**common, "split": "validation", "length": 256,
                         **evaluate_quality(model, validation).to_dict()})
            for length, blocks in tests.items():
                quality = evaluate_quality(model, blocks, references[length], tasks[length],
                                           keep_routing=True)
                rows.append({**common, "split": "test", "length": length, **quality_row(quality, experts)})
            val, test = rows[-1 - len(tests)], rows[-len(tests)]
            print(f"λ={weight:g} seed {seed} ({seconds:.0f} s): validation ppl {val['ppl']:.3f} reuse "
                  f"{val['reuse']:.4f}; test {lengths[0]}: ppl {test['ppl']:.3f} reuse {test['reuse']:.4f} "
                  f"agreement {test['agreement']:.4f} KL {test['kl']:.4f}", flush=True)
    with open(args.results / "runs.csv", "w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=list(dict.fromkeys(key for row in rows for key in row)))
        writer.writeheader()
        writer.writerows(rows)
    summary = aggregate(rows, base)
    chosen = choose(summary, args.main_weight, args.max_ppl_increase)
    tables = [f"## {split}, blocks of {length} tokens\n\n{markdown(summary, base, split, length, chosen)}\n"
              for split, length in [("validation", 256)] + [("test", length) for length in lengths]]
    (args.results / "summary.md").write_text(
        f"ReMoE on the toy MoE: mean ± sd over seeds {args.seeds}; λ chosen on validation: {chosen:g}\n\n"
        + "\n".join(tables))
    print("\n".join(tables), flush=True)
    plot_tradeoff(summary, lengths, args.seq_len, chosen, args.results / "locality_tradeoff.png")
    model, tokenizer = load_model(args.model, device="cpu", dtype="float32")
    first = lengths[0]
    others = alternatives(model, tests[first], references[first], tasks[first], base[("test", first)], args,
                          experts)
    table = methods_table(summary, others, base[("test", first)], first)
    with open(args.results / "summary.md", "a") as out:
        out.write(f"\n## ReMoE against the inference-time alternatives, test, blocks of {first} tokens\n\n"
                  f"{table}\n")
    print(table, flush=True)
    plot_methods(summary, others, base[("test", first)], first, args.results / "alternatives.png")

    model, tokenizer = load_model(args.model, device="cpu", dtype="float32")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in routers[(chosen, seeds[0])]:
                param.copy_(routers[(chosen, seeds[0])][name])
    model.save_pretrained(args.remoe_out)
    tokenizer.save_pretrained(args.remoe_out)
    print(f"ReMoE model: λ={chosen:g}, seed {seeds[0]}, saved to {args.remoe_out}", flush=True)

    prompts = args.data_dir / "test_prompts.jsonl"
    for path, out, label in ((args.model, args.base_trace, "baseline"),
                             (args.remoe_out, args.remoe_trace, "remoe")):
        capture(path, prompts, out, mode="forward", device="cpu", dtype="float32", save_logits=False,
                router_label=label, overwrite=True, progress=False)
    pair = [str(args.base_trace), str(args.remoe_trace)]
    run([MC, "compare", *pair, "--capacity", args.capacities, "--policies", "lru,lfu,opt",
         "--bandwidth", args.bandwidth, "--compute-ms", args.compute_ms,
         "--out", str(args.results / "compare.csv"), "--force"], args.results / "compare.txt")
    run([MC, "sweep", *pair, "--policies", args.policies, "--capacities", args.sweep_capacities,
         "--bandwidth", "4GB/s", "--out", str(args.results / "sweep.parquet"), "--force",
         "--workers", str(args.threads)])
    run([MC, "plot", str(args.results / "sweep.parquet"), "--out", str(args.results / "figures"),
         "--format", "png", "--force"])
    result = dict(baseline={f"{split} {length}": values for (split, length), values in base.items()},
                  chosen_weight=chosen, summary=summary, runs=rows, alternatives=others,
                  toy_model=json.loads((args.model / "toy_train.json").read_text()).get("train_s"),
                  settings={k: str(v) for k, v in vars(args).items()},
                  elapsed_s=round(time.perf_counter() - started, 1))
    (args.results / "summary.json").write_text(json.dumps(result, indent=1))
    print(f"done in {result['elapsed_s'] / 60:.1f} min; λ chosen on validation: {chosen:g}")


if __name__ == "__main__":
    as_command(main)
