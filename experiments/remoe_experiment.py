"""ReMoE router fine-tuning of the toy MoE, end to end (``make remoe-experiment``).

1. The toy model (``experiments/toy_model.py``; trained here if ``--model`` is missing).
2. Locality-weight sweep: for each weight in ``--weights``, the base model's routers
   are fine-tuned in memory with :func:`moecache.remoe.finetune_model` on the training
   split (same seed, steps, lr, window, KL weight for every point; weight 0 is the
   control: LM + KL only), then held-out perplexity and held-out reuse (the reuse rate of docs/semantics.md,
   w = 1, :func:`moecache.remoe.measure_reuse`) are measured on the same held-out
   blocks. Written: ``locality_sweep.csv`` and ``locality_tradeoff.png``.
3. The ReMoE model: the sweep point of ``--main-weight`` (or, with ``auto``, the point
   of largest reuse whose held-out perplexity rises by at most ``--max-ppl-increase``
   percent; note this picks on the held-out split) saved as a normal checkpoint to
   ``--remoe-out``.
4. Forward-mode captures (teacher-forced held-out prompts, no logits) of both models:
   ``traces/toy-baseline.parquet`` (label ``baseline``) and ``traces/toy-remoe.parquet``
   (label ``remoe``); then ``moecache compare``, ``moecache sweep`` and ``moecache plot``
   on the pair, into ``--results``. ``summary.json`` holds every number.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import toy_model  # noqa: E402

from moecache.capture import capture, load_model  # noqa: E402
from moecache.remoe import FinetuneSettings, finetune_model, load_texts, measure_reuse  # noqa: E402

MC = str(Path(sys.executable).with_name("moecache"))


def evaluate(model, blocks) -> dict:
    return {"ppl": toy_model.perplexity(model, blocks), "reuse": measure_reuse(model, blocks)}


def run(cmd: list[str], log: Path | None = None) -> None:
    print("+", " ".join(cmd), flush=True)
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    print(out)
    if log is not None:
        log.write_text(out)


def plot_tradeoff(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    x = [r["ppl_change_pct"] for r in rows]
    y = [r["reuse_gain_pct"] for r in rows]
    ax.plot(x, y, "o-")
    for r in rows:
        ax.annotate(f"λ={r['locality_weight']:g}", (r["ppl_change_pct"], r["reuse_gain_pct"]),
                    textcoords="offset points", xytext=(5, -10), fontsize=8)
    ax.axvline(3, color="grey", ls=":", lw=1)
    ax.axhline(20, color="grey", ls=":", lw=1)
    ax.set_xlabel("held-out perplexity change vs baseline (%)")
    ax.set_ylabel("held-out reuse gain vs baseline (% relative)")
    ax.set_title("ReMoE router fine-tuning of the toy MoE: locality weight λ")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--model", type=Path, default=Path("models/toy-moe"))
    add("--data-dir", type=Path, default=Path("models/toy-data"))
    add("--remoe-out", type=Path, default=Path("models/toy-moe-remoe"))
    add("--results", type=Path, default=Path("results/remoe"))
    add("--base-trace", type=Path, default=Path("traces/toy-baseline.parquet"))
    add("--remoe-trace", type=Path, default=Path("traces/toy-remoe.parquet"))
    add("--weights", default="0,0.03,0.1,0.3", help="locality weights of the sweep")
    add("--main-weight", default="auto", help="the weight of the shipped ReMoE model, or auto")
    add("--max-ppl-increase", type=float, default=3.0, help="percent, for --main-weight auto")
    add("--window", type=int, default=1)
    add("--kl-weight", type=float, default=1.0)
    add("--steps", type=int, default=80)
    add("--lr", type=float, default=1e-3)
    add("--seq-len", type=int, default=128)
    add("--batch-size", type=int, default=4)
    add("--eval-blocks", type=int, default=64, help="held-out blocks of 256 tokens")
    add("--capacities", default="8,12", help="moecache compare capacities (E=32, K=4)")
    add("--sweep-capacities", default="4:32:4")
    add("--policies", default="lru,lfu,fifo,opt")
    add("--bandwidth", default="ufs4,nvme4,pcie4x16")
    add("--compute-ms", default="5")
    add("--threads", type=int, default=2)
    add("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # saturated routers (large λ) give subnormal floats: very slow on CPU
    args.results.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if not (args.model / "config.json").exists():
        toy_model.main(["--out", str(args.model), "--data-dir", str(args.data_dir)])

    model, tokenizer = load_model(args.model, device="cpu", dtype="float32")
    held = toy_model.heldout_blocks(tokenizer, args.data_dir, 256, args.eval_blocks)
    train = load_texts(args.data_dir / "train.jsonl")
    base = evaluate(model, held)
    print(f"baseline: held-out ppl {base['ppl']:.3f}, reuse {base['reuse']:.4f}", flush=True)

    rows, routers = [], {}
    shared = FinetuneSettings(window=args.window, kl_weight=args.kl_weight, steps=args.steps, lr=args.lr,
                              seq_len=args.seq_len, batch_size=args.batch_size, seed=args.seed, log_every=10)
    for weight in [float(w) for w in args.weights.split(",")]:
        model, tokenizer = load_model(args.model, device="cpu", dtype="float32")
        t0 = time.perf_counter()
        settings = dataclasses.replace(shared, locality_weight=weight)
        report = finetune_model(model, tokenizer, train, settings)
        got = evaluate(model, held)
        routers[weight] = {n: p.detach().clone() for n, p in model.named_parameters()
                           if n in report.router_parameters}
        rows.append(dict(locality_weight=weight, window=settings.window, kl_weight=settings.kl_weight,
                         steps=settings.steps, lr=settings.lr, ppl=got["ppl"], reuse=got["reuse"],
                         ppl_change_pct=100 * (got["ppl"] / base["ppl"] - 1),
                         reuse_gain_pct=100 * (got["reuse"] / base["reuse"] - 1),
                         train_reuse_before=report.reuse_before, train_reuse_after=report.reuse_after,
                         finetune_s=round(time.perf_counter() - t0, 1)))
        print(f"λ={weight:g}: held-out ppl {got['ppl']:.3f} ({rows[-1]['ppl_change_pct']:+.2f}%), "
              f"reuse {got['reuse']:.4f} ({rows[-1]['reuse_gain_pct']:+.1f}%)", flush=True)
    with open(args.results / "locality_sweep.csv", "w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot_tradeoff(rows, args.results / "locality_tradeoff.png")

    if args.main_weight == "auto":
        ok = [r for r in rows if r["ppl_change_pct"] <= args.max_ppl_increase and r["locality_weight"] > 0]
        main_row = max(ok or rows, key=lambda r: r["reuse"])
    else:
        main_row = next(r for r in rows if r["locality_weight"] == float(args.main_weight))
    weight = main_row["locality_weight"]
    model, tokenizer = load_model(args.model, device="cpu", dtype="float32")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in routers[weight]:
                param.copy_(routers[weight][name])
    model.save_pretrained(args.remoe_out)
    tokenizer.save_pretrained(args.remoe_out)
    print(f"ReMoE model: λ={weight:g} saved to {args.remoe_out}", flush=True)

    prompts = args.data_dir / "heldout_prompts.jsonl"
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
    summary = dict(baseline=base, remoe=main_row, main_weight=weight, sweep=rows,
                   toy_model=json.loads((args.model / "toy_train.json").read_text()).get("train_s"),
                   settings={k: str(v) for k, v in vars(args).items()},
                   elapsed_s=round(time.perf_counter() - started, 1))
    (args.results / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"done in {summary['elapsed_s'] / 60:.1f} min: baseline ppl {base['ppl']:.3f} reuse "
          f"{base['reuse']:.4f}; remoe (λ={weight:g}) ppl {main_row['ppl']:.3f} "
          f"({main_row['ppl_change_pct']:+.2f}%) reuse {main_row['reuse']:.4f} "
          f"({main_row['reuse_gain_pct']:+.1f}%)")


if __name__ == "__main__":
    main()
