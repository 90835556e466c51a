"""Guided score functions for class-conditional sampling (math layer).

Both functions return a ``score_fn(x, t)`` that any sampler (``sgm_lightning.sampling.sample``)
accepts.

* Classifier-free guidance (Ho & Salimans 2022): one network trained with and without the class
  label (label dropout to a "null" class). With guidance weight ``scale`` = w,

      s_w(x, t, y) = s(x, t, null) + w [s(x, t, y) - s(x, t, null)]

  so w = 0 is exactly the unconditional score and w = 1 the conditional score. The paper writes
  eps_tilde = (1 + w') eps(z, c) - w' eps(z) (Ho & Salimans 2022, Eq. 6); since score = -eps / sigma
  the two forms agree with w = 1 + w' (the paper's w' = 0, "no guidance", is our scale 1).

* Classifier guidance (Song et al. 2021, Eq. 48 / App. I; Dhariwal & Nichol 2021, Alg. 1 in score form):

      s_w(x, t, y) = s(x, t) + w grad_x log p_phi(y | x_t, t)

  with a time-dependent classifier p_phi trained on noisy inputs. With the exact posterior
  classifier and w = 1 this is exactly the conditional score grad_x log p_t(x | y) (Bayes' rule).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from sgm_lightning.utils import check_int, check_number

ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _labels(y, x: torch.Tensor) -> torch.Tensor:
    y = torch.as_tensor(y, device=x.device)
    if y.dtype.is_floating_point or y.dtype == torch.bool:
        raise ValueError(f"y (class labels) must be integers, got dtype {y.dtype}")
    if y.ndim == 0:
        y = y.expand(x.shape[0])
    if y.shape != (x.shape[0],):
        raise ValueError(f"y must be an int or have shape (B,) = ({x.shape[0]},), got {tuple(y.shape)}")
    return y.long()


def _check_scale(scale) -> float:
    if isinstance(scale, torch.Tensor) and scale.numel() == 1 and scale.dtype != torch.bool and not scale.is_complex():
        scale = scale.item()
    return check_number("scale (guidance weight)", scale, -math.inf, math.inf, open_ends=True,
                        what=" (finite; 0 = unconditional)")


def cfg_score_fn(model, y, scale: float, null_label: int, batched: bool = True) -> ScoreFn:
    """Classifier-free guided score s_null + scale (s_y - s_null) (Ho & Salimans 2022, Eq. 6; see module doc).

    Args:
        model: a class-conditional ``ScoreModel`` (anything with ``model.score(x, t, y=labels)``).
        y: class label(s): an int or a LongTensor (B,).
        scale: guidance weight w (0: unconditional, 1: conditional, > 1: guided); the paper's w + 1.
        null_label: the label meaning "no class" (index K of a K-class network).
        batched: evaluate the conditional and unconditional scores in one network call on 2B inputs.
    scale = 0 and scale = 1 call the network once on B inputs, so scale = 0 reproduces the
    unconditional sampler bit for bit.
    """
    w = _check_scale(scale)
    if not callable(getattr(model, "score", None)):
        raise ValueError("model must have a score(x, t, y=...) method (e.g. a class-conditional ScoreModel)")
    check_int("null_label (K for a K-class network)", null_label, min=0)
    classes = getattr(getattr(model, "net", None), "num_classes", "unknown")  # a ScoreModel's network
    if classes is None:
        raise ValueError("model is not class-conditional (its network has num_classes=None): classifier-free "
                         "guidance needs a network trained with class labels (model.class_conditional=true)")
    if classes != "unknown" and int(null_label) != int(classes):
        raise ValueError(f"null_label={null_label} is not the null class of this {classes}-class network: pass "
                         f"null_label={classes} (labels 0..{classes - 1} are classes)")

    def score_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        labels = _labels(y, x)
        null = torch.full_like(labels, int(null_label))
        if w == 0.0:
            return model.score(x, t, y=null)
        if w == 1.0:
            return model.score(x, t, y=labels)
        if batched:
            s = model.score(torch.cat([x, x]), torch.cat([t, t]), y=torch.cat([labels, null]))
            s_cond, s_uncond = s.chunk(2)
        else:
            s_cond, s_uncond = model.score(x, t, y=labels), model.score(x, t, y=null)
        return s_uncond + w * (s_cond - s_uncond)

    return score_fn


def classifier_log_prob_grad(classifier, x: torch.Tensor, label: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """grad_x log p_phi(y | x, label) by autograd (log_softmax of ``classifier(x, label)`` logits); also
    under ``torch.no_grad`` / ``torch.inference_mode`` (it leaves them, with copies of its inputs)."""
    with torch.inference_mode(False), torch.enable_grad():
        if any(isinstance(v, torch.Tensor) and v.is_inference() for v in (x, label, y)):  # not saved for backward
            x, label, y = (v.clone() if isinstance(v, torch.Tensor) else v for v in (x, label, y))
        xg = x.detach().requires_grad_(True)
        logits = classifier(xg, label)
        if logits.ndim != 2 or logits.shape[0] != x.shape[0]:
            raise ValueError(f"classifier must return logits of shape (B, K), got {tuple(logits.shape)}")
        k = logits.shape[1]
        if bool(((y < 0) | (y >= k)).any()):  # gather would fail without naming y (a device assert on CUDA)
            raise ValueError(f"y (class labels) must lie in 0..{k - 1}, the {k} classes of the classifier, got "
                             f"values in [{int(y.min())}, {int(y.max())}]; classifier guidance has no null label")
        logp = torch.log_softmax(logits, dim=-1).gather(1, y[:, None]).sum()
        (grad,) = torch.autograd.grad(logp, xg)
    return grad.to(x.dtype)


def classifier_guidance_score_fn(score_fn: ScoreFn, classifier, y, scale: float = 1.0,
                                 label_fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> ScoreFn:
    """Classifier-guided score s(x, t) + scale grad_x log p_phi(y | x_t, t) (Song et al. 2021, Eq. 48;
    Dhariwal & Nichol 2021, Alg. 1 with s = scale).

    Args:
        score_fn: unconditional ``score_fn(x, t)``.
        classifier: time-dependent classifier ``classifier(x, label) -> logits (B, K)``.
        y: target class: an int or a LongTensor (B,).
        scale: guidance weight (0: unconditional, 1: Bayes' rule, > 1: sharper).
        label_fn: maps t (B,) to the classifier's time label (e.g. ``ScoreModel.label`` or
            ``NoisyClassifierModule.label``); None passes t unchanged.
    """
    w = _check_scale(scale)
    if not callable(score_fn) or not callable(classifier):
        raise ValueError("score_fn and classifier must be callables")

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s = score_fn(x, t)
        if w == 0.0:
            return s
        label = t if label_fn is None else label_fn(t)
        return s + w * classifier_log_prob_grad(classifier, x, label, _labels(y, x))

    return guided
