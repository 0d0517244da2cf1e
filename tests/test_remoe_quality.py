"""moecache.remoe.quality: quality beyond perplexity, against slow per-block references."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from moecache.capture import load_model  # noqa: E402
from moecache.errors import MoecacheError  # noqa: E402
from moecache.remoe import (  # noqa: E402
    biased_routing,
    code_tasks,
    evaluate_quality,
    finetune_model,
    measure_reuse,
    pack_blocks,
    reference_outputs,
)
from moecache.remoe.train import find_model_routers  # noqa: E402
from moecache.reroute import reroute, route_sequence  # noqa: E402

from .tiny_models import SENTENCES, save_tiny_model  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.set_num_threads(1)
    path = save_tiny_model("olmoe", tmp_path_factory.mktemp("quality") / "olmoe")
    base, tokenizer = load_model(path, device="cpu")
    rng = random.Random(1)
    words = " ".join(SENTENCES).split()
    texts = [" ".join(rng.choice(words) for _ in range(40)) for _ in range(12)]
    blocks = pack_blocks(tokenizer, texts, 24)
    tuned, _ = load_model(path, device="cpu")
    finetune_model(tuned, tokenizer, blocks, locality_weight=1.0, steps=10, lr=3e-2, seq_len=24,
                   batch_size=4, progress=False)
    return base, tuned, tokenizer, blocks


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def _slow(model, blocks, reference_model, mask):
    """One block at a time, in float64 NumPy: ppl, agreement, KL (the reference rounded to
    float16, as stored, and renormalised) and accuracy on ``mask``."""
    nll = kl = 0.0
    agree = right = 0
    for row, block in enumerate(blocks):
        ids = torch.as_tensor(block[None, :])
        with torch.no_grad():
            logp = _log_softmax(model(input_ids=ids).logits[0, :-1].double().numpy())
            ref_logits = reference_model(input_ids=ids).logits[0, :-1].float().numpy()
            ref = _log_softmax(ref_logits.astype(np.float64))
        ref16 = _log_softmax(ref.astype(np.float16).astype(np.float64))  # stored as float16, renormalised
        for t in range(len(block) - 1):
            nll -= logp[t, block[t + 1]]
            kl += float(np.sum(np.exp(ref16[t]) * (ref16[t] - logp[t])))
            agree += int(np.argmax(logp[t]) == np.argmax(ref[t]))
            right += int(mask[row, t] and np.argmax(logp[t]) == block[t + 1])
    n = blocks.shape[0] * (blocks.shape[1] - 1)
    return math.exp(nll / n), agree / n, kl / n, right / max(int(mask.sum()), 1)


def test_quality_equals_a_slow_reference(setup):
    base, tuned, _, blocks = setup
    mask = np.zeros((len(blocks), blocks.shape[1] - 1), bool)
    mask[:, ::3] = True
    reference = reference_outputs(base, blocks, batch_size=3)
    got = evaluate_quality(tuned, blocks, reference, {"every third": mask}, batch_size=5)
    ppl, agreement, kl, accuracy = _slow(tuned, blocks, base, mask)
    assert got.predictions == blocks.shape[0] * (blocks.shape[1] - 1)
    assert got.perplexity == pytest.approx(ppl, rel=1e-5)
    assert got.agreement == pytest.approx(agreement, abs=1 / got.predictions)  # float32 argmax ties
    assert got.kl == pytest.approx(kl, rel=1e-3, abs=1e-6)
    assert got.tasks["every third"] == (pytest.approx(accuracy), int(mask.sum()))
    assert got.reuse == pytest.approx(measure_reuse(tuned, blocks))
    assert 0 < got.kl and got.agreement < 1 and got.reuse > measure_reuse(base, blocks)


def test_a_model_against_itself(setup):
    base, _, _, blocks = setup
    got = evaluate_quality(base, blocks, reference_outputs(base, blocks))
    assert got.agreement == 1.0 and got.kl == pytest.approx(0.0, abs=1e-3)
    with torch.no_grad():
        loss = base(input_ids=torch.as_tensor(blocks), labels=torch.as_tensor(blocks)).loss
    assert got.perplexity == pytest.approx(math.exp(float(loss)), rel=1e-5)
    plain = evaluate_quality(base, blocks)
    assert plain.agreement is None and plain.kl is None and plain.perplexity == got.perplexity


class _Tokens:
    """A tokenizer of eleven fixed token texts."""

    texts = ["x", ")", " ]}\n", "foo", " bar", "(", "a1", " ", "foo)", "):", ")a"]

    def __len__(self):
        return len(self.texts)

    def decode(self, ids):
        return "".join(self.texts[i] for i in ids)


def test_code_tasks_by_hand():
    blocks = np.array([[3, 5, 4, 1, 3, 2, 6, 0, 6, 8],
                       [4, 4, 3, 7, 9, 1, 0, 10, 2, 1]])
    tasks = code_tasks(_Tokens(), blocks)
    # targets: row 0 -> 5 4 1 3 2 6 0 6 8; row 1 -> 4 3 7 9 1 0 10 2 1 (")a" and "foo)" close nothing)
    assert tasks["brackets"].tolist() == [[0, 0, 1, 0, 1, 0, 0, 0, 0], [0, 0, 0, 1, 1, 0, 0, 1, 1]]
    # identifiers of 2+ characters seen before in the block: foo (3), bar (4), a1 (6); x is one character
    assert tasks["identifiers"].tolist() == [[0, 0, 0, 1, 0, 0, 0, 1, 0], [1, 0, 0, 0, 0, 0, 0, 0, 0]]


def test_bad_input_is_one_line(setup):
    base, _, tokenizer, blocks = setup
    reference = reference_outputs(base, blocks[:2])
    with pytest.raises(MoecacheError, match="other blocks"):
        evaluate_quality(base, blocks, reference)
    with pytest.raises(MoecacheError, match="masks"):
        evaluate_quality(base, blocks, tasks={"short": np.zeros((1, 3), bool)})
    with pytest.raises(MoecacheError, match="shape"):
        evaluate_quality(base, blocks[0, :1][None, :])
    with pytest.raises(MoecacheError, match="beyond the tokenizer"):
        code_tasks(_Tokens(), np.array([[0, 11]]))


# -- routing biased in the model (the inference-time alternatives) ------------------------------

def test_biased_routing_routes_by_the_reroute_rule_and_changes_outputs(setup):
    base, _, _, blocks = setup
    length = blocks.shape[1]
    plain = evaluate_quality(base, blocks, keep_routing=True)
    with biased_routing(base, mode="recent", bias=0.0):
        same = evaluate_quality(base, blocks, keep_routing=True)
    assert same.perplexity == plain.perplexity and np.array_equal(same.routing, plain.routing)
    for mode, capacity in (("recent", None), ("cache", 3)):
        seen = []  # router scores of every forward, the two-token probes of the router search included
        sites = find_model_routers(base, None).sites
        tap = [site.module.register_forward_hook(lambda _m, _a, out, seen=seen: seen.append(out[0].detach()))
               for site in sites]
        try:
            with biased_routing(base, mode=mode, bias=3.0, capacity=capacity):
                biased = evaluate_quality(base, blocks, keep_routing=True, batch_size=len(blocks))
        finally:
            for handle in tap:
                handle.remove()
        # each layer's new routing is the reroute rule over each block's own router scores
        for layer, logits in enumerate(seen[-len(sites):]):  # the evaluation's one forward
            rows = logits.float().numpy().reshape(len(blocks), length, -1)
            want = np.concatenate([route_sequence(row, 2, mode=mode, bias=3.0, capacity=capacity)
                                   for row in rows])
            assert np.array_equal(biased.routing[:, layer], want)
        assert biased.reuse > plain.reuse and biased.perplexity != plain.perplexity


def test_route_sequence_equals_offline_reroute():
    """One layer, one sequence: the online rule is the offline rerouter's."""
    import moecache as mc

    rng = np.random.default_rng(3)
    logits = rng.normal(size=(40, 1, 6)).astype(np.float32)
    experts = np.argsort(-logits, axis=2)[:, :, :2]
    trace = mc.Trace.from_arrays(experts, 6, logits=logits)
    for mode, capacity, window in (("recent", None, 1), ("recent", None, 3), ("cache", 2, 1),
                                   ("cache", 4, 1)):
        rerouted, _ = reroute(trace, mode=mode, bias=1.5, window=window, capacity=capacity)
        online = route_sequence(logits[:, 0], 2, mode=mode, bias=1.5, window=window, capacity=capacity)
        assert np.array_equal(online, rerouted.experts[:, 0])


