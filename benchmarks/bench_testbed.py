"""The timeline's decode-time prediction against real O_DIRECT reads on this machine (issue 14, point 5).

Goal: over at least 12 configurations (policies lru/lfu/fifo x 2 capacities x prefetch
none/oracle), the median |predicted - measured| / measured of the mean TPOT is at most 10%.

Methodology
-----------
* Workload: ``moecache.synth(layers=4, experts=32, top_k=4, tokens=--tokens, seed=0,
  expert_bytes=--expert-bytes)``, batch-1 decode (one token per step).
* One expert file for all configurations (``moecache.testbed.expert_file``: every
  (layer, expert)'s bytes, random, fsynced, read with O_DIRECT); each configuration is one
  ``moecache.testbed.testbed`` call: the disk is calibrated right before it
  (``calibrate``: 4 KiB reads one at a time for the latency, expert-size reads at the
  queue depth for the bandwidth, 0.4 s each), then the trace is replayed for real, then the
  timeline predicts it with that link and the device times as they ran (docs/testbed.md).
* Two predictions per row: with the link calibrated before the run (the goal's figure),
  and with the bandwidth the run's own reads got (bytes over the time a read was in service,
  ``observed_link``): their gap is the disk's drift between calibration and run, not the
  model's error.
* Nothing is fitted to the measured TPOT: every input of the prediction is measured apart
  from it.

Run: ``.venv/bin/python benchmarks/bench_testbed.py`` (about 2-4 minutes; ``--json FILE``
writes the rows).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from tqdm import tqdm

import moecache as mc
from moecache.testbed import expert_file, testbed
from moecache.units import parse_bytes

POLICIES = ("lru", "lfu", "fifo")
CAPACITIES = (8, 16)
PREFETCH = (None, "oracle")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=300)
    parser.add_argument("--expert-bytes", default="1MiB")
    parser.add_argument("--compute-us", type=float, default=400.0)
    parser.add_argument("--dense-us", type=float, default=200.0)
    parser.add_argument("--queue-depth", type=int, default=4)
    parser.add_argument("--directory", default=str(Path(__file__).resolve().parent),
                        help="where the expert file goes (a local disk that takes O_DIRECT)")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    size = parse_bytes(args.expert_bytes)
    trace = mc.synth(layers=4, experts=32, top_k=4, tokens=args.tokens, seed=0, expert_bytes=size)
    configs = [(p, c, f) for p in POLICIES for c in CAPACITIES for f in PREFETCH]
    rows = []
    started = time.perf_counter()
    with expert_file(trace.num_layers * trace.num_experts, size, args.directory) as store:
        for policy, capacity, prefetch in tqdm(configs, desc="configurations", unit="config"):
            r = testbed(trace, policy, capacity, prefetch=prefetch, compute_us=args.compute_us,
                        dense_us=args.dense_us, queue_depth=args.queue_depth, store=store)
            rows.append({"config": f"{policy} C={capacity} {prefetch or 'none'}", **r.to_dict()})
    elapsed = time.perf_counter() - started
    print(f"\n{trace.num_tokens} tokens, 4 layers, E=32, K=4, experts of {size} B, busy-waits "
          f"{args.dense_us:.0f} us/position + {args.compute_us:.0f} us/expert, "
          f"queue depth {args.queue_depth}; {elapsed:.0f} s in all\n")
    head = (f"{'config':<18} {'hit':>5} {'measured':>9} {'predicted':>9} {'|err|':>6}  {'link MB/s':>9} "
            f"{'seen MB/s':>9} {'pred@seen':>9} {'|err|':>6}  {'expert us':>9}")
    print(head)
    print("-" * len(head))
    for row in rows:
        hit = row["hits"] / (row["hits"] + row["misses"])
        print(f"{row['config']:<18} {hit:5.2f} {1e3 * row['measured_tpot_s']:7.2f}ms "
              f"{1e3 * row['predicted_tpot_s']:7.2f}ms {100 * abs(row['relative_error']):5.1f}%  "
              f"{row['link']['bandwidth'] / 1e6:9.0f} {row['observed_link']['bandwidth'] / 1e6:9.0f} "
              f"{1e3 * row['predicted_observed_tpot_s']:7.2f}ms {100 * abs(row['observed_error']):5.1f}%  "
              f"{1e6 * row['device_expert_s']:9.0f}")
    median = statistics.median(abs(row["relative_error"]) for row in rows)
    seen = statistics.median(abs(row["observed_error"]) for row in rows)
    print(f"\nmedian |predicted - measured| / measured: {100 * median:.1f}% with the calibrated link "
          f"(goal <= 10%: {'met' if median <= 0.10 else 'NOT met'}); {100 * seen:.1f}% with the bandwidth "
          "the run's reads got")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
