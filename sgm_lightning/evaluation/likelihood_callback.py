"""Bits/dim of held-out data through the probability-flow ODE during training (Song et al. 2021, App. D.2).

For each of the first ``num_batches`` batches of the chosen split (per rank; a datamodule that shards
its loaders gives every rank different batches), images are uniformly dequantized ``n_dequant`` times
(Theis et al. 2016), their NLL is computed with ``sgm_lightning.likelihood.log_likelihood`` (Eq. 39-40,
Hutchinson or exact trace) and converted with ``bits_per_dim``. The mean over examples and draws is
reduced over ranks with a torchmetrics ``MeanMetric`` and logged as ``<prefix>/bpd`` on every rank.
"""

from __future__ import annotations

import itertools

import lightning as L
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from torchmetrics import MeanMetric

from sgm_lightning.evaluation.periodic import PeriodicEvaluation
from sgm_lightning.likelihood import bits_per_dim, check_likelihood_options, dequantize, log_likelihood
from sgm_lightning.evaluation.reference import batch_images
from sgm_lightning.training.data.ranges import range_bounds
from sgm_lightning.utils import check_choice, check_int, num_dims


def batch_bits_per_dim(module, x: torch.Tensor, generator: torch.Generator | None = None, n_dequant: int = 1,
                       trace: str = "hutchinson", use_ema: bool = True, n_bits: int = 8,
                       **solver_options) -> tuple[torch.Tensor, int]:
    """Bits/dim per example (B,) of images ``x`` (in the module's ``data_range``, [-1, 1] or [0, 1])
    under ``module``'s probability-flow ODE, averaged over ``n_dequant`` uniform dequantizations;
    also returns the NFE of the last solve.

    ``module`` provides ``score_fn()``, ``sde``, ``ema_scope(use_ema)`` and ``hparams.data_range``
    (``ScoreLitModule``).
    """
    n_dequant = check_int("n_dequant", n_dequant)  # 0 gave NaN bits/dim, 1.7 one draw
    lo, hi = range_bounds(module.hparams.get("data_range", "[-1,1]"))
    was_training = module.training
    module.eval()
    total, nfe = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device), 0
    try:
        # Lightning's evaluation loops run under inference mode; the divergence needs autograd
        with torch.inference_mode(False), torch.enable_grad(), module.ema_scope(use_ema):
            x = x.clone()
            for _ in range(n_dequant):
                xd = dequantize(x, generator, n_bits=n_bits, data_min=lo, data_max=hi).to(x.device)
                res = log_likelihood(module.score_fn(), module.sde, xd, trace=trace, generator=generator,
                                     **solver_options)
                total += bits_per_dim(res.nll.detach(), num_dims(x), n_bits=n_bits, data_min=lo,
                                      data_max=hi).double()
                nfe = int(res.nfe)
    finally:
        module.train(was_training)
    return (total / n_dequant).detach(), nfe


