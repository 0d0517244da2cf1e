"""ReMoE-style router fine-tuning: make consecutive tokens reuse experts (README: ReMoE).

Only the routers learn. Every other parameter (attention, experts, shared experts,
embeddings, norms, the LM head) is frozen, so a fine-tuned checkpoint has exactly the
experts of the original and costs nothing extra at inference. The objective, per batch
of packed token blocks, is::

    loss = lm_weight       * CE(next token)                       (the data)
         + kl_weight       * KL(p_orig || p_new) over the vocabulary  (the anchor)
         + locality_weight * L_loc                                (temporal locality)

``L_loc``: with q[t, l, :] the router's distribution over the E experts of MoE layer
l at token t, and S[t, l] the experts that layer selected (the top-K the model really
used, as its router returned them) at tokens t-w .. t-1 of the same block,
``L_loc = -mean_{t>=1, l} log sum_{e in S[t,l]} q[t, l, e]``: the negative
log-probability that token t routes within the recently used set. The log form (the
cross-entropy of the event "stay in the recent experts") was chosen over ``1 - mass``
because its gradient does not vanish on the tokens that matter, those that switch
experts while the mass on S is small, and saturates on tokens already sticky, so it
does not keep sharpening routing that already reuses (which would cost quality for no
cache gain). It is computed as ``logsumexp`` over S minus ``logsumexp`` over all
experts: exact and stable, no epsilon. ``q`` is ``softmax(router logits)`` for
softmax routers (Mixtral, Qwen-MoE, OLMoE, DeepSeek-V2, GPT-OSS, ...) and the
normalised scores ``sigmoid(l) / sum sigmoid(l)`` for sigmoid routers (DeepSeek-V3);
which one a router is, is decided from what it returns (the ratio of its top-2 gate
weights is ``exp(l1 - l2)`` for the first family, ``sigmoid(l1)/sigmoid(l2)`` for the
second; the class's ``e_score_correction_bias`` decides when K = 1). Group-limited
selection and correction biases shape which experts win but are not modelled in q:
raising q on S raises exactly the scores that selection ranks.

The locality window ``w`` only defines S; the reuse rate that is logged and reported
is always the one of docs/semantics.md (w = 1): ``sum_{t>=1} |E[t] & E[t-1]| / sum_{t>=1} |E[t]|``
over the tokens of each block, pooled over MoE layers.

Choices, each on purpose:

- Trainable = every parameter of the router modules that :func:`find_routers` finds
  (``mlp.gate.weight``; also GPT-OSS's ``router.bias``), except biases that models
  update by a non-gradient rule (DeepSeek-V3's ``e_score_correction_bias``, a buffer in
  transformers, frozen in any case). Qwen2-MoE's ``shared_expert_gate`` scales an
  always-on expert and is not a router: frozen.
- No load-balancing loss (it pushes tokens apart, against reuse), and the model's own
  auxiliary loss is never used. AdamW with weight decay 0 (decay would pull routers
  toward uniform routing), gradient norm clipped at 1, constant learning rate.
- The model stays in eval mode: dropout and router jitter noise are off, so the
  routing that is optimised is the routing used at inference.
- The anchor costs no model copy: the reference distribution comes from a no-grad
  forward of the same model with the original router tensors swapped in
  (``torch.func.functional_call``), so memory grows by the routers only, not by a
  second model. That forward also gives the original model's reuse on the same batch
  (``reuse_orig`` in the log) at no extra cost.
- The KL is forward KL(p_orig || p_new), mean over every token of the batch: it
  penalises the new model for dropping tokens the original found likely.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..capture.routers import MoeModelInfo, RouterOutput, find_routers, parse_router_output
from ..capture.torch_env import dtype_name, input_device, load_model, seed_torch, text_config
from ..errors import MoecacheError
from ..files import atomic_folder
from ..units import check_seed
from .checkpoint import checkpoint_meta, write_meta
from .data import load_texts, pack_blocks, token_blocks

# Router parameters that models update by a non-gradient rule (aux-loss-free load
# balancing): never trained by gradient here.
FROZEN_ROUTER_PARAMS = ("e_score_correction_bias", "expert_bias")
EVAL_BLOCKS = 8           # blocks (the first of the data) of the before/after evaluation
MAX_GRAD_NORM = 1.0
LOG_NAME = "train_log.jsonl"
SAVE_DTYPES = ("float32", "float16", "bfloat16")


@dataclass
class FinetuneReport:
    """What a fine-tuning run did and measured.

    ``eval`` compares the original and the fine-tuned routers on the same fixed blocks
    (the first ``EVAL_BLOCKS`` of the data): ``reuse_before`` / ``reuse_after``,
    ``lm_before`` / ``lm_after`` (next-token cross-entropy, nats), ``kl`` (mean
    KL(p_orig || p_new) per token) and ``tokens``; empty when the run was interrupted.
    ``history`` holds one record per logged interval (the lines of ``train_log.jsonl``):
    ``step``, the loss terms ``lm``, ``kl``, ``locality`` and ``loss`` (interval means),
    ``reuse`` (the running reuse rate of the routers being trained) and ``reuse_orig``
    (the original routers on the same batches), ``lr``, ``tokens`` and ``elapsed_s``.
    """

    steps: int
    interrupted: bool
    settings: dict[str, Any]
    router_parameters: list[str]
    num_trainable: int
    score_kind: str
    history: list[dict[str, Any]] = field(default_factory=list)
    eval: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0
    out_dir: Path | None = None

    @property
    def final(self) -> dict[str, Any]:
        """The last logged interval ({} before the first log)."""
        return self.history[-1] if self.history else {}

    @property
    def reuse_before(self) -> float | None:
        return self.eval.get("reuse_before")

    @property
    def reuse_after(self) -> float | None:
        return self.eval.get("reuse_after")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["out_dir"] = None if self.out_dir is None else str(self.out_dir)
        out["final"] = self.final
        return out


@dataclass(frozen=True)
class FinetuneSettings:
    """The knobs of one fine-tuning run (module docstring: the objective).

    ``locality_weight`` (L_loc), ``window`` (w, previous tokens whose experts count as
    recent), ``kl_weight`` (the anchor), ``lm_weight`` (next-token loss on the data; with 0,
    the KL anchor alone guards quality), ``steps`` (optimiser steps of ``batch_size``
    blocks, drawn in a seeded random order, a new permutation each pass over the data),
    ``lr`` (AdamW), ``seq_len`` (tokens per packed block), ``seed`` (batch order and
    torch), ``log_every`` (steps per logged interval).
    """

    locality_weight: float = 1.0
    window: int = 1
    kl_weight: float = 1.0
    lm_weight: float = 1.0
    steps: int = 200
    lr: float = 1e-3
    seq_len: int = 128
    batch_size: int = 4
    seed: int = 0
    log_every: int = 10

    @classmethod
    def of(cls, settings: FinetuneSettings | None, knobs: dict[str, Any], caller: str) -> FinetuneSettings:
        """``settings`` (default: the defaults) with the keyword ``knobs`` of ``caller`` over
        them, checked."""
        unknown = sorted(set(knobs) - {f.name for f in fields(cls)})
        if unknown:
            raise TypeError(f"{caller}() got an unexpected keyword argument {unknown[0]!r}")
        return replace(settings or cls(), **knobs).check()

    def check(self) -> FinetuneSettings:
        """These settings with the weights and ``lr`` as floats; a one-line
        :class:`MoecacheError` for an impossible knob."""
        check_seed(self.seed)
        for flag, value in (("--locality-weight", self.locality_weight), ("--kl-weight", self.kl_weight),
                            ("--lm-weight", self.lm_weight)):
            if not _real(value) or value < 0:
                raise MoecacheError(f"{flag} must be a finite number >= 0, got {value!r}")
        if self.locality_weight == 0 and self.kl_weight == 0 and self.lm_weight == 0:
            raise MoecacheError("all loss weights are 0: nothing to train")
        for flag, value, low in (("--window", self.window, 1), ("--steps", self.steps, 1),
                                 ("--seq-len", self.seq_len, 2), ("--batch-size", self.batch_size, 1),
                                 ("--log-every", self.log_every, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise MoecacheError(f"{flag} must be an integer >= {low}, got {value!r}")
        if not _real(self.lr) or self.lr <= 0:
            raise MoecacheError(f"--lr must be a finite number > 0, got {self.lr!r}")
        return replace(self, locality_weight=float(self.locality_weight), kl_weight=float(self.kl_weight),
                       lm_weight=float(self.lm_weight), lr=float(self.lr))

    @property
    def loss_weights(self) -> dict[str, float]:
        """Weight of each loss term, by the names :func:`_loss_terms` gives them."""
        return {"lm": self.lm_weight, "kl": self.kl_weight, "locality": self.locality_weight}


# -- the command's entry point ---------------------------------------------------------------

def finetune(
    model_path: str | os.PathLike,
    data: str | os.PathLike | Sequence[str],
    out_dir: str | os.PathLike,
    settings: FinetuneSettings | None = None,
    *,
    device: str = "auto",
    dtype: str = "float32",
    save_dtype: str | None = None,
    progress: bool = True,
    overwrite: bool = False,
    **knobs: Any,
) -> FinetuneReport:
    """Fine-tune the routers of the local MoE model at ``model_path`` and save it to ``out_dir``.

    ``data`` is a text or JSONL file (see :mod:`moecache.remoe.data`) or a list of
    strings. ``settings`` holds the knobs of the run; any of them may also be given as a
    keyword (``steps=50``), over ``settings`` or the defaults (:class:`FinetuneSettings`).
    The model is loaded exactly as ``moecache capture`` loads it
    (:func:`moecache.capture.load_model`: local folder or local HF cache, ``device``
    auto|cpu|cuda[:N], ``dtype`` float32 by default because router updates are small
    relative to bfloat16's resolution).

    ``out_dir`` receives a normal Hugging Face checkpoint (``save_pretrained`` of the
    model, in the training dtype unless ``save_dtype`` says float32|float16|bfloat16,
    and of the tokenizer), loadable by ``from_pretrained`` and ``moecache capture``,
    plus ``remoe.json`` (:mod:`moecache.remoe.checkpoint`: settings, base model, trained
    parameter names, metrics) and ``train_log.jsonl`` (one line per logged interval).
    Everything is written into a hidden staging folder beside ``out_dir`` and renamed into
    place at the end (:func:`moecache.files.atomic_folder`), so a crash never leaves a
    half-written checkpoint; an existing ``out_dir`` is replaced only with
    ``overwrite=True`` (``--force``).

    Ctrl-C (KeyboardInterrupt, or SIGTERM where the caller turns it into one) during
    training stops after the current step, saves the routers trained so far with
    ``"interrupted": true`` in ``remoe.json`` and returns the report with
    ``interrupted=True`` (the command should then exit with status 130); an interrupt
    before the first completed step, or while saving, leaves nothing and propagates.
    Bad input raises :class:`MoecacheError` with a one-line message.
    """
    settings = FinetuneSettings.of(settings, knobs, "finetune")
    dtype_name(dtype)
    saved = None if save_dtype is None else dtype_name(save_dtype, "--save-dtype", SAVE_DTYPES)
    out_dir = Path(out_dir)
    _check_out(out_dir, model_path, overwrite=overwrite)
    texts = load_texts(data)
    source, digest = _data_source(data)
    model, tokenizer = load_model(model_path, device=device, dtype=dtype)
    with atomic_folder(out_dir, overwrite=overwrite) as staging:
        report = finetune_model(model, tokenizer, texts, settings, progress=progress,
                                log_path=staging / LOG_NAME, source=source)
        if report.steps == 0:
            raise KeyboardInterrupt  # interrupted before anything was learned: nothing to save
        report.settings.update(base_model=str(model_path), data=source, data_sha256=digest,
                               device=str(input_device(model)), dtype=str(dtype),
                               save_dtype=save_dtype)
        if saved is not None:
            cast_for_saving(model, getattr(torch, saved))
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        write_meta(staging, checkpoint_meta(model, report))
    report.out_dir = out_dir
    return report


# -- the training loop ------------------------------------------------------------------------

def finetune_model(
    model: nn.Module,
    tokenizer: Any,
    data: str | os.PathLike | Sequence[str] | np.ndarray | torch.Tensor,
    settings: FinetuneSettings | None = None,
    *,
    progress: bool = True,
    log_path: str | os.PathLike | None = None,
    source: str = "training data",
    **knobs: Any,
) -> FinetuneReport:
    """Fine-tune the routers of a loaded model in place (no saving); returns the report.

    ``data``: a data file, a list of strings (packed into ``seq_len`` blocks with
    ``tokenizer``), or token blocks already packed, an integer array (n, T) (then
    ``tokenizer`` may be None and ``seq_len`` is T). ``settings`` and keyword ``knobs``:
    as for :func:`finetune`.

    Every ``log_every`` steps (and at the last) the interval means of the loss terms and
    the running reuse rates are appended to ``log_path`` (JSONL) and shown on the progress
    bar. All three terms are logged whatever their weights; only weighted terms are
    back-propagated.

    On return every parameter's ``requires_grad`` is as before and the model is in
    eval mode. A KeyboardInterrupt stops training after the current step and returns
    the report with ``interrupted=True`` (evaluation skipped).
    """
    settings = FinetuneSettings.of(settings, knobs, "finetune_model")
    from tqdm.auto import tqdm

    started = time.perf_counter()
    model.eval()
    info = find_model_routers(model, tokenizer)
    blocks = _blocks(data, tokenizer, settings.seq_len, max_blocks=settings.steps * settings.batch_size,
                     source=source)
    run, trainable, report = _prepare(model, info, blocks, settings,
                                      packed=isinstance(data, (np.ndarray, torch.Tensor)), source=source)
    originals = {name: p.detach().clone() for name, p in trainable.items()}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    log_file = None if log_path is None else open(log_path, "a", encoding="utf-8")
    bar = tqdm(total=run.steps, desc="remoe finetune", unit="step", disable=not progress, dynamic_ncols=True)
    try:
        for param in model.parameters():
            param.requires_grad_(False)
        for param in trainable.values():
            param.requires_grad_(True)
        with RouterTap(info.sites) as tap:
            try:
                _train(model, tap, blocks, trainable, originals, run, report,
                       log=lambda record: _log(report, record, log_file), bar=bar, started=started)
            except KeyboardInterrupt:
                report.interrupted = True
            if not report.interrupted:
                try:
                    report.eval = _evaluate(model, originals, blocks[:EVAL_BLOCKS], tap, run.batch_size)
                except KeyboardInterrupt:
                    report.interrupted = True
    finally:
        bar.close()
        if log_file is not None:
            log_file.close()
        for name, param in model.named_parameters():
            param.requires_grad_(flags[name])
            param.grad = None
        model.eval()
    report.elapsed_s = round(time.perf_counter() - started, 3)
    return report


def _prepare(model: nn.Module, info: MoeModelInfo, blocks: np.ndarray, settings: FinetuneSettings, *,
             packed: bool, source: str
             ) -> tuple[FinetuneSettings, dict[str, nn.Parameter], FinetuneReport]:
    """The settings the run really uses (block length and batch size the data allow), the
    parameters it trains and its report, before the first step."""
    notes: list[str] = list(info.notes)
    count, length = blocks.shape
    _check_length(model, length)
    if length < settings.seq_len and not packed:
        notes.append(f"{source} has only {length} tokens: one block of {length} < seq_len {settings.seq_len}")
    if count < settings.batch_size:
        notes.append(f"{source} gives {count} block(s) of {length} tokens: batch size {count}")
    run = replace(settings, seq_len=int(length), batch_size=min(settings.batch_size, count))
    trainable = router_parameters(model, info)
    record = {**asdict(run), "optimizer": "AdamW(weight_decay=0)", "max_grad_norm": MAX_GRAD_NORM,
              "blocks": int(count), "num_experts": info.num_experts, "top_k": info.top_k,
              "moe_layers": info.moe_layers, "router_path": info.router_path}
    report = FinetuneReport(steps=0, interrupted=False, settings=record, router_parameters=list(trainable),
                            num_trainable=sum(p.numel() for p in trainable.values()), score_kind="",
                            notes=notes)
    return run, trainable, report


def _train(model: nn.Module, tap: RouterTap, blocks: np.ndarray, trainable: dict[str, nn.Parameter],
           originals: dict[str, torch.Tensor], run: FinetuneSettings, report: FinetuneReport, *,
           log: Callable[[dict[str, Any]], None], bar: Any, started: float) -> None:
    """The optimisation steps, counted in ``report.steps``. A KeyboardInterrupt propagates
    after logging the steps of the unfinished interval."""
    device = input_device(model)
    optimizer = torch.optim.AdamW(list(trainable.values()), lr=run.lr, weight_decay=0.0)
    seed_torch(run.seed)
    order = _batch_order(len(blocks), run.batch_size, run.seed)
    weights = run.loss_weights
    sums = _Sums()
    kinds: list[str] | None = None
    try:
        for step in range(1, run.steps + 1):
            ids = torch.from_numpy(blocks[next(order)]).to(device)
            with torch.no_grad():
                ref_logits = _reference_forward(model, originals, ids)
                ref_routes = tap.take(ids.shape)
                ref_logp = ref_logits.float().log_softmax(-1)
                del ref_logits
            if kinds is None:
                kinds = [score_kind(route, site.module)
                         for route, site in zip(ref_routes, tap.sites, strict=True)]
                report.score_kind = ",".join(sorted(set(kinds)))
            logits = model(input_ids=ids, use_cache=False).logits
            routes = tap.take(ids.shape)
            terms = _loss_terms(logits, ref_logp, ids, routes, kinds, run.window)
            del logits, ref_logp
            loss = sum(weights[name] * value for name, value in terms.items() if weights[name] > 0)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(list(trainable.values()), MAX_GRAD_NORM)
            optimizer.step()
            report.steps = step
            sums.add(terms, float(loss.detach()), reuse_counts(routes, ids.shape),
                     reuse_counts(ref_routes, ids.shape), ids.numel())
            if step % run.log_every == 0 or step == run.steps:
                record = sums.record(step, run.lr, time.perf_counter() - started)
                log(record)
                bar.set_postfix(lm=f"{record['lm']:.3f}", kl=f"{record['kl']:.4f}",
                                loc=f"{record['locality']:.3f}", reuse=f"{record['reuse']:.3f}",
                                refresh=False)
            bar.update(1)
    except KeyboardInterrupt:
        if sums.steps:
            log(sums.record(report.steps, run.lr, time.perf_counter() - started))
        raise


def _log(report: FinetuneReport, record: dict[str, Any], log_file: Any) -> None:
    """Keep a logged interval in the report and append it to the log file (if any)."""
    report.history.append(record)
    if log_file is not None:
        log_file.write(json.dumps(record) + "\n")
        log_file.flush()


# -- routers -----------------------------------------------------------------------------------

def router_parameters(model: nn.Module, info: MoeModelInfo) -> dict[str, nn.Parameter]:
    """{qualified name: parameter} of the routers: the only parameters fine-tuning changes."""
    found: dict[str, nn.Parameter] = {}
    for site in info.sites:
        for name, param in site.module.named_parameters():
            if name.split(".")[-1] in FROZEN_ROUTER_PARAMS:
                continue
            if not param.is_floating_point():
                raise MoecacheError(f"{site.name}.{name}: router parameter of dtype {param.dtype} "
                                    "cannot be trained (quantised router?)")
            found[f"{site.name}.{name}"] = param
    if not found:
        raise MoecacheError(f"{info.router_class} at {info.router_path}: the router has no trainable "
                            "parameters")
    return found


def score_kind(route: RouterOutput, module: nn.Module | None = None) -> str:
    """``"softmax"`` or ``"sigmoid"``: how this router turns logits into gate weights.

    Decided from its output: for K >= 2 the log-ratio of the gate weights of the first
    two selected experts is ``l1 - l2`` for softmax routers (with or without top-K
    renormalisation, scaling, or GPT-OSS's softmax over the top-K logits) and
    ``logsigmoid(l1) - logsigmoid(l2)`` for sigmoid routers (normalised or scaled).
    With K = 1 or an inconclusive fit: sigmoid iff the router has a score correction bias.
    """
    fallback = "sigmoid" if module is not None and hasattr(module, "e_score_correction_bias") else "softmax"
    weights = route.weights.detach().float()
    chosen = route.logits.detach().float().gather(1, route.indices.long())
    if weights.shape[1] < 2:
        return fallback
    ok = (weights[:, 0] > 0) & (weights[:, 1] > 0) & torch.isfinite(chosen[:, :2]).all(1)
    if not bool(ok.any()):
        return fallback
    target = weights[ok, 0].log() - weights[ok, 1].log()
    soft = (target - (chosen[ok, 0] - chosen[ok, 1])).abs().mean()
    sig = (target - (F.logsigmoid(chosen[ok, 0]) - F.logsigmoid(chosen[ok, 1]))).abs().mean()
    if min(float(soft), float(sig)) > 0.05 + 0.25 * float(target.abs().mean()):
        return fallback  # neither fits: weights not derived from these logits
    return "sigmoid" if sig < soft else "softmax"


def measure_reuse(model: nn.Module, input_ids: Any, *, batch_size: int = 8) -> float:
    """The reuse rate of ``model``'s routing over token blocks ``input_ids`` (n, T).

    The reuse rate (w = 1): ``sum_{t>=1} |E[t] & E[t-1]| / sum_{t>=1} |E[t]|`` within each
    block, pooled over blocks and MoE layers; a teacher-forced forward, no padding.
    """
    ids = torch.from_numpy(token_blocks(input_ids, vocabulary(model)))
    model.eval()
    info = find_model_routers(model, None)
    device = input_device(model)
    overlap = total = 0
    with RouterTap(info.sites) as tap, torch.no_grad():
        for start in range(0, len(ids), batch_size):
            chunk = ids[start:start + batch_size].to(device)
            model(input_ids=chunk, use_cache=False)
            hit, count = reuse_counts(tap.take(chunk.shape), chunk.shape)
            overlap += hit
            total += count
    return overlap / total


class RouterTap:
    """Forward hooks keeping each router's raw output of the last forward, autograd graph included."""

    def __init__(self, sites):
        self.sites = list(sites)
        self._outputs: list[list[Any]] = [[] for _ in self.sites]
        self._handles: list[Any] = []

    def __enter__(self) -> RouterTap:
        for number, site in enumerate(self.sites):
            self._handles.append(site.module.register_forward_hook(self._hook(number)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook(self, number: int):
        outputs = self._outputs[number]

        def hook(_module, _args, output):
            outputs.append(output)

        return hook

    def take(self, shape: tuple[int, ...]) -> list[RouterOutput]:
        """The (logits, weights, indices) of every router in the forward of ``shape`` (B, T)."""
        rows = int(shape[0]) * int(shape[1])
        routes = []
        for site, outputs in zip(self.sites, self._outputs, strict=True):
            if len(outputs) != 1:
                what = "did not run" if not outputs else f"ran {len(outputs)} times"
                self._clear()
                raise MoecacheError(f"router {site.name} {what} in one model forward")
            parsed = parse_router_output(outputs[0])
            if parsed is None or parsed.indices.shape[0] != rows:
                self._clear()
                raise MoecacheError(f"router {site.name}: unexpected output in a forward of "
                                    f"{tuple(shape)} tokens")
            routes.append(parsed)
        self._clear()
        return routes

    def _clear(self) -> None:
        for outputs in self._outputs:
            outputs.clear()


# -- losses and metrics -------------------------------------------------------------------------

def locality_loss(routes: Sequence[RouterOutput], kinds: Sequence[str], shape: tuple[int, ...],
                  window: int = 1) -> torch.Tensor:
    """L_loc of the module docstring, averaged over tokens t >= 1 and MoE layers."""
    batch, length = int(shape[0]), int(shape[1])
    if length < 2:
        raise MoecacheError("the locality term needs blocks of at least 2 tokens")
    losses = []
    for route, kind in zip(routes, kinds, strict=True):
        logits = route.logits.float().reshape(batch, length, -1)
        scores = F.logsigmoid(logits) if kind == "sigmoid" else logits
        experts = scores.shape[-1]
        used = torch.zeros(batch, length, experts, dtype=torch.bool, device=logits.device)
        used.scatter_(-1, route.indices.long().reshape(batch, length, -1), True)
        recent = torch.zeros_like(used)
        for back in range(1, min(window, length - 1) + 1):
            recent[:, back:] |= used[:, :-back]
        scores = scores[:, 1:]  # t = 0 has no predecessor (and an empty S: keep it out of the graph)
        in_recent = scores.masked_fill(~recent[:, 1:], float("-inf")).logsumexp(-1)
        losses.append((scores.logsumexp(-1) - in_recent).mean())
    return torch.stack(losses).mean()


def _loss_terms(logits, ref_logp, ids, routes, kinds, window) -> dict[str, torch.Tensor]:
    vocab = logits.shape[-1]
    logp = logits.float().log_softmax(-1)
    lm = F.nll_loss(logp[:, :-1].reshape(-1, vocab), ids[:, 1:].reshape(-1))
    kl = F.kl_div(logp.reshape(-1, vocab), ref_logp.reshape(-1, vocab), log_target=True,
                  reduction="batchmean")
    return {"lm": lm, "kl": kl, "locality": locality_loss(routes, kinds, ids.shape, window)}


def reuse_counts(routes: Sequence[RouterOutput], shape: tuple[int, ...]) -> tuple[int, int]:
    """(sum over layers and t >= 1 of |E[t] & E[t-1]|, of |E[t]|) within each block."""
    batch, length = int(shape[0]), int(shape[1])
    hits, total = [], 0
    for route in routes:
        idx = route.indices.detach().reshape(batch, length, -1)
        same = (idx[:, 1:, :, None] == idx[:, :-1, None, :]).any(-1)
        hits.append(same.sum())
        total += same.numel()
    return int(torch.stack(hits).sum()), total  # one device sync for all layers


class _Sums:
    """Sums over the steps since the last log record."""

    def __init__(self):
        self._reset()

    def _reset(self) -> None:
        self.steps = 0
        self.terms = {"lm": 0.0, "kl": 0.0, "locality": 0.0, "loss": 0.0}
        self.reuse = [0, 0]
        self.reuse_orig = [0, 0]
        self.tokens = 0

    def add(self, terms, loss, reuse, reuse_orig, tokens) -> None:
        self.steps += 1
        for name, value in terms.items():
            self.terms[name] += float(value.detach())
        self.terms["loss"] += loss
        for sums, (hit, total) in ((self.reuse, reuse), (self.reuse_orig, reuse_orig)):
            sums[0] += hit
            sums[1] += total
        self.tokens += tokens

    def record(self, step: int, lr: float, elapsed: float) -> dict[str, Any]:
        steps = max(self.steps, 1)
        record = {"step": step, **{k: round(v / steps, 6) for k, v in self.terms.items()},
                  "reuse": round(self.reuse[0] / max(self.reuse[1], 1), 6),
                  "reuse_orig": round(self.reuse_orig[0] / max(self.reuse_orig[1], 1), 6),
                  "lr": lr, "tokens": self.tokens, "elapsed_s": round(elapsed, 3)}
        self._reset()
        return record


def _evaluate(model, originals, blocks: np.ndarray, tap: RouterTap, batch_size: int) -> dict[str, Any]:
    """Original vs fine-tuned routers on fixed blocks: reuse, next-token CE, KL."""
    sums = {"reuse_before": [0, 0], "reuse_after": [0, 0]}
    lm_before = lm_after = kl = 0.0
    tokens = predictions = 0
    device = input_device(model)
    with torch.no_grad():
        for start in range(0, len(blocks), batch_size):
            ids = torch.from_numpy(blocks[start:start + batch_size]).to(device)
            ref_logp = _reference_forward(model, originals, ids).float().log_softmax(-1)
            before = reuse_counts(tap.take(ids.shape), ids.shape)
            logp = model(input_ids=ids, use_cache=False).logits.float().log_softmax(-1)
            after = reuse_counts(tap.take(ids.shape), ids.shape)
            vocab = logp.shape[-1]
            target = ids[:, 1:].reshape(-1)
            lm_before += float(F.nll_loss(ref_logp[:, :-1].reshape(-1, vocab), target, reduction="sum"))
            lm_after += float(F.nll_loss(logp[:, :-1].reshape(-1, vocab), target, reduction="sum"))
            kl += float(F.kl_div(logp.reshape(-1, vocab), ref_logp.reshape(-1, vocab), log_target=True,
                                 reduction="sum"))
            for key, (hit, total) in (("reuse_before", before), ("reuse_after", after)):
                sums[key][0] += hit
                sums[key][1] += total
            tokens += ids.numel()
            predictions += target.numel()
    return {"reuse_before": sums["reuse_before"][0] / sums["reuse_before"][1],
            "reuse_after": sums["reuse_after"][0] / sums["reuse_after"][1],
            "lm_before": lm_before / predictions, "lm_after": lm_after / predictions,
            "kl": kl / tokens, "blocks": int(len(blocks)), "tokens": tokens}


def _reference_forward(model: nn.Module, originals: dict[str, torch.Tensor], ids: torch.Tensor):
    """Logits of the original model: this model with the original router tensors swapped in."""
    output = torch.func.functional_call(model, originals, args=(),
                                        kwargs={"input_ids": ids, "use_cache": False})
    return output.logits


# -- helpers ----------------------------------------------------------------------------------

def cast_for_saving(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast the model's floating tensors to ``dtype`` in place, except those the model keeps in
    float32 (``_keep_in_fp32_modules[_strict]``, e.g. DeepSeek-V3's score correction bias,
    whose rounding would change which experts win)."""
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    keep |= set(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    named = list(model.named_parameters()) + list(model.named_buffers())
    for name, tensor in named:
        if tensor.is_floating_point() and not keep & set(name.split(".")):
            tensor.data = tensor.data.to(dtype)


def find_model_routers(model: nn.Module, tokenizer: Any) -> MoeModelInfo:
    pad = getattr(tokenizer, "pad_token_id", None)
    try:
        return find_routers(model, probe_token=pad if isinstance(pad, int) else 0)
    except MoecacheError as err:
        raise MoecacheError(str(err).replace("nothing to capture", "no router to fine-tune")) from None


def _blocks(data, tokenizer, seq_len: int, *, max_blocks: int, source: str) -> np.ndarray:
    if isinstance(data, (np.ndarray, torch.Tensor)):
        return token_blocks(data)
    if tokenizer is None:
        raise MoecacheError("a tokenizer is needed to pack text into blocks")
    return pack_blocks(tokenizer, load_texts(data), seq_len, max_blocks=max_blocks, source=source)


def _batch_order(count: int, batch_size: int, seed: int) -> Iterator[np.ndarray]:
    """Batches of block indices: seeded permutations, one after another, no repeat inside a pass."""
    rng = np.random.default_rng(seed)
    pool: list[int] = []
    while True:
        while len(pool) < batch_size:
            pool.extend(rng.permutation(count).tolist())
        batch, pool = pool[:batch_size], pool[batch_size:]
        yield np.asarray(batch)


def vocabulary(model: nn.Module) -> int | None:
    """The number of token ids ``model`` embeds (None if it has no input embeddings)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return getattr(embeddings, "num_embeddings", None)


def _check_length(model: nn.Module, length: int) -> None:
    limit = getattr(text_config(getattr(model, "config", None)), "max_position_embeddings", None)
    if isinstance(limit, int) and length > limit:
        raise MoecacheError(f"--seq-len {length} exceeds the model's max_position_embeddings {limit}")


def _check_out(out_dir: Path, model_path: str | os.PathLike, *, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise MoecacheError(f"{out_dir}: exists and is not a folder")
    if out_dir.exists() and not overwrite:
        raise MoecacheError(f"{out_dir}: already exists (pass --force to overwrite)")
    if Path(model_path).exists() and out_dir.exists() and out_dir.resolve() == Path(model_path).resolve():
        raise MoecacheError(f"{out_dir}: is the model folder itself; choose another --out")


def _data_source(data: Any) -> tuple[str, str | None]:
    if isinstance(data, (str, os.PathLike)):
        return str(data), hashlib.sha256(Path(data).read_bytes()).hexdigest()
    return "<list>", hashlib.sha256(json.dumps(list(data)).encode()).hexdigest()


def _real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
