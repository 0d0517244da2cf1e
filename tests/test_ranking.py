"""The fair ranking (moecache.ranking, `moecache rank`): split by sequence, test-only hits, gap share."""

import math

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

import moecache as mc
from moecache.cli import cli
from moecache.errors import MoecacheError
from moecache.ranking import fitted, held_out_hits, rank
from moecache.requests import Requests
from moecache.splits import split_by_sequence

from .reference import simulate, step_sets

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def tiny_trace(sequences=6, tokens=5, seed=1):
    """Two sequences per step (batched decode), so a step can straddle the split."""
    rng = np.random.default_rng(seed)
    n = sequences * tokens
    experts = np.stack([np.stack([rng.choice(8, 2, replace=False) for _ in range(2)]) for _ in range(n)])
    seq = np.array([2 * (i // (2 * tokens)) + i % 2 for i in range(n)])  # pairs of sequences interleaved
    step = np.arange(n) // 2
    return mc.Trace.from_arrays(experts, num_experts=8, seq=seq, step=step)


def reference_test_hits(split, spec, capacity, params=None):
    """Hits and requests on the test steps, from the slow reference replay of the reordered arrays."""
    trace = split.trace
    sets = step_sets(trace.experts, trace.step)
    start = len(step_sets(trace.experts[:split.train_tokens], trace.step[:split.train_tokens]))
    hits = requests = 0
    for layer in range(trace.num_layers):
        layer_sets = [s[layer] for s in sets]
        per_request, _ = simulate(layer_sets, spec, capacity, params=params)
        hits += sum(per_request[start:])
        requests += sum(len(s) for s in layer_sets[start:])
    return hits, requests


def test_split_is_by_sequence_and_seeded():
    trace = tiny_trace()
    split = split_by_sequence(trace, 0.5, seed=3)
    again = split_by_sequence(trace, 0.5, seed=3)
    assert split.train_seqs.tolist() == again.train_seqs.tolist()
    assert np.array_equal(split.trace.experts, again.trace.experts)
    assert len(split.train_seqs) == 3
    assert {tuple(split_by_sequence(trace, 0.5, seed=s).train_seqs) for s in range(8)} != \
        {tuple(split.train_seqs)}
    reordered, start = split.trace, split.train_steps()
    in_train = np.isin(reordered.seq, split.train_seqs)
    assert in_train[:split.train_tokens].all() and not in_train[split.train_tokens:].any()
    assert (reordered.step[split.train_tokens:] >= start).all()
    assert (reordered.step[:split.train_tokens] < start).all()
    assert np.array_equal(np.unique(reordered.step), np.arange(reordered.step[-1] + 1))
    # every token kept, each sequence's tokens in their order
    for s in np.unique(trace.seq):
        assert np.array_equal(reordered.experts[reordered.seq == s], trace.experts[trace.seq == s])


def test_split_needs_two_sequences():
    trace = mc.Trace.from_arrays(np.zeros((4, 1, 1), np.int32), num_experts=2)
    with pytest.raises(MoecacheError, match="<memory>: a train/test split needs at least 2 sequences"):
        split_by_sequence(trace)


@pytest.mark.parametrize("spec", ["lru", "lfu", "fifo", "opt"])
def test_held_out_hits_match_reference(spec):
    split = split_by_sequence(tiny_trace(), 0.5, seed=0)
    for capacity in (4, 5, 6):
        assert held_out_hits(split, spec, capacity) == reference_test_hits(split, spec, capacity)


def test_pinned_gets_the_training_share():
    split = split_by_sequence(tiny_trace(sequences=10), 0.3, seed=2)
    start = split.train_steps()
    steps = Requests.from_trace(split.trace).num_steps
    choice = fitted("pinned:n=3", start, steps, split.trace.num_layers)
    train, n = choice.params
    assert n == 3
    assert math.ceil(train * steps) == start and math.ceil(train * steps * 2) == 2 * start
    assert fitted("lru", start, steps, 2).label == "lru"
    for capacity in (4, 6):
        expected = reference_test_hits(split, "pinned", capacity, params={"train": train, "n": 3})
        assert held_out_hits(split, "pinned:n=3", capacity) == expected


def test_gap_share_of_lru_is_0_and_of_opt_is_1():
    frame, table = rank([tiny_trace()], ["lfu"], [4, 5, 8], seed=0)
    assert list(frame["policy"].unique()) == ["lfu", "lru", "opt"]
    by = frame.set_index(["policy", "capacity"])
    defined = by.loc["opt", "gap_share"].notna()
    assert defined.any() and not defined.all()  # capacity 8 holds every expert: OPT == LRU
    assert (by.loc["lru", "gap_share"][defined] == 0).all()
    assert (by.loc["opt", "gap_share"][defined] == 1).all()
    split = split_by_sequence(tiny_trace(), 0.5, seed=0)
    hits = {p: held_out_hits(split, p, 4)[0] for p in ("lfu", "lru", "opt")}
    assert by.loc[("lfu", 4), "gap_share"] == (hits["lfu"] - hits["lru"]) / (hits["opt"] - hits["lru"])
    assert by.loc[("lfu", 4), "test_requests"] == reference_test_hits(split, "lru", 4)[1]
    assert table["policy"].tolist()[0] == "opt"
    pooled = {p: sum(held_out_hits(split, p, c)[0] for c in (4, 5, 8)) for p in ("lfu", "lru", "opt")}
    assert table.set_index("policy").loc["lfu", "gap_share"] == pytest.approx(
        (pooled["lfu"] - pooled["lru"]) / (pooled["opt"] - pooled["lru"]))


def test_cli_writes_the_files(tmp_path):
    path = tmp_path / "t.parquet"
    tiny_trace().save(path)
    out = tmp_path / "rank"
    result = CliRunner().invoke(cli, ["rank", str(path), "--policies", "lfu,pinned", "--capacities", "4,6",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(out / "ranking.csv")
    assert len(frame) == 8 and set(frame["policy"]) == {"lfu", "pinned", "lru", "opt"}
    assert set(pd.read_csv(out / "table.csv")["policy"]) == {"lfu", "pinned", "lru", "opt"}
    assert (out / "ranking.png").read_bytes().startswith(PNG_MAGIC)
    again = CliRunner().invoke(cli, ["rank", str(path), "--policies", "lru", "--capacities", "4",
                                     "--out", str(out)])
    assert again.exit_code == 2 and again.output.count("\n") == 1 and "already exists" in again.output


def test_cli_one_sequence_is_one_line(tmp_path):
    path = tmp_path / "one.parquet"
    mc.Trace.from_arrays(np.zeros((4, 1, 1), np.int32), num_experts=2).save(path)
    result = CliRunner().invoke(cli, ["rank", str(path), "--capacities", "1", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert result.output == f"moecache: error: {path}: a train/test split needs at least 2 sequences, " \
                            "the trace has 1\n"


def test_a_trace_given_twice_is_an_error(tmp_path):
    path = tmp_path / "t.parquet"
    tiny_trace().save(path)
    with pytest.raises(MoecacheError, match="given twice"):
        rank([path, tmp_path / "." / "t.parquet"], ["lfu"], [4])