class LikelihoodCallback(PeriodicEvaluation):
    """Logs ``<prefix>/bpd`` (and ``<prefix>/bpd_nfe``) of the ``split`` data every N steps and/or at validation end.

    Args:
        every_n_steps: evaluate after every N optimizer steps (None: never on steps).
        at_validation: evaluate at the end of each validation epoch (not in the sanity check).
        num_batches: batches per rank.
        n_dequant: uniform dequantization draws per image (averaged).
        trace: "hutchinson" | "exact" divergence.
        split: "val" | "test" | "train": which ``<split>_dataloader()`` of the datamodule.
        use_ema: use the EMA weights.
        seed: seeds dequantization noise and Hutchinson probes (seed + rank).
        n_bits: bits of the discrete data.
        solver_options: passed to ``log_likelihood`` (e.g. ``rtol``, ``atol``, ``solver``).
    """

    def __init__(self, every_n_steps: int | None = 5000, at_validation: bool = False, num_batches: int = 1,
                 n_dequant: int = 1, trace: str = "hutchinson", split: str = "val", use_ema: bool = True,
                 seed: int = 0, n_bits: int = 8, prefix: str = "val", solver_options: dict | None = None):
        super().__init__()
        if every_n_steps is None and not at_validation:
            raise ValueError("set every_n_steps (an integer >= 1) and/or at_validation=True, else bpd never runs")
        if every_n_steps is not None:
            every_n_steps = check_int("every_n_steps", every_n_steps)
        check_choice("trace", trace, ("hutchinson", "exact"))
        check_choice("split", split, ("train", "val", "test"))
        self.every_n_steps, self.at_validation = every_n_steps, bool(at_validation)
        self.num_batches, self.n_dequant = check_int("num_batches", num_batches), check_int("n_dequant", n_dequant)
        self.trace, self.split = trace, split
        self.use_ema, self.seed, self.prefix = bool(use_ema), int(seed), prefix
        self.n_bits = check_int("n_bits", n_bits)  # was int(): 2.5 became 2, 0 failed at the first evaluation
        self.prog_bar_key = "bpd"
        self.solver_options = dict(solver_options or {})
        check_likelihood_options(trace=trace, **self.solver_options)  # fail here, not at the first evaluation
        self.history: list[tuple[int, float]] = []
        self._last_step = -1

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Fail at start-up, not at step N, when the split to evaluate has no data."""
        if stage == "fit":
            self.check_unconditioned(pl_module)
        shape = tuple(getattr(pl_module, "data_shape", ()) or ())
        if shape and len(shape) != 3:  # continuous (B, D) data: 'values outside the 8-bit range' at step N
            raise ValueError(f"LikelihoodCallback reports bits/dim of 8-bit images (C, H, W) under uniform "
                             f"dequantization, but this model's data have shape {shape}: drop it "
                             "(callbacks.likelihood=null), or compute NLLs in nats with "
                             "sgm_lightning.likelihood.log_likelihood")
        dm = trainer.datamodule
        if stage != "fit" or dm is None or not hasattr(dm, f"{self.split}_dataloader"):
            return
        try:
            n = len(getattr(dm, f"{self.split}_dataloader")())
        except TypeError:  # an iterable loader of unknown length
            return
        except (MisconfigurationException, NotImplementedError) as err:  # Lightning's stub of a missing split
            raise ValueError(f"LikelihoodCallback(split={self.split!r}): {type(dm).__name__} has no {self.split} "
                             f"split ({err}); evaluate another split (callbacks.likelihood.split=val or train)") from err
        if n == 0:
            raise ValueError(f"LikelihoodCallback(split={self.split!r}) has no data: the datamodule's {self.split} "
                             "split is empty. Give the data a validation split (e.g. data.val_fraction=0.05) or "
                             "evaluate another split (callbacks.likelihood.split=train)")

    @property
    def state_key(self) -> str:
        """One per split and prefix (several LikelihoodCallbacks in one Trainer; the class name still loads)."""
        return self._generate_state_key(split=self.split, prefix=self.prefix)

    def state_dict(self) -> dict:
        return {"history": list(self.history)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = [tuple(h) for h in state_dict.get("history", [])]

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, f"{self.split}_dataloader"):
            raise ValueError(f"LikelihoodCallback needs trainer.datamodule with {self.split}_dataloader()")
        loader = getattr(dm, f"{self.split}_dataloader")()
        mean = MeanMetric().to(pl_module.device)
        g = torch.Generator(device=pl_module.device).manual_seed(self.seed + trainer.global_rank)
        nfe = 0
        for batch in itertools.islice(loader, self.num_batches):
            x = batch_images(batch).to(pl_module.device)
            bpd, nfe = batch_bits_per_dim(pl_module, x, g, self.n_dequant, self.trace, self.use_ema,
                                          self.n_bits, **self.solver_options)
            mean.update(bpd)
        value = float(mean.compute())  # synced over ranks (every rank calls it)
        self.history.append((int(trainer.global_step), value))
        return {"bpd": value, "bpd_nfe": float(nfe)}


__all__ = ["LikelihoodCallback", "batch_bits_per_dim"]
