"""Locality metrics (reuse by window, bootstrap over sequences) and the figures of `moecache plot`."""

import warnings

import matplotlib.image
import numpy as np
import pandas as pd
import pytest
from hypothesis import given
from hypothesis import strategies as st

import moecache as mc
from moecache import locality
from moecache.plots import FIGURES, PlotNote, curve_at, plot_results
from moecache.sweep import sweep

from .strategies import make_trace, routings

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# -- slow reference --------------------------------------------------------------------------

def reference_window_counts(trace, max_window, per_token=False):
    """(reused[w-1][l], requests[l]) straight from the definition, with Python sets."""
    experts, num_layers = trace.experts, trace.num_layers
    if per_token:
        groups = [[n] for n in range(trace.num_tokens)]
    else:
        groups = {}
        for n, s in enumerate(trace.step.tolist()):
            groups.setdefault(s, []).append(n)
        groups = list(groups.values())
    sets = [[set(experts[groups[t], layer].ravel().tolist()) for layer in range(num_layers)]
            for t in range(len(groups))]
    reused = np.zeros((max_window, num_layers), np.int64)
    requests = np.zeros(num_layers, np.int64)
    for t in range(1, len(sets)):
        for layer in range(num_layers):
            requests[layer] += len(sets[t][layer])
            for w in range(1, max_window + 1):
                window = set().union(*(sets[u][layer] for u in range(max(0, t - w), t)))
                reused[w - 1, layer] += len(sets[t][layer] & window)
    return reused, requests


@given(data=routings(max_layers=3, max_experts=8, max_tokens=30), max_window=st.integers(1, 6),
       per_token=st.booleans())
def test_reuse_by_window_matches_reference(data, max_window, per_token):
    experts, step, num_experts = data
    trace = make_trace(experts, step, num_experts)
    want_reused, want_requests = reference_window_counts(trace, max_window, per_token)
    reused, requests = locality.window_counts(trace, max_window, per_token=per_token)
    np.testing.assert_array_equal(reused, want_reused)
    np.testing.assert_array_equal(requests, want_requests)

    pooled = locality.reuse_by_window(trace, max_window, per_token=per_token)
    assert pooled["window"].tolist() == list(range(1, max_window + 1))
    assert pooled["reused"].tolist() == want_reused.sum(axis=1).tolist()
    per_layer = locality.reuse_by_window(trace, max_window, per_layer=True, per_token=per_token)
    assert per_layer["reused"].tolist() == want_reused.ravel().tolist()
    assert per_layer["layer"].tolist() == np.tile(trace.layers, max_window).tolist()
    if want_requests.sum():
        assert pooled["reuse"].tolist() == (want_reused.sum(axis=1) / want_requests.sum()).tolist()
        assert np.all(np.diff(pooled["reuse"]) >= 0)
    else:
        assert pooled["reuse"].isna().all()


@given(data=routings(max_layers=3, max_experts=8, max_tokens=30), per_token=st.booleans())
def test_window_one_is_the_reuse_rate(data, per_token):
    experts, step, num_experts = data
    trace = make_trace(experts, step, num_experts)
    result = mc.replay(trace, "lru", num_experts, per_token=per_token)
    pooled = locality.reuse_by_window(trace, 3, per_token=per_token)
    layers = locality.per_layer_reuse(trace, per_token=per_token)
    if np.isnan(result.reuse_rate):
        assert np.isnan(pooled["reuse"].iloc[0])
        return
    assert pooled["reuse"].iloc[0] == result.reuse_rate  # exactly: same sums, same division
    assert layers["reused"].tolist() == result.per_layer["reuse_hits"].tolist()
    assert layers["requests"].tolist() == result.per_layer["reuse_requests"].tolist()
    np.testing.assert_array_equal(layers["reuse"], result.per_layer["reuse_rate"])


def test_window_rejects_zero():
    trace = mc.synth(layers=1, experts=8, top_k=2, tokens=10)
    with pytest.raises(mc.MoecacheError, match="at least 1 step"):
        locality.reuse_by_window(trace, 0)


# -- bootstrap -------------------------------------------------------------------------------

def test_sequence_blocks_keep_batched_sequences_together():
    experts = np.zeros((7, 1, 1), np.int16)
    seq = np.array([0, 1, 0, 1, 2, 2, 3])
    step = np.array([0, 0, 1, 1, 2, 3, 4])  # sequences 0 and 1 share steps; 2 and 3 stand alone
    trace = mc.Trace.from_arrays(experts, num_experts=2, seq=seq, step=step)
    assert locality.sequence_blocks(trace).tolist() == [0, 4, 6, 7]


