"""What router fine-tuning costs in quality, beyond perplexity.

A fine-tuned model is measured against a reference (the baseline model it came from) on
the same teacher-forced token blocks (n, T), over the T - 1 predictions of each block:

* perplexity, exp(mean next-token cross-entropy);
* reuse: the reuse rate of docs/semantics.md (w = 1) of the model's own routing;
* agreement: the share of predictions whose top-1 token equals the reference's;
* KL: the mean KL(reference || model) of the next-token distributions, in nats;
* task accuracies: top-1 accuracy on the predictions a task mask selects (e.g. the
  closing brackets of held-out code, :func:`code_tasks`), beside the reference's.

>>> reference = reference_outputs(base, blocks)                       # doctest: +SKIP
>>> evaluate_quality(tuned, blocks, reference, code_tasks(tokenizer, blocks))  # doctest: +SKIP
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..capture.torch_env import input_device
from ..errors import MoecacheError
from .data import token_blocks
from .train import RouterTap, find_model_routers, reuse_counts, vocabulary

IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
CLOSING, OPENING = ")]}", "([{"


@dataclass(frozen=True)
class Reference:
    """The reference model's next-token log-probabilities over the blocks (n, T - 1, V),
    float16 (what :func:`evaluate_quality` compares against, renormalised), and its top-1
    tokens."""

    log_probs: torch.Tensor
    top1: torch.Tensor


@dataclass
class Quality:
    """One model on one set of blocks (module docstring). ``tasks`` maps a task's name to
    (accuracy, predictions it selects); ``agreement`` and ``kl`` are None without a reference."""

    predictions: int
    perplexity: float
    reuse: float
    agreement: float | None = None
    kl: float | None = None
    tasks: dict[str, tuple[float, int]] = field(default_factory=dict)
    routing: np.ndarray | None = field(default=None, repr=False)  # with keep_routing: (n x T, L, K)

    def to_dict(self) -> dict[str, Any]:
        out = {"predictions": self.predictions, "ppl": self.perplexity, "reuse": self.reuse,
               "agreement": self.agreement, "kl": self.kl}
        for name, (accuracy, count) in self.tasks.items():
            out[f"{name}_acc"], out[f"{name}_n"] = accuracy, count
        return out


@torch.no_grad()
def reference_outputs(model: nn.Module, blocks: Any, *, batch_size: int = 8) -> Reference:
    """The reference's next-token distributions over ``blocks`` (kept as float16: 2 bytes
    per prediction and vocabulary entry)."""
    ids = torch.from_numpy(token_blocks(blocks, vocabulary(model)))
    model.eval()
    device = input_device(model)
    parts, tops = [], []
    for start in range(0, len(ids), batch_size):
        chunk = ids[start:start + batch_size].to(device)
        logits = model(input_ids=chunk, use_cache=False).logits[:, :-1].float()
        parts.append(logits.log_softmax(-1).half().cpu())
        tops.append(logits.argmax(-1).cpu())
    return Reference(torch.cat(parts), torch.cat(tops))


@torch.no_grad()
def evaluate_quality(model: nn.Module, blocks: Any, reference: Reference | None = None,
                     tasks: dict[str, np.ndarray] | None = None, *, batch_size: int = 8,
                     keep_routing: bool = False) -> Quality:
    """``model`` on ``blocks`` (n, T): perplexity, reuse and task accuracies; with
    ``reference`` (of the same blocks), top-1 agreement and KL. ``tasks`` maps a name to a
    boolean mask (n, T - 1) of the predictions it scores (prediction t targets token t + 1).
    ``keep_routing`` keeps the experts each token was routed to (``Quality.routing``, int16
    (n x T, MoE layers, K), block after block: a trace's ``experts``)."""
    ids = torch.from_numpy(token_blocks(blocks, vocabulary(model)))
    tasks = tasks or {}
    for name, mask in tasks.items():
        if np.shape(mask) != (ids.shape[0], ids.shape[1] - 1):
            raise MoecacheError(f"quality: task {name!r} masks {np.shape(mask)} predictions, the blocks "
                                f"have {(ids.shape[0], ids.shape[1] - 1)}")
    if reference is not None and tuple(reference.top1.shape) != (ids.shape[0], ids.shape[1] - 1):
        raise MoecacheError("quality: the reference was computed on other blocks")
    model.eval()
    info = find_model_routers(model, None)
    device = input_device(model)
    nll = kl = 0.0
    agree = overlap = requests = 0
    right = {name: 0 for name in tasks}
    routing = []
    with RouterTap(info.sites) as tap:
        for start in range(0, len(ids), batch_size):
            chunk = ids[start:start + batch_size].to(device)
            logp = model(input_ids=chunk, use_cache=False).logits[:, :-1].float().log_softmax(-1)
            routes = tap.take(chunk.shape)
            if keep_routing:
                routing.append(torch.stack([r.indices for r in routes], 1).cpu().numpy().astype(np.int16))
            hit, count = reuse_counts(routes, chunk.shape)
            overlap, requests = overlap + hit, requests + count
            target = chunk[:, 1:]
            nll -= float(logp.gather(-1, target[..., None]).sum())
            top1 = logp.argmax(-1)
            if reference is not None:
                ref = reference.log_probs[start:start + len(chunk)].to(device).float()
                ref = ref - ref.logsumexp(-1, keepdim=True)  # float16 rounding: sum exactly one again
                kl += float(F.kl_div(logp, ref, log_target=True, reduction="sum"))
                agree += int((top1 == reference.top1[start:start + len(chunk)].to(device)).sum())
            correct = (top1 == target).cpu().numpy()
            for name, mask in tasks.items():
                right[name] += int(correct[np.asarray(mask)[start:start + len(chunk)]].sum())
    predictions = ids.shape[0] * (ids.shape[1] - 1)
    scored = {name: int(np.count_nonzero(mask)) for name, mask in tasks.items()}
    return Quality(
        predictions=predictions, perplexity=math.exp(nll / predictions), reuse=overlap / requests,
        agreement=None if reference is None else agree / predictions,
        kl=None if reference is None else kl / predictions,
        tasks={name: (right[name] / count if count else math.nan, count) for name, count in scored.items()},
        routing=np.concatenate(routing) if keep_routing else None)


def code_tasks(tokenizer: Any, blocks: Any) -> dict[str, np.ndarray]:
    """Two next-token tasks of held-out code, as masks over the predictions of ``blocks``:
    ``brackets``, targets that close a bracket (a token whose text, without whitespace,
    starts with ``)``, ``]`` or ``}`` and holds no letter, digit or opening bracket: ``)``,
    ``):``, ``]]``); ``identifiers``, targets that repeat an identifier (a token whose text,
    without whitespace, is one, of two characters or more) already seen earlier in the
    block: copying from context, which longer inputs make harder."""
    vocab = len(tokenizer)
    ids = token_blocks(blocks, vocab, "tokenizer")
    texts = [tokenizer.decode([token]).strip() for token in range(vocab)]
    closing = np.array([bool(text) and text[0] in CLOSING
                        and not any(c.isalnum() or c in OPENING for c in text) for text in texts])
    names = np.array([len(text) > 1 and IDENTIFIER.fullmatch(text) is not None for text in texts])
    targets = ids[:, 1:]
    repeats = np.zeros(targets.shape, bool)
    for row, block in enumerate(ids):
        seen: set[int] = set()
        for t in range(1, len(block)):
            seen.add(int(block[t - 1]))
            token = int(block[t])
            repeats[row, t - 1] = names[token] and token in seen
    return {"brackets": closing[targets], "identifiers": repeats}
