"""Gradient clipping on the device, and the one gradient norm a training step computes.

``GradientMixin`` gives a LightningModule ``configure_gradient_clipping`` (by norm or by value, foreach
kernels, no host sync, legal with fused optimizers under every precision) and ``grad_norm``: the
global norm of the optimizer's gradients, computed once per set of gradients and shared by the
clipping and ``NaNGuard``'s finiteness test. The module provides ``_logging_step()``
(``step_metrics.StepMetricsMixin``).
"""

from __future__ import annotations

import weakref
from typing import Sequence

import torch


def optimizer_grads(optimizer) -> list[torch.Tensor]:
    """The existing gradients of an optimizer's parameters, in its order."""
    return [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]


def total_norm(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """Global 2-norm of a list of gradients (foreach kernels, stays on the device)."""
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


class GradientMixin:
    """Clipping and the shared gradient norm of a LightningModule (see the module docstring)."""

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Clip (``trainer.gradient_clip_val``, by norm or value) on the device, without a host sync;
        log the norm before clipping on logging steps.

        Done here rather than by Lightning's precision plugin, which refuses fused optimizers under
        mixed precision: with bf16 the gradients are not scaled, and with fp16 the grad scaler
        unscales them first (its step then skips non-finite steps as usual).
        """
        clip, log = float(gradient_clip_val or 0.0), self._logging_step()
        if not clip and not log:
            return
        grads = optimizer_grads(optimizer)
        if not grads:
            return
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", False):
            scaler.unscale_(optimizer)  # a fused optimizer would unscale inside its step: do it now
        norm = self.grad_norm(optimizer, grads) if log or (clip and gradient_clip_algorithm != "value") else None
        if clip and gradient_clip_algorithm == "value":
            torch._foreach_clamp_min_(grads, -clip)
            torch._foreach_clamp_max_(grads, clip)
        elif clip:  # as torch.nn.utils.clip_grad_norm_, without its per-tensor loop off CUDA
            torch._foreach_mul_(grads, (clip / (norm + 1e-6)).clamp(max=1.0))
        if log:
            self.log("train/grad_norm", norm)

    def grad_norm(self, optimizer, grads: Sequence[torch.Tensor] | None = None) -> torch.Tensor | None:
        """Global 2-norm of the gradients ``optimizer`` is about to apply, as a device tensor (no host
        sync); None without gradients. Computed once per set of gradients: ``NaNGuard``'s finiteness
        test and the clipping share it (the gradients are re-read only after they change in
        place, e.g. when the fp16 grad scaler unscales them). ``grads``: the optimizer's existing
        gradients when the caller has listed them already."""
        grads = optimizer_grads(optimizer) if grads is None else grads
        if not grads:
            return None
        # weak references: the cache must not keep last step's gradients alive, and a dead one can
        # never match (an id() could be reused by the next step's tensor)
        ends, versions = (grads[0], grads[-1]), (grads[0]._version, grads[-1]._version)
        cached = self.__dict__.get("_grad_norm_cache")
        if (cached is not None and cached[0] is optimizer and cached[1] == len(grads) and cached[3] == versions
                and all(ref() is g for ref, g in zip(cached[2], ends))):
            return cached[4]
        norm = total_norm(grads)
        self.__dict__["_grad_norm_cache"] = (optimizer, len(grads), tuple(weakref.ref(g) for g in ends), versions, norm)
        return norm
