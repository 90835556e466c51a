"""Network parametrizations: turn a network's raw output into score, epsilon and x0 estimates.

With x_t = alpha(t) x0 + sigma(t) eps (see ``sde.py``), the three quantities are tied by
Tweedie's formula (Efron 2011; Song et al. 2021, Eq. 7):

    score(x_t, t) = -eps_hat / sigma(t),   x0_hat = (x_t - sigma(t) eps_hat) / alpha(t)
                  = (x_t + sigma(t)^2 score) / alpha(t).

``ScoreModel`` wraps any network ``net(x, label, **cond)`` and owns the label fed to it (the
time/noise conditioning) and the input scaling. Networks never see the SDE.

Predictions (``prediction=``):
    "eps":   F = eps_hat                                       (Ho et al. 2020)
    "score": F = score (raw; for noise-free models use an SDE-free ``score_fn`` directly)
    "x0":    F = x0_hat
    "v":     F = v_hat with v = alpha eps - sigma x0           (Salimans & Ho 2022, Eq. 8 generalised)
    "edm":   x0_hat = c_skip x~ + c_out F(c_in x~, c_noise) on x~ = x / alpha, with
             noise level s = sigma / alpha                       (Karras et al. 2022, Eq. 7 & Table 1)

Each is one row of ``PARAMETRIZATIONS``: the network sees c_in x_t and predicts F = p x0 + q eps, so
(x0_hat, eps_hat) solve the 2x2 system x_t = alpha x0 + sigma eps, F = p x0 + q eps.

Labels (``label=``): "time" -> 999 t / T (DDPM / DDPM++ convention), "log_sigma" -> log sigma(t)
(NCSN++ with Fourier features), "sigma" -> sigma(t), "edm" -> log(sigma / alpha) / 4 (Karras et al.
2022, Table 1). The default is "edm" for ``prediction="edm"`` and "time" otherwise.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from sgm_lightning.sde import SDE
from sgm_lightning.utils import bcast, check_choice

PREDICTIONS = ("eps", "score", "x0", "v", "edm")
LABELS = ("time", "log_sigma", "sigma", "edm")


def _edm(alpha, sigma, sigma_data):
    """EDM preconditioning on x~ = x / alpha with noise level n = sigma / alpha (Karras et al. 2022, Table 1):
    c_in = 1 / r, c_skip = sigma_data^2 / r^2, c_out = n sigma_data / r with r = sqrt(n^2 + sigma_data^2);
    the target (x0 - c_skip x~) / c_out simplifies to (n x0 - sigma_data^2 eps) / (r sigma_data)."""
    n = sigma / alpha
    r = torch.sqrt(n * n + sigma_data**2)
    return 1.0 / (alpha * r), n / (r * sigma_data), -sigma_data / r


# prediction -> (alpha, sigma, sigma_data) -> (c_in, p, q): the network sees c_in x_t and is trained to
# output F = p x0 + q eps. This table is the only place where the predictions differ.
PARAMETRIZATIONS = {
    "eps": lambda a, s, sd: (1.0, torch.zeros_like(s), torch.ones_like(s)),
    "score": lambda a, s, sd: (1.0, torch.zeros_like(s), -1.0 / s),        # F = -eps / sigma
    "x0": lambda a, s, sd: (1.0, torch.ones_like(s), torch.zeros_like(s)),
    "v": lambda a, s, sd: (1.0, -s, a),                                      # v = alpha eps - sigma x0
    "edm": _edm,
}


class ModelOutput(NamedTuple):
    """Score, epsilon and x0 estimates at (x_t, t), each shaped like x_t."""

    score: torch.Tensor
    eps: torch.Tensor
    x0: torch.Tensor


class ScoreModel(nn.Module):
    """Wrap ``net`` so that it can be asked for score / eps / x0 at (x, t) under ``sde``.

    Args:
        net: module called as ``net(x_in, label, **cond)`` returning a tensor shaped like ``x_in``.
        sde: the forward process (supplies alpha(t), sigma(t)).
        prediction: what ``net`` predicts, one of PREDICTIONS.
        label: the conditioning label fed to ``net``, one of LABELS (None: default for ``prediction``).
        sigma_data: EDM's data standard deviation (only for ``prediction="edm"``).
    """

    def __init__(self, net: nn.Module, sde: SDE, prediction: str = "eps", label: str | None = None,
                 sigma_data: float = 0.5):
        super().__init__()
        check_choice("prediction", prediction, PREDICTIONS)
        if label is None:
            label = "edm" if prediction == "edm" else "time"
        check_choice("label", label, LABELS)
        if not sigma_data > 0:
            raise ValueError(f"sigma_data must be > 0, got {sigma_data!r}")
        self.net = net
        self.sde = sde
        self.prediction = prediction
        self.label_kind = label
        self.sigma_data = float(sigma_data)

    # --------------------------------------------------------------------------- labels
    def label(self, t: torch.Tensor) -> torch.Tensor:
        """The (B,) time/noise label fed to the network at time t."""
        if self.label_kind == "time":
            return t * (999.0 / self.sde.T)
        alpha, sigma = self.sde.marginal_coeffs(t)
        if self.label_kind == "log_sigma":
            return torch.log(sigma)
        if self.label_kind == "sigma":
            return sigma
        return 0.25 * torch.log(sigma / alpha)

    # --------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        """Raw network output F at (x, t) (what the network was trained to predict)."""
        return self._raw(x, t, cond)[0]

    def _raw(self, x, t, cond):
        t = self._check(x, t)
        alpha, sigma = (bcast(c.to(x.dtype), x) for c in self.sde.marginal_coeffs(t))
        c_in, p, q = PARAMETRIZATIONS[self.prediction](alpha, sigma, self.sigma_data)
        out = self.net(c_in * x, self.label(t).to(x.dtype), **cond)
        if out.shape != x.shape:
            raise ValueError(f"network output has shape {tuple(out.shape)} but its input has shape {tuple(x.shape)}; "
                             "the network must return a tensor shaped like its input")
        return out, alpha, sigma, p, q

    def _check(self, x: torch.Tensor, t) -> torch.Tensor:
        if torch.is_tensor(t) and t.is_floating_point():
            t = t.to(x.device)
        else:  # a Python number or an integer tensor: in x's dtype (float64 data keep float64 coefficients)
            t = torch.as_tensor(t, device=x.device, dtype=x.dtype if x.is_floating_point() else None)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must have shape (B,) = ({x.shape[0]},), got {tuple(t.shape)}")
        return t

    def outputs(self, x: torch.Tensor, t: torch.Tensor, **cond) -> ModelOutput:
        """Score, eps and x0 estimates at (x, t): the solution of x = alpha x0 + sigma eps,
        F = p x0 + q eps (Tweedie's formula then gives score = -eps / sigma)."""
        F, a, s, p, q = self._raw(x, t, cond)
        det = a * q - s * p
        x0 = (q * x - s * F) / det
        eps = (a * F - p * x) / det
        return ModelOutput(score=-eps / s, eps=eps, x0=x0)

    def score(self, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        """grad_x log p_t(x) estimate (the ``score_fn`` handed to samplers)."""
        return self.outputs(x, t, **cond).score

    def eps(self, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        """Noise estimate eps_hat(x_t, t)."""
        return self.outputs(x, t, **cond).eps

    def denoise(self, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        """x0_hat = E[x0 | x_t] (Tweedie's formula)."""
        return self.outputs(x, t, **cond).x0

    def target(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the network should output at x_t = alpha x0 + sigma eps (the regression target p x0 + q eps).

        A network that outputs exactly this gives score = true conditional score, so
        ``outputs(x_t, t)`` round-trips to (-eps / sigma, eps, x0).
        """
        alpha, sigma = (bcast(c.to(x0.dtype), x0) for c in self.sde.marginal_coeffs(self._check(x0, t)))
        _, p, q = PARAMETRIZATIONS[self.prediction](alpha, sigma, self.sigma_data)
        return p * x0 + q * eps

    def hparams(self) -> dict:
        return {"prediction": self.prediction, "label": self.label_kind, "sigma_data": self.sigma_data}
