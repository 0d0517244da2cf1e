"""`capture --lookahead`, the optional `lookahead` trace columns and the `lookahead-gate`
prefetcher (issue 14, point 2): the next MoE layer's router applied to the current layer's
router input, recorded for every architecture capture supports."""

from __future__ import annotations

import functools

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

import moecache as mc
from moecache import prefetchers, profiles
from moecache.cli import cli
from moecache.errors import MoecacheError
from moecache.timeline import timeline
from moecache.trace_io import TraceWriter

from .tiny_models import ARCHS, PROMPTS, save_tiny_model

K, E = 2, 6


# -- hand-made traces ---------------------------------------------------------------------------

def with_lookahead(experts, lookahead, *, weights=None, lookahead_weights=None, step=None, num_experts=E,
                   sequences=1):
    """A trace with expert sizes and a dtype, so that the timeline runs on it."""
    experts = np.asarray(experts, np.int16)
    seq = np.arange(len(experts)) * sequences // len(experts)
    return mc.Trace.from_arrays(experts, num_experts=num_experts, weights=weights, seq=seq, step=step,
                                expert_bytes=4096, meta={"dtype": "float32"}, lookahead=lookahead,
                                lookahead_weights=lookahead_weights)


def true_next(experts, weights=None):
    """The lookahead a perfect gate would record: layer l + 1's experts (and weights)."""
    ahead = np.full_like(experts, -1)
    ahead[:, :-1] = experts[:, 1:]
    if weights is None:
        return ahead, None
    ahead_weights = np.full_like(weights, np.nan)
    ahead_weights[:, :-1] = weights[:, 1:]
    return ahead, ahead_weights


def random_routing(tokens, layers, seed=0):
    rng = np.random.default_rng(seed)
    experts = np.stack([[rng.permutation(E)[:K] for _ in range(layers)] for _ in range(tokens)])
    weights = -np.sort(-rng.random((tokens, layers, K)), axis=2).astype(np.float32)
    return experts.astype(np.int16), weights


