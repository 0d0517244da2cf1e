"""Forward hooks that record, per model forward, the experts every token was routed to.

The hooks only keep references to the router's output tensors; nothing leaves the
device per layer. After a model forward, :meth:`RoutingRecorder.take` stacks the
layers on the device (ids as int16, weights as float32, optional scores as float16)
and starts ONE asynchronous device-to-host copy of the step; the caller reads it
back (:meth:`PendingStep.wait`) a step later, when the copy is long done, so capture
adds no synchronisation of its own to generation. On CPU the copy is immediate.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from ..errors import MoecacheError
from .routers import RouterSite

_FP16_MAX = 65504.0


class PendingStep:
    """Host copies of one step's tensors, possibly still in flight from the device."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        cuda = next((t.device for t in tensors.values() if t.is_cuda), None)
        self._event = None
        if cuda is not None:
            # D2H with non_blocking=True lands in pinned memory; the event says when.
            self._host = {k: t.to("cpu", non_blocking=True) for k, t in tensors.items()}
            self._event = torch.cuda.Event()
            self._event.record(torch.cuda.current_stream(cuda))
        else:
            self._host = {k: t.detach().to("cpu") for k, t in tensors.items()}

    def ready(self) -> bool:
        return self._event is None or bool(self._event.query())

    def wait(self) -> dict[str, np.ndarray]:
        if self._event is not None:
            self._event.synchronize()
        return {k: t.numpy() for k, t in self._host.items()}


class RoutingRecorder:
    """Hooks on the routers of ``sites``; use as a context manager (hooks removed on exit)."""

    def __init__(self, sites: Sequence[RouterSite], *, with_logits: bool = False):
        self.sites = list(sites)
        self.with_logits = with_logits
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._outputs: list = [None] * len(self.sites)
        self._calls = [0] * len(self.sites)
        self._once = [1] * len(self.sites)

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
            self._handles.append(site.module.register_forward_hook(self._hook(number)))

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

    # -- steps ------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget what the routers returned so far (call before each model forward)."""
        self._outputs[:] = [None] * len(self.sites)
        self._calls[:] = [0] * len(self.sites)

    def take(self, extras: Mapping[str, torch.Tensor] | None = None) -> PendingStep:
        """The routing of the forward that just ran, as a :class:`PendingStep`.

        Its arrays are ``experts`` (N, L, K) int16 and ``weights`` (N, L, K) float32,
        K sorted by descending weight (the router's rank order; routers that pick the
        top-K unsorted get this canonical order), ``logits`` (N, L, E) float16 when
        recording scores, plus the given ``extras``. N counts the forward's token rows
        in the model's flattening order (batch-major), padding included.
        """
        if self._calls != self._once:
            for number, calls in enumerate(self._calls):
                if calls != 1:
                    what = "did not run" if calls == 0 else f"ran {calls} times"
                    raise MoecacheError(
                        f"router {self.sites[number].name} {what} in one model forward")
        outputs = self._outputs
        device = outputs[0][2].device
        top_k = outputs[0][2].shape[-1]
        indices = torch.stack([o[2].reshape(-1, top_k).to(device, non_blocking=True)
                               for o in outputs], dim=1)
        weights = torch.stack([self._weights(o, top_k).to(device, non_blocking=True)
                               for o in outputs], dim=1).float()
        weights, order = torch.sort(weights, dim=-1, descending=True, stable=True)
        tensors = {"experts": indices.gather(-1, order).to(torch.int16), "weights": weights}
        if self.with_logits:
            width = outputs[0][0].shape[-1]
            logits = torch.stack([o[0].reshape(-1, width).to(device, non_blocking=True)
                                  for o in outputs], dim=1)
            tensors["logits"] = logits.float().clamp_(-_FP16_MAX, _FP16_MAX).half()
        if extras:
            tensors.update(extras)
        self.reset()
        return PendingStep(tensors)

    @staticmethod
    def _weights(output, top_k: int) -> torch.Tensor:
        weights = output[1]
        if weights.shape[-1] == top_k:
            return weights.reshape(-1, top_k)
        # weights given for all E experts: keep those of the chosen ones
        return weights.reshape(-1, weights.shape[-1]).gather(1, output[2].reshape(-1, top_k))
