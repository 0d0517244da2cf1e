"""Forward hooks that record, per model forward, the experts every token was routed to.

The hooks only keep references to the router's output tensors; nothing leaves the
device per layer. After a model forward, :meth:`RoutingRecorder.take` stacks the
layers on the device (one ``torch.stack`` for the raw top-K indices, one for the
weights as float32, one for the optional scores as float16) and starts ONE
asynchronous device-to-host copy of the step; the caller reads it back
(:meth:`PendingStep.wait`, or :func:`wait_steps` for several steps at once) later,
when the copy is long done, so capture adds no synchronisation of its own to
generation. On CPU the copy is immediate. The rest of the per-step work, ranking each
token's K experts by descending weight and narrowing the ids to int16, happens on
the host with NumPy when the steps are read back, for many steps in one go.

With ``lookahead`` each router's hook also runs the NEXT MoE layer's router on this
router's input (under ``no_grad``; the hooks ignore those extra calls) and keeps its
output the same way: the experts layer l + 1 would pick from layer l's hidden state.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from ..errors import MoecacheError
from ..trace_format import NO_NEXT_LAYER
from .routers import RouterSite

_FP16_MAX = 65504.0


class PendingStep:
    """Host copies of one step's tensors, possibly still in flight from the device.

    The copies are the raw stacks of :meth:`RoutingRecorder.take`; :meth:`wait` returns
    them finished (K ranked by weight, ids as int16).
    """

    __slots__ = ("_host", "_event")

    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        self._event = None
        if all(t.is_cpu for t in tensors.values()):  # already host memory: nothing to copy
            self._host = {k: t.detach() if t.requires_grad else t for k, t in tensors.items()}
            return
        cuda = next((t.device for t in tensors.values() if t.is_cuda), None)
        if cuda is not None:
            # D2H with non_blocking=True lands in pinned memory; the event says when.
            self._host = {k: t.to("cpu", non_blocking=True) for k, t in tensors.items()}
            self._event = torch.cuda.Event()
            self._event.record(torch.cuda.current_stream(cuda))
        else:
            self._host = {k: t.detach().to("cpu") for k, t in tensors.items()}

    @property
    def rows(self) -> int:
        """N, the step's token rows (known before the copy lands)."""
        return self._host["experts"].shape[0]

    def ready(self) -> bool:
        return self._event is None or bool(self._event.query())

    def wait(self) -> dict[str, np.ndarray]:
        """The step's arrays (see :meth:`RoutingRecorder.take`), waiting for the copy."""
        return wait_steps((self,))

    def _landed(self) -> dict[str, torch.Tensor]:
        if self._event is not None:
            self._event.synchronize()
        return self._host


def wait_steps(steps: Sequence[PendingStep]) -> dict[str, np.ndarray]:
    """The arrays of ``steps`` concatenated along their rows, in order: what
    :meth:`PendingStep.wait` gives for each step, finished in one go."""
    hosts = [step._landed() for step in steps]
    if len(hosts) == 1:
        arrays = {k: t.numpy() for k, t in hosts[0].items()}
    else:
        arrays = {k: torch.cat([host[k] for host in hosts]).numpy() for k in hosts[0]}
    arrays["weights"], arrays["experts"] = _ranked(arrays["weights"], arrays["experts"])
    if "lookahead" in arrays:  # layers 0..L-2; the last MoE layer has no next layer
        weights, experts = _ranked(arrays["lookahead_weights"], arrays["lookahead"])
        rows, _, top_k = experts.shape
        arrays["lookahead"] = np.concatenate(
            [experts, np.full((rows, 1, top_k), NO_NEXT_LAYER, np.int16)], axis=1)
        arrays["lookahead_weights"] = np.concatenate(
            [weights, np.full((rows, 1, top_k), np.nan, np.float32)], axis=1)
    return arrays