def test_resample_draws_whole_sequences():
    trace = mc.synth(layers=2, experts=16, top_k=3, tokens=240, sequences=6, prompt_len=5, seed=4)
    blocks = locality.sequence_blocks(trace)
    assert len(blocks) == 7
    originals = {trace.experts[a:b].tobytes() for a, b in zip(blocks[:-1], blocks[1:], strict=True)}
    sample = locality.resample_sequences(trace, np.random.default_rng(1))
    assert sample.num_tokens == trace.num_tokens and sample.meta == trace.meta
    mc.Trace(experts=sample.experts, step=sample.step, seq=sample.seq, pos=sample.pos,
             token_id=sample.token_id, phase=sample.phase, meta=sample.meta)  # validates
    new_blocks = locality.sequence_blocks(sample)
    assert len(new_blocks) == 7
    for a, b in zip(new_blocks[:-1], new_blocks[1:], strict=True):
        assert sample.experts[a:b].tobytes() in originals
    # each prompt is still one step, and steps are numbered 0, 1, 2, ...
    assert sample.num_steps == trace.num_steps
    assert sample.step.tolist() == (np.cumsum(np.diff(sample.step, prepend=-1) != 0) - 1).tolist()


def test_bootstrap_is_reproducible_and_brackets_the_estimate():
    parts = [mc.synth(layers=2, experts=16, top_k=2, tokens=150, stickiness=s, seed=i)
             for i, s in enumerate([0.1, 0.5, 0.9, 0.3, 0.7, 0.2, 0.6, 0.4])]
    seq = np.repeat(np.arange(len(parts)), [p.num_tokens for p in parts])
    trace = mc.Trace.from_arrays(np.concatenate([p.experts for p in parts]), num_experts=16, seq=seq)

    def stat(tr):
        return locality.reuse_by_window(tr, 4)["reuse"]

    first = locality.bootstrap_over_sequences(trace, stat, n=40, seed=7)
    again = locality.bootstrap_over_sequences(trace, stat, n=40, seed=7, workers=2)
    other = locality.bootstrap_over_sequences(trace, stat, n=40, seed=8)
    assert first.shape == (40, 4)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    assert first.std(axis=0).min() > 0  # heterogeneous sequences: the replicates differ

    band = locality.reuse_by_window_band(trace, 4, n=40, seed=7)
    point = band["reuse"].to_numpy()
    assert np.all(band["low"] <= point) and np.all(point <= band["high"])
    assert np.all(band["low"] < band["high"])
    np.testing.assert_allclose(band["low"], np.quantile(first, 0.025, axis=0))

    dict_stat = locality.bootstrap_over_sequences(trace, lambda tr: {"a": stat(tr), "b": 1.0}, n=3)
    assert dict_stat["a"].shape == (3, 4) and dict_stat["b"].tolist() == [1.0, 1.0, 1.0]


def test_bootstrap_needs_two_sequences():
    trace = mc.synth(layers=1, experts=8, top_k=2, tokens=50)
    with pytest.raises(mc.MoecacheError, match="at least 2 sequences"):
        locality.bootstrap_over_sequences(trace, lambda tr: 0.0, n=5)


def test_bootstrap_curve_statistic_equals_curve():
    trace = mc.synth(layers=3, experts=12, top_k=3, tokens=200, sequences=4, seed=3)
    req = mc.Requests.from_trace(trace)
    for policy in ("lru", "lfu", "opt"):
        for scope in ("layer", "global"):
            frame = mc.curve(trace, policy, scope)
            caps = frame["capacity"].tolist()
            hit_rate, per_token = curve_at(trace, req, policy, scope, caps)
            np.testing.assert_allclose(hit_rate, frame["hit_rate"], rtol=1e-12)
            np.testing.assert_allclose(per_token, frame["bytes_per_token"].astype(float), rtol=1e-12)


# -- figures ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    folder = tmp_path_factory.mktemp("plots")
    paths = []
    for router, stickiness in (("baseline", 0.2), ("remoe", 0.7)):
        trace = mc.synth(layers=3, experts=12, top_k=2, tokens=300, sequences=6, stickiness=stickiness,
                         seed=5)
        trace.meta["router"] = router
        paths.append(str(trace.save(folder / f"{router}.parquet")))
    results = folder / "results.parquet"
    sweep(paths, policies=("lru", "fifo", "opt"), scopes=("layer", "global"), out=results, progress=False)
    return folder, results, paths