@pytest.fixture()
def trace():
    experts, weights = random_routing(20, 3)
    ahead, ahead_weights = true_next(random_routing(20, 3, seed=1)[0], weights)
    return with_lookahead(experts, ahead, weights=weights, lookahead_weights=ahead_weights,
                          step=np.arange(20) // 2)


# -- trace format ---------------------------------------------------------------------------------

def test_round_trip_and_column_choice(tmp_path, trace):
    path = trace.save(tmp_path / "t.parquet")
    assert pq.read_schema(path).field("lookahead").type == pa.list_(pa.int16(), K)
    back = mc.Trace.load(path)
    np.testing.assert_array_equal(back.lookahead, trace.lookahead)
    np.testing.assert_array_equal(back.lookahead_weights, trace.lookahead_weights)  # NaN == NaN here
    light = mc.Trace.load(path, weights=False)
    assert light.lookahead is not None and light.lookahead_weights is None
    assert mc.Trace.load(path, lookahead=False).lookahead is None
    # streamed in blocks: the same file content
    with TraceWriter(tmp_path / "s.parquet", trace.meta, with_weights=True, with_lookahead=True,
                     flush_tokens=7) as writer:
        for start in range(0, 20, 4):
            rows = slice(start, start + 4)
            writer.write(trace.experts[rows], step=trace.step[rows], seq=trace.seq[rows], pos=trace.pos[rows],
                         phase=trace.phase[rows], weights=trace.weights[rows],
                         lookahead=trace.lookahead[rows], lookahead_weights=trace.lookahead_weights[rows])
    streamed = mc.Trace.load(tmp_path / "s.parquet")
    np.testing.assert_array_equal(streamed.lookahead, trace.lookahead)
    np.testing.assert_array_equal(streamed.lookahead_weights, trace.lookahead_weights)
    code = CliRunner().invoke(cli, ["info", str(path)])
    assert code.exit_code == 0 and "weights, lookahead, lookahead_weights" in code.stdout


def test_old_files_read_without_the_column(tmp_path, trace):
    plain = mc.Trace.from_arrays(trace.experts, num_experts=E, weights=trace.weights)
    back = mc.Trace.load(plain.save(tmp_path / "p.parquet"))
    assert back.lookahead is None and back.lookahead_weights is None


@pytest.mark.parametrize("edit, message", [
    (lambda a: a.__setitem__((3, 1, 0), E), f"lookahead id {E} is outside \\[0, num_experts {E}\\) "
                                            "\\(token 3, layer 1\\)"),
    (lambda a: a.__setitem__((4, 0, 1), -1), "lookahead id -1 is -1 \\(no next layer\\) before the last "
                                             "MoE layer \\(token 4, layer 0\\)"),
    (lambda a: a.__setitem__((5, 2, 0), 1), "lookahead of the last MoE layer \\(layer 2\\) must be -1"),
    (lambda a: a.__setitem__((6, 0, 1), a[6, 0, 0]), "duplicate expert id in one lookahead row"),
])
def test_bad_values_name_the_file(tmp_path, trace, edit, message):
    ahead = trace.lookahead.copy()
    edit(ahead)
    with pytest.raises(mc.TraceError, match=message):
        with_lookahead(trace.experts, ahead)
    path = tmp_path / "bad.parquet"
    table = pq.read_table(trace.save(tmp_path / "t.parquet"))
    column = pa.FixedSizeListArray.from_arrays(pa.array(ahead.reshape(-1), pa.int16()), K)
    pq.write_table(table.set_column(table.schema.get_field_index("lookahead"), "lookahead", column), path)
    with pytest.raises(mc.TraceError, match=message) as info:
        mc.Trace.load(path)
    assert str(info.value).startswith(f"{path}: ") and "\n" not in str(info.value)


def test_bad_shapes(trace):
    with pytest.raises(mc.TraceError, match="lookahead has shape \\(20, 2, 2\\), experts \\(20, 3, 2\\)"):
        with_lookahead(trace.experts, trace.lookahead[:, 1:])
    with pytest.raises(mc.TraceError, match="lookahead_weights has shape"):
        with_lookahead(trace.experts, trace.lookahead, lookahead_weights=trace.lookahead_weights[:5])
    with pytest.raises(mc.TraceError, match="lookahead_weights without a lookahead column"):
        with_lookahead(trace.experts, None, lookahead_weights=trace.lookahead_weights)


def test_a_file_with_another_k_is_an_error(tmp_path, trace):
    path = tmp_path / "k.parquet"
    table = pq.read_table(trace.save(tmp_path / "t.parquet"))
    wide = np.concatenate([trace.lookahead, trace.lookahead[:, :, :1]], axis=2)
    column = pa.FixedSizeListArray.from_arrays(pa.array(wide.reshape(-1), pa.int16()), K + 1)
    pq.write_table(table.set_column(table.schema.get_field_index("lookahead"), "lookahead", column), path)
    with pytest.raises(mc.TraceError, match=f"{path}: inconsistent K: lookahead column"):
        mc.Trace.load(path)


# -- the prefetcher -------------------------------------------------------------------------------

def view(trace, depth=1, budget=8):
    req = mc.Requests.from_trace(trace)
    scores = req.scores(trace) if trace.weights is not None else None
    return prefetchers.Lookahead(req, scores, depth, budget, 0, trace)


def batches_of(plan):
    return [plan.experts[a:b].tolist() for a, b in zip(plan.offsets[:-1], plan.offsets[1:], strict=True)]


def test_batches_on_a_hand_made_trace():
    """Two steps of two tokens, three layers: batch (t, l) = union of lookahead[token, l - 1]."""
    experts = np.zeros((4, 3, K), np.int16) + np.array([0, 1], np.int16)
    ahead = np.array([[[3, 1], [5, 4], [-1, -1]],
                      [[2, 3], [0, 4], [-1, -1]],
                      [[0, 1], [2, 3], [-1, -1]],
                      [[0, 5], [3, 2], [-1, -1]]], np.int16)
    weights = np.array([[[0.9, 0.1], [0.6, 0.5], [np.nan, np.nan]],
                        [[0.8, 0.7], [0.9, 0.2], [np.nan, np.nan]],
                        [[0.5, 0.4], [0.6, 0.1], [np.nan, np.nan]],
                        [[0.3, 0.2], [0.7, 0.65], [np.nan, np.nan]]], np.float32)
    step = np.array([0, 0, 1, 1])
    ranked = prefetchers.plan("lookahead-gate", view(with_lookahead(
        experts, ahead, lookahead_weights=weights, step=step)))
    assert batches_of(ranked) == [[], [3, 2, 1], [0, 5, 4], [], [0, 1, 5], [3, 2]]
    cut = prefetchers.plan("lookahead-gate", view(with_lookahead(
        experts, ahead, lookahead_weights=weights, step=step), budget=2))
    assert batches_of(cut) == [[], [3, 2], [0, 5], [], [0, 1], [3, 2]]
    # without weights: the best rank any token gave the expert, then the lower id
    unweighted = prefetchers.plan("lookahead-gate", view(with_lookahead(experts, ahead, step=step)))
    assert batches_of(unweighted) == [[], [2, 3, 1], [0, 5, 4], [], [0, 1, 5], [2, 3]]


def test_one_moe_layer_gives_empty_batches():
    experts = np.array([[[0, 1]], [[2, 3]]], np.int16)
    plan = prefetchers.plan("lookahead-gate", view(with_lookahead(experts, np.full_like(experts, -1))))
    assert plan.offsets.tolist() == [0, 0, 0]


def test_depth_and_missing_column_errors(trace):
    with pytest.raises(MoecacheError, match="prefetcher lookahead-gate runs at depth 1 only"):
        prefetchers.plan("lookahead-gate", view(trace, depth=2))
    plain = mc.Trace.from_arrays(trace.experts, num_experts=E, meta={"dtype": "float32"}, expert_bytes=4096)
    with pytest.raises(MoecacheError, match="lookahead-gate: <memory> has no 'lookahead' column "
                                            "\\(capture with --lookahead\\)"):
        prefetchers.plan("lookahead-gate", view(plain))
    with pytest.raises(MoecacheError, match="capture with --lookahead"):
        timeline(plain, "jetson-orin-nx-16gb", "lru", 2, dense_ms=0.1, prefetch="lookahead-gate")


def test_timeline_runs_and_accuracy_is_a_share(trace):
    r = timeline(trace, "jetson-orin-nx-16gb", "lru", 4, dense_ms=0.1, prefetch="lookahead-gate")
    assert r.prefetched > 0 and 0 <= r.prefetch_accuracy <= 1
    assert r.to_dict()["prefetch"] == "lookahead-gate"
    split = timeline(with_lookahead(trace.experts, trace.lookahead, weights=trace.weights,
                                    lookahead_weights=trace.lookahead_weights, sequences=4),
                     "jetson-orin-nx-16gb", "lru", 2, dense_ms=0.1, prefetch="lookahead-gate",
                     train_fraction=0.5)
    assert 0 <= split.prefetch_accuracy <= 1


@pytest.mark.parametrize("train_fraction", [None, 0.5])
def test_a_perfect_gate_is_the_oracle_beyond_the_first_layer(train_fraction):
    """lookahead == the true next experts: the same batches as the oracle at depth 1 for
    every layer but the first (which has no signal), hence, with a cache per layer, the
    same hits in those layers (also when a split reorders the tokens by sequence)."""
    experts, weights = random_routing(60, 4, seed=3)
    ahead, ahead_weights = true_next(experts, weights)
    trace = with_lookahead(experts, ahead, weights=weights, lookahead_weights=ahead_weights, sequences=6)
    gate, oracle = (batches_of(prefetchers.plan(name, view(trace, budget=2)))
                    for name in ("lookahead-gate", "oracle"))
    assert gate[0::4] == [[]] * 60
    for layer in (1, 2, 3):
        assert gate[layer::4] == oracle[layer::4]
    box = profiles.hardware("jetson-orin-nx-16gb")
    runs = {name: timeline(trace, box, "lru", 3, "layer", dense_ms=0.1, prefetch=name, budget=2,
                           train_fraction=train_fraction)
            for name in ("lookahead-gate", "oracle", None)}
    hits = {name: r.per_layer["hits"].tolist() for name, r in runs.items()}
    assert hits["lookahead-gate"][1:] == hits["oracle"][1:]
    assert hits["lookahead-gate"][0] == hits[None][0] < hits["oracle"][0]


# -- capture on every architecture (needs the capture extra) -------------------------------------

ROUTING = ("experts", "weights", "step", "seq", "pos", "token_id", "phase")


def capture(*args, **kwargs):
    for package in ("torch", "transformers", "tokenizers"):
        pytest.importorskip(package)
    from moecache.capture import capture

    return capture(*args, **kwargs)


@pytest.fixture(scope="module", params=ARCHS)
def tiny(request, tmp_path_factory):
    """(arch, model folder, model loaded for the hand computation, tokenizer)."""
    for package in ("torch", "transformers", "tokenizers"):
        pytest.importorskip(package)
    from moecache.capture import load_model

    arch = request.param
    path = save_tiny_model(arch, tmp_path_factory.mktemp(arch))
    model, tokenizer = load_model(path, device="cpu")
    return arch, path, model, tokenizer


def test_capture_keeps_the_routing_and_adds_the_next_router(tiny, tmp_path):
    """Generate mode, batched and left-padded: the routing columns equal a capture without
    --lookahead; the lookahead has the experts' shape, valid ids, -1 in the last layer."""
    arch, path, _, _ = tiny
    kwargs = dict(max_new_tokens=4, batch_size=3, device="cpu", progress=False)
    with_ahead = mc.Trace.load(capture(path, PROMPTS, tmp_path / "a.parquet", lookahead=True, **kwargs))
    plain = mc.Trace.load(capture(path, PROMPTS, tmp_path / "p.parquet", **kwargs))
    for name in ROUTING:
        np.testing.assert_array_equal(getattr(with_ahead, name), getattr(plain, name), err_msg=name)
    assert plain.lookahead is None and plain.meta["capture"]["lookahead"] is False
    assert with_ahead.meta["capture"]["lookahead"] is True
    ahead = with_ahead.lookahead
    assert ahead.shape == with_ahead.experts.shape == with_ahead.lookahead_weights.shape
    assert with_ahead.num_layers >= 2, arch
    assert np.all(ahead[:, -1] == -1) and np.all(np.isnan(with_ahead.lookahead_weights[:, -1]))
    assert ahead[:, :-1].min() >= 0 and ahead[:, :-1].max() < with_ahead.num_experts
    assert np.all(np.diff(with_ahead.lookahead_weights[:, :-1], axis=2) <= 0)  # rank order


def test_lookahead_is_the_next_router_on_this_routers_input(tiny, tmp_path):
    """Teacher forcing: layer l's lookahead == router l + 1 applied by hand to the input
    router l received in a plain batch-1 forward."""
    import torch

    from .test_capture import routers

    arch, path, model, tokenizer = tiny
    trace = mc.Trace.load(capture(path, PROMPTS, tmp_path / "f.parquet", mode="forward", batch_size=2,
                                  lookahead=True, device="cpu", progress=False))
    found = routers(arch, model)
    layers = sorted(found)
    assert layers == trace.layers.tolist()
    for seq, prompt in enumerate(PROMPTS):
        inputs = {}
        def keep(_module, args, kwargs, _output, layer, inputs=inputs):
            inputs[layer] = (args, kwargs)

        handles = [module.register_forward_hook(functools.partial(keep, layer=layer), with_kwargs=True)
                   for layer, module in found.items()]
        try:
            with torch.no_grad():
                model(input_ids=torch.tensor([tokenizer(prompt)["input_ids"]]), use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
        rows = np.flatnonzero(trace.seq == seq)
        for li, (layer, following) in enumerate(zip(layers[:-1], layers[1:], strict=True)):
            args, kwargs = inputs[layer]
            with torch.no_grad():
                _, weights, indices = found[following](*args, **kwargs)
            weights = weights.reshape(len(rows), -1).float().numpy()
            indices = indices.reshape(len(rows), -1).numpy()
            if weights.shape[1] != indices.shape[1]:  # weights for all E experts
                weights = np.take_along_axis(weights, indices, axis=1)
            got = trace.lookahead[rows, li]
            assert np.array_equal(np.sort(got, axis=1), np.sort(indices, axis=1)), (arch, seq, layer)
            np.testing.assert_allclose(trace.lookahead_weights[rows, li], -np.sort(-weights, axis=1),
                                       atol=1e-5)


def test_cli_flag(tmp_path):
    pytest.importorskip("torch")
    path = save_tiny_model("qwen3_moe", tmp_path / "m")
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS[:2]) + "\n")
    out = tmp_path / "t.parquet"
    result = CliRunner().invoke(cli, ["capture", str(path), "--prompts", str(prompts), "--out", str(out),
                                      "--max-new-tokens", "3", "--device", "cpu", "--lookahead"])
    assert result.exit_code == 0, result.stderr
    trace = mc.Trace.load(out)
    assert trace.lookahead is not None and trace.lookahead.shape == trace.experts.shape
    info = CliRunner().invoke(cli, ["info", str(out)])
    assert "lookahead" in info.stdout
