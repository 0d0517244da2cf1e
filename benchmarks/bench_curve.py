"""Whole-curve cost: ``mc.curve`` (every capacity) against one ``mc.replay``, both scopes.

Goal: for lru, lfu and opt, the whole curve costs at most 2x a single-capacity replay of
the same trace. Both calls get the trace's step sets, global keys and routing totals
already built (they are cached on the trace after its first replay), so the ratio
compares the simulation work: one stack pass against one replay at C = 16 per layer
(C = 16 x L in global scope). Layer scope
also prints the slow way, one replay per capacity. Replay and curve alternate, and each
keeps its best time of ``--repeat`` runs, so a drift in machine load hits both alike.

Run: ``python benchmarks/bench_curve.py`` (8 layers of 64 experts, 10M requests) or
``--quick``; larger models e.g. ``--layers 58 --experts 256 --scope global``.
"""

from __future__ import annotations

import argparse
import time

import moecache as mc

GOAL = 2.0
PER_LAYER_CAPACITY = 16


def seconds(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def best_of_alternating(repeat: int, *calls) -> list[float]:
    """The best time of each call (fn, *args) over ``repeat`` rounds that run them in turn."""
    rounds = [[seconds(*call) for call in calls] for _ in range(repeat)]
    return [min(times) for times in zip(*rounds, strict=True)]


def replay_each(trace: mc.Trace, policy: str, capacities: range) -> None:
    for capacity in capacities:
        mc.replay(trace, policy, capacity)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=10_000_000)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--scope", choices=("layer", "global", "both"), default="both")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="400,000 requests, best of 1")
    args = parser.parse_args()
    if args.quick:
        args.requests, args.repeat = 400_000, 1
    experts, top_k = args.experts, 8
    tokens = args.requests // (top_k * args.layers)
    trace = mc.synth(layers=args.layers, experts=experts, top_k=top_k, tokens=tokens, stickiness=0.5,
                     skew=0.8, seed=20240601)
    print(f"trace: {args.layers} layer(s), E={experts}, K={top_k}, {tokens:,} tokens = "
          f"{args.requests:,} requests; best of {args.repeat}")
    small = mc.synth(layers=2, experts=experts, top_k=top_k, tokens=64, seed=1)
    print(f"{'scope':<7}{'policy':<7}{'replay':>8} {'at C':>5} {'curve':>8} {'of C':>9} {'ratio':>7} "
          f"{'goal':>5} {'one replay per C':>17}")
    scopes = ("layer", "global") if args.scope == "both" else (args.scope,)
    over: dict[str, list[str]] = {scope: [] for scope in scopes}
    for scope in scopes:
        layers = args.layers if scope == "global" else 1
        capacity, top = PER_LAYER_CAPACITY * layers, experts * layers
        for policy in ("lru", "lfu", "opt"):
            mc.curve(small, policy, scope)  # compile outside the timings
            mc.replay(trace, policy, capacity, scope)  # builds and caches the step sets
            single, whole = best_of_alternating(
                args.repeat, (mc.replay, trace, policy, capacity, scope), (mc.curve, trace, policy, scope))
            slow = "-"
            if scope == "layer":
                slow = f"{seconds(replay_each, trace, policy, range(top_k, top + 1)):.2f}s"
            ratio = whole / single
            if ratio > GOAL:
                over[scope].append(policy)
            print(f"{scope:<7}{policy:<7}{single:>7.3f}s {capacity:>5} {whole:>7.3f}s {f'{top_k}..{top}':>9} "
                  f"{ratio:>6.2f}x {GOAL:>4.0f}x {slow:>17}")
    for scope, policies in over.items():
        verdict = f"FAIL ({', '.join(policies)})" if policies else "PASS"
        print(f"GOAL (curve <= {GOAL:.0f}x one replay), {scope} scope: {verdict}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