def _ranked(weights: np.ndarray, experts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(weights, int16 experts) with each row's K sorted by descending weight."""
    if np.isnan(weights).any():
        # torch.sort ranks NaN above every number; keep its order exactly
        weights, order = torch.sort(torch.from_numpy(weights), dim=-1, descending=True,
                                    stable=True)
        weights, order = weights.numpy(), order.numpy()
        experts = np.take_along_axis(experts, order, axis=-1)
    else:
        # descending and stable: ties keep the router's order, as torch.sort(stable=True)
        order = np.argsort(-weights, axis=-1, kind="stable")
        top_k = order.shape[-1]
        flat = order.reshape(-1, top_k) + np.arange(0, order.size, top_k)[:, None]
        weights = weights.reshape(-1)[flat].reshape(order.shape)
        experts = experts.reshape(-1)[flat].reshape(order.shape)
    return weights, experts.astype(np.int16)


class RoutingRecorder:
    """Hooks on the routers of ``sites``; use as a context manager (hooks removed on exit)."""

    def __init__(self, sites: Sequence[RouterSite], *, with_logits: bool = False, lookahead: bool = False):
        self.sites = list(sites)
        self.with_logits = with_logits
        self.lookahead = lookahead
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._outputs: list = [None] * len(self.sites)
        self._ahead: list = [None] * (len(self.sites) - 1)  # router l + 1 on router l's input
        self._running = [False]  # True while a hook runs the next router: the hooks ignore that call
        self._calls = [0] * len(self.sites)
        self._once = [1] * len(self.sites)
        self._uniform = True  # see take()

    # -- hooks ------------------------------------------------------------------------
    def __enter__(self) -> RoutingRecorder:
        self.attach()
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    def attach(self) -> None:
        if self._handles:
            return
        for number, site in enumerate(self.sites):
            if self.lookahead:
                handle = site.module.register_forward_hook(self._lookahead_hook(number), with_kwargs=True)
            else:
                handle = site.module.register_forward_hook(self._hook(number))
            self._handles.append(handle)

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook(self, number: int):
        # Lean on purpose: runs in every MoE layer of every forward. It only keeps a
        # reference to the output; the format was validated by the probe forward.
        outputs, calls = self._outputs, self._calls

        def hook(_module, _args, output):
            outputs[number] = output
            calls[number] += 1

        return hook

    def _lookahead_hook(self, number: int):
        """:meth:`_hook`, then the next router on this router's input (not recorded as its call)."""
        outputs, calls, ahead, running = self._outputs, self._calls, self._ahead, self._running
        following = self.sites[number + 1].module if number + 1 < len(self.sites) else None

        def hook(_module, args, kwargs, output):
            if running[0]:
                return
            outputs[number] = output
            calls[number] += 1
            if following is None:
                return
            running[0] = True
            try:
                with torch.no_grad():
                    ahead[number] = following(*args, **kwargs)
            finally:
                running[0] = False

        return hook

    # -- steps ------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget what the routers returned so far (call before each model forward)."""
        self._outputs[:] = [None] * len(self.sites)
        self._calls[:] = [0] * len(self.sites)
        self._ahead[:] = [None] * len(self._ahead)

    def take(self, extras: Mapping[str, torch.Tensor] | None = None) -> PendingStep:
        """The routing of the forward that just ran, as a :class:`PendingStep`.

        Its arrays are ``experts`` (N, L, K) int16 and ``weights`` (N, L, K) float32,
        K sorted by descending weight (the router's rank order; routers that pick the
        top-K unsorted get this canonical order), ``logits`` (N, L, E) float16 when
        recording scores, ``lookahead`` and ``lookahead_weights`` (N, L - 1, K) raw (the
        next router's output; :func:`wait_steps` ranks them and adds the last layer) with
        ``lookahead``, plus the given ``extras``. N counts the forward's token rows in the
        model's flattening order (batch-major), padding included.
        """
        if self._calls != self._once:
            for number, calls in enumerate(self._calls):
                if calls != 1:
                    what = "did not run" if calls == 0 else f"ran {calls} times"
                    raise MoecacheError(
                        f"router {self.sites[number].name} {what} in one model forward")
        outputs = self._outputs
        top_k = outputs[0][2].shape[-1]
        device = outputs[0][2].device
        tensors = self._routing(outputs, top_k, device, with_logits=self.with_logits)
        if self.lookahead and self._ahead:
            ahead = self._routing(self._ahead, top_k, device, with_logits=False)
            tensors["lookahead"], tensors["lookahead_weights"] = ahead["experts"], ahead["weights"]
        elif self.lookahead:  # one MoE layer: no next router
            rows = tensors["experts"].shape[0]
            tensors["lookahead"] = tensors["experts"].new_empty((rows, 0, top_k))
            tensors["lookahead_weights"] = tensors["weights"].new_empty((rows, 0, top_k))
        if extras:
            tensors.update(extras)
        self.reset()
        return PendingStep(tensors)

    def _routing(self, outputs, top_k: int, device, *, with_logits: bool) -> dict[str, torch.Tensor]:
        """``experts``, ``weights`` (and ``logits``) of router ``outputs``, stacked along layers."""
        if self._uniform:
            # routers of the same shape on one device: one stack per output, no per-layer work
            try:
                return self._stack(outputs, top_k, with_logits)
            except RuntimeError:  # shapes or devices differ between layers
                self._uniform = False
        return self._stack_layers(outputs, top_k, device, with_logits)

    def _stack(self, outputs, top_k: int, with_logits: bool) -> dict[str, torch.Tensor]:
        layers = len(outputs)
        indices = torch.stack([o[2] for o in outputs], dim=-2).reshape(-1, layers, top_k)
        weights = torch.stack([o[1] for o in outputs], dim=-2)
        if weights.shape[-1] != top_k:  # weights given for all E experts: keep the chosen ones
            weights = weights.reshape(-1, layers, weights.shape[-1]).gather(-1, indices)
        tensors = {"experts": indices, "weights": weights.reshape(-1, layers, top_k).float()}
        if with_logits:
            logits = torch.stack([o[0] for o in outputs], dim=-2)
            tensors["logits"] = self._half(logits.reshape(-1, layers, logits.shape[-1]))
        return tensors

    def _stack_layers(self, outputs, top_k: int, device, with_logits: bool) -> dict[str, torch.Tensor]:
        indices = torch.stack([o[2].reshape(-1, top_k).to(device, non_blocking=True)
                               for o in outputs], dim=1)
        weights = torch.stack([self._weights(o, top_k).to(device, non_blocking=True)
                               for o in outputs], dim=1).float()
        tensors = {"experts": indices, "weights": weights}
        if with_logits:
            width = outputs[0][0].shape[-1]
            logits = torch.stack([o[0].reshape(-1, width).to(device, non_blocking=True)
                                  for o in outputs], dim=1)
            tensors["logits"] = self._half(logits)
        return tensors

    @staticmethod
    def _half(logits: torch.Tensor) -> torch.Tensor:
        return logits.float().clamp_(-_FP16_MAX, _FP16_MAX).half()

    @staticmethod
    def _weights(output, top_k: int) -> torch.Tensor:
        weights = output[1]
        if weights.shape[-1] == top_k:
            return weights.reshape(-1, top_k)
        # weights given for all E experts: keep those of the chosen ones
        return weights.reshape(-1, weights.shape[-1]).gather(1, output[2].reshape(-1, top_k))