def test_biased_routing_refuses_what_it_cannot_do(setup, tmp_path):
    base, _, _, blocks = setup
    with pytest.raises(MoecacheError, match="unknown reroute mode"):
        with biased_routing(base, mode="fresh"):
            pass
    with pytest.raises(MoecacheError, match="capacity >= K"):
        with biased_routing(base, mode="cache", capacity=1):
            pass
    with pytest.raises(MoecacheError, match="input_ids of shape"):
        with biased_routing(base):
            base(input_ids=torch.as_tensor(blocks[0]))
    sigmoid, _ = load_model(save_tiny_model("deepseek_v3", tmp_path / "v3"), device="cpu")
    with pytest.raises(MoecacheError, match="not a softmax router"):
        with biased_routing(sigmoid):
            evaluate_quality(sigmoid, blocks)


@pytest.mark.parametrize("knobs, message", [
    ({"bias": float("nan")}, "bias must be a finite number"),
    ({"bias": "2"}, "bias must be a finite number"),
    ({"window": 1.5}, "window must be from 1 to 2"),
    ({"window": True}, "window must be from 1 to 2"),
    ({"mode": "cache", "capacity": -3}, "capacity must be positive"),
    ({"mode": "cache", "capacity": 2**63}, "capacity must be positive"),
])
def test_rerouting_settings_are_checked_not_cast(knobs, message):
    logits = np.zeros((4, 6), np.float32)
    with pytest.raises(MoecacheError, match=message):
        route_sequence(logits, 2, **knobs)


def test_token_blocks_are_checked_not_cast(setup):
    base, _, _, blocks = setup
    vocab = base.get_input_embeddings().num_embeddings
    for bad, message in ((blocks.astype(np.float32), "must be integers"), (blocks[:, :1], "T>=2"),
                         (np.full((2, 5), vocab), f"token id {vocab} is beyond the model's range"),
                         (np.full((2, 5), -1), "token id -1 is beyond")):
        for run in (lambda b=bad: evaluate_quality(base, b), lambda b=bad: reference_outputs(base, b),
                    lambda b=bad: measure_reuse(base, b)):
            with pytest.raises(MoecacheError, match=message):
                run()
