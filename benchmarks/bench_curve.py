"""Whole-curve cost: ``mc.curve`` (every capacity K..E) against one ``mc.replay``.

Goal: for lru, lfu and opt, the whole curve costs at most 2x a single-capacity replay of
the same trace. Both calls get the trace's step sets already built (they are cached on
the trace after its first replay), so the ratio compares the simulation work: one
Mattson priority-stack pass against one replay at C = 16. Also printed: the same curve
computed the slow way, one replay per capacity. Times are the best of ``--repeat``.

Run: ``python benchmarks/bench_curve.py`` (10M requests) or ``--quick``.
"""

from __future__ import annotations

import argparse
import time

import moecache as mc

GOAL = 2.0


def best(repeat: int, fn) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=10_000_000)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="200,000 requests, best of 1")
    args = parser.parse_args()
    if args.quick:
        args.requests, args.repeat = 200_000, 1
    tokens = args.requests // (8 * args.layers)
    trace = mc.synth(layers=args.layers, experts=64, top_k=8, tokens=tokens, stickiness=0.5, skew=0.8,
                     seed=20240601)
    print(f"trace: {args.layers} layer(s), E=64, K=8, {tokens:,} tokens = {args.requests:,} requests; "
          f"best of {args.repeat}")
    small = mc.synth(layers=1, experts=64, top_k=8, tokens=64, seed=1)
    print(f"{'policy':<6} {'replay C=16':>12} {'curve 8..64':>12} {'ratio':>7} {'goal':>5} "
          f"{'57 replays':>11}")
    verdict = True
    for policy in ("lru", "lfu", "opt"):
        mc.curve(small, policy)  # compile outside the timings
        mc.replay(trace, policy, 16)  # builds and caches the step sets
        single = best(args.repeat, lambda p=policy: mc.replay(trace, p, 16))
        whole = best(args.repeat, lambda p=policy: mc.curve(trace, p))
        slow = best(1, lambda p=policy: [mc.replay(trace, p, c) for c in range(8, 65)])
        ratio = whole / single
        verdict &= ratio <= GOAL
        print(f"{policy:<6} {single:>11.3f}s {whole:>11.3f}s {ratio:>6.2f}x {GOAL:>4.0f}x {slow:>10.2f}s")
    print(f"GOAL (curve <= {GOAL:.0f}x one replay): {'PASS' if verdict else 'FAIL'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