def assert_figure_files(files, out_dir, formats=("png", "pdf")):
    assert sorted(p.name for p in files) == sorted(f"{n}.{f}" for n in FIGURES for f in formats)
    for path in files:
        data = path.read_bytes()
        assert len(data) > 10_000, path
        if path.suffix == ".png":
            assert data.startswith(PNG_MAGIC)
        else:
            assert data.startswith(b"%PDF-") and data.rstrip().endswith(b"%%EOF")
    assert sorted(out_dir.iterdir()) == sorted(files)  # no temporary files left behind


def test_plot_results_writes_every_figure(swept, tmp_path):
    _, results, _ = swept
    notes = []
    files = plot_results(results, tmp_path / "fig", bootstrap=8, max_window=6, on_note=notes.append)
    assert_figure_files(files, tmp_path / "fig")
    assert notes == [f"{r}: no bootstrap bands for fifo (one replay per capacity and resample would be "
                     "needed); bands cover lru, lfu and opt" for r in ("baseline", "remoe")]
    image = matplotlib.image.imread(tmp_path / "fig" / "hit_rate_vs_capacity.png")
    assert image.shape[1] > 1000 and image[..., :3].std() > 0.05  # drawn, not blank


def test_plot_results_from_csv_frame_and_explicit_traces(swept, tmp_path):
    folder, results, paths = swept
    table = pd.read_csv(folder / "results.csv")
    table["trace"] = table["trace"].map(lambda p: f"moved/{p.rsplit('/', 1)[-1]}")
    with pytest.warns(PlotNote) as caught:
        files = plot_results(table, tmp_path / "a", formats=("png",))
    assert sorted(p.stem for p in files) == ["bytes_per_token_vs_capacity", "hit_rate_vs_capacity"]
    assert [str(w.message) for w in caught] == [
        "moved/baseline.parquet: trace not found; it is left out of the reuse figures",
        "moved/remoe.parquet: trace not found; it is left out of the reuse figures",
        "reuse_vs_window skipped: no trace file found (pass the traces explicitly)",
        "per_layer_reuse skipped: no trace file found (pass the traces explicitly)"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matched by file name: nothing left out
        files = plot_results(table, tmp_path / "b", traces=paths, formats=["png"])
    assert_figure_files(files, tmp_path / "b", formats=("png",))


def test_plot_without_expert_sizes_skips_bytes(tmp_path):
    paths = []
    for router in ("baseline", "remoe"):
        trace = mc.synth(layers=2, experts=8, top_k=2, tokens=60, seed=1, expert_bytes=None)
        trace.meta["router"] = router
        paths.append(trace.save(tmp_path / f"{router}.parquet"))
    results = tmp_path / "r.csv"
    sweep(paths, policies=("lru",), out=results, progress=False)
    notes = []
    files = plot_results(results, tmp_path / "fig", formats=("pdf",), on_note=notes.append)
    assert "bytes_per_token_vs_capacity.pdf" not in [p.name for p in files] and len(files) == 3
    assert any("no expert_bytes" in n for n in notes)


def test_plot_errors_are_one_line(tmp_path):
    with pytest.raises(mc.MoecacheError, match="no such file"):
        plot_results(tmp_path / "missing.parquet", tmp_path / "out")
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"not parquet at all")
    with pytest.raises(mc.MoecacheError, match="unreadable results table"):
        plot_results(garbage, tmp_path / "out")
    other = tmp_path / "other.csv"
    pd.DataFrame({"trace": ["x"], "capacity": [3]}).to_csv(other, index=False)
    with pytest.raises(mc.MoecacheError, match="missing columns 'policy', 'scope', 'hit_rate', 'reuse_rate'"):
        plot_results(other, tmp_path / "out")
    empty = tmp_path / "empty.csv"
    empty.write_text("trace,policy,scope,capacity,hit_rate,reuse_rate\n")
    with pytest.raises(mc.MoecacheError, match="empty"):
        plot_results(empty, tmp_path / "out")
    table = pd.DataFrame({"trace": ["x"], "policy": ["lru"], "scope": ["layer"], "capacity": [4],
                          "hit_rate": [0.5], "reuse_rate": [0.4]})
    with pytest.raises(mc.MoecacheError, match="unknown figure format 'jpg'"):
        plot_results(table, tmp_path / "out", formats=("png", "jpg"))
    for window in (0, 100_000_000):
        with pytest.raises(mc.MoecacheError, match=f"--window must be from 1 to 4096 steps, got {window}"):
            plot_results(table, tmp_path / "out", max_window=window)
    assert not (tmp_path / "out").exists()
