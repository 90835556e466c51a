"""Training a time-dependent (noisy) classifier p_phi(y | x_t, t) for classifier guidance.

The classifier sees x_t = alpha(t) x_0 + sigma(t) z with t ~ U(eps, T) drawn from the same SDE as
the score model (Song et al. 2021, App. I.1; Dhariwal & Nichol 2021, Sec. 4) and is trained with
cross-entropy. Its gradient grad_x log p_phi(y | x_t, t) then drives
``sgm_lightning.guidance.classifier_guidance_score_fn`` (pass ``module.classifier`` and
``label_fn=module.label``).

Randomness (times t and noise) comes from a per-rank generator seeded with ``seed``, whose state, with
the global RNG's (dropout), travels in checkpoints (``training.state.TrainingStateMixin``, as for
``ScoreLitModule``): a resumed fit continues bitwise like the uninterrupted one. Validation draws from a
generator seeded by the batch index, so the same weights always get the same ``val/loss`` and
validating does not change the training noise.

Checkpoints hold state dicts and hyper-parameters only: the network and the SDE are passed in
(Hydra builds them) and excluded from ``hparams``; reload with
``NoisyClassifierModule.load_from_checkpoint(path, classifier=net, sde=sde)``.
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from sgm_lightning.parametrization import ScoreModel
from sgm_lightning.sde import SDE
from sgm_lightning.training.state import TrainingStateMixin, rank_seed
from sgm_lightning.utils import bcast, check_positive, randn_like


class NoisyClassifierModule(TrainingStateMixin, L.LightningModule):
    """LightningModule training ``classifier(x_t, label(t)) -> logits`` on noisy inputs.

    Args:
        classifier: network called as ``classifier(x, label)`` returning logits (B, K)
            (``nets.NoisyClassifier`` / ``nets.MLPClassifier``).
        sde: the forward process of the score model the classifier will guide.
        label: time label fed to the classifier, as in ``ScoreModel`` ("time", "log_sigma", "sigma", "edm").
        lr: Adam learning rate.
        weight_decay: AdamW weight decay.
        eps: smallest training time (None: ``sde.default_eps``).
        seed: seed of the per-rank generator of the training noise.
        config: the resolved {"net", "sde", "data"} configs (``train_classifier.py``), stored with the
            hyper-parameters so that ``load_classifier_checkpoint`` rebuilds the module from the file alone.
    Batches are (x, y) tuples/lists or dicts with keys "x"/"image" and "y"/"label".
    """

    def __init__(self, classifier: nn.Module, sde: SDE, label: str = "time", lr: float = 3e-4,
                 weight_decay: float = 0.0, eps: float | None = None, seed: int = 0, config: dict | None = None):
        super().__init__()
        check_positive("lr", lr)
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
        if eps is not None and not 0 < eps < sde.T:
            raise ValueError(f"eps must be in (0, T={sde.T}), got {eps!r}")
        self.save_hyperparameters(ignore=["classifier", "sde"])
        self.classifier = classifier
        self.sde = sde
        self.eps = sde.default_eps if eps is None else float(eps)
        # TrainingStateMixin's state: generator, pending RNG states of a resume, loop state; no EMA
        self.ema, self._generator, self._pending_rng, self._pending_torch_rng = None, None, None, None
        self._step_end_loops = None
        # ScoreModel owns the time -> label map; a parameter-free instance lends it (not a submodule)
        object.__setattr__(self, "_labeler", ScoreModel(nn.Identity(), sde, prediction="eps", label=label))

    def label(self, t: torch.Tensor) -> torch.Tensor:
        """The classifier's time/noise label at t (same map as ``ScoreModel.label``)."""
        return self._labeler.label(t)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Logits of p_phi(y | x_t, t)."""
        return self.classifier(x, self.label(t).to(x.dtype))

    @staticmethod
    def _unpack(batch):
        if isinstance(batch, dict):
            x = batch.get("x", batch.get("image"))
            y = batch.get("y", batch.get("label"))
        else:
            x, y = batch[0], batch[1]
        if x is None or y is None:
            raise ValueError("batch must be (x, y) or a dict with 'x'/'image' and 'y'/'label'")
        return x, y

    def noisy_loss(self, x0: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None):
        """Cross-entropy of the classifier on x_t ~ p_0t(x_t | x_0), t ~ U(eps, T). Returns (loss, acc)."""
        t = self.eps + (self.sde.T - self.eps) * torch.rand(x0.shape[0], generator=generator, device=x0.device,
                                                             dtype=x0.dtype)
        mean, std = self.sde.marginal_prob(x0, t)
        x_t = mean + bcast(std, x0) * randn_like(x0, generator)
        logits = self(x_t, t)
        _check_labels(y, logits.shape[1])
        loss = F.cross_entropy(logits, y.long())
        acc = (logits.argmax(dim=-1) == y).float().mean()
        return loss, acc

    def on_fit_start(self) -> None:
        """Refuse a DataModule whose labels the classifier cannot learn (cross-entropy would stop on the
        first batch with "Target -1 is out of bounds")."""
        data = getattr(self.trainer, "datamodule", None)
        if data is None or not hasattr(data, "num_classes"):
            return
        name = getattr(data, "dataset_id", type(data).__name__)
        if data.num_classes is None:
            raise ValueError(f"the data {name!r} has no class labels (y = -1): a noisy classifier needs a labelled "
                             "dataset (e.g. data=digits, or a toy with labels: gaussian_mixture, two_moons, rings)")
        out = getattr(self.classifier, "num_classes", None)
        if out is not None and int(out) != int(data.num_classes):
            raise ValueError(f"the classifier has num_classes={out} outputs but the data {name!r} has "
                             f"{data.num_classes} classes: build it with num_classes={data.num_classes}")

    def training_step(self, batch, batch_idx):
        loss, acc = self.noisy_loss(*self._unpack(batch), generator=self.generator)
        self.log_dict({"train/loss": loss, "train/acc": acc}, prog_bar=True, on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = self._unpack(batch)
        g = torch.Generator(device=x.device)
        g.manual_seed(rank_seed(batch_idx, self.global_rank))  # fixed noise: comparable, training RNG untouched
        loss, acc = self.noisy_loss(x, y, generator=g)
        self.log_dict({"val/loss": loss, "val/acc": acc}, prog_bar=True, sync_dist=True)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """RNG / loop state (``TrainingStateMixin``), the run's configs (``config``: ``sgm_config``, which
        ``train_classifier.py`` checks on resume) and which SDE the classifier was trained for."""
        super().on_save_checkpoint(checkpoint)
        if checkpoint.get("sgm_config") is None:  # built outside train_classifier.py: no configs to store
            checkpoint.pop("sgm_config", None)
        checkpoint.pop("train_loss_interval", None)
        checkpoint["sde"] = {"class": type(self.sde).__name__, "hparams": self.sde.hparams()}

    def configure_optimizers(self):
        return torch.optim.AdamW(self.classifier.parameters(), lr=self.hparams.lr,
                                 weight_decay=self.hparams.weight_decay)


def _check_labels(y: torch.Tensor, k: int) -> None:
    """Class labels of a K-class classifier: integers in 0..K-1 (cross_entropy's 'Target -1 is out of
    bounds' named neither the labels nor the classes; y.long() truncated float labels silently)."""
    if y.dtype.is_floating_point or y.dtype == torch.bool or y.is_complex():
        raise ValueError(f"class labels y must be integers, got dtype {y.dtype}: pass the class indices "
                         f"0..{k - 1} (a LongTensor)")
    if y.numel() and bool(((y < 0) | (y >= k)).any()):
        lo, hi = int(y.min()), int(y.max())
        fix = ("unlabelled examples (y = -1) cannot train a classifier: use labelled data" if lo < 0 else
               f"build the classifier with num_classes={hi + 1}")
        raise ValueError(f"class labels y must lie in 0..{k - 1} (the classifier's {k} classes), got values in "
                         f"[{lo}, {hi}]; {fix}")


def load_classifier_checkpoint(path: str, map_location: str | torch.device = "cpu") -> NoisyClassifierModule:
    """Rebuild a ``NoisyClassifierModule`` (eval mode) from a ``train_classifier.py`` checkpoint alone (read
    with ``weights_only=True``; the network and SDE from the configs stored in its hyper-parameters)."""
    from hydra.utils import instantiate

    from sgm_lightning.training.checkpoint import CheckpointError, load_checkpoint
    ckpt = load_checkpoint(path, map_location=map_location)
    hp = dict(ckpt.get("hyper_parameters") or {})
    config = hp.get("config") or {}
    if not all(k in config for k in ("net", "sde")) or "loss" in config or "label" not in hp:  # loss: a score model
        raise CheckpointError(f"{path} is not a noisy-classifier checkpoint (its hyper-parameters hold no classifier "
                              "net / sde config): pass one written by python train_classifier.py")
    module = NoisyClassifierModule(instantiate(config["net"]), instantiate(config["sde"]), **hp)
    module.load_state_dict(ckpt["state_dict"])
    return module.to(map_location if not isinstance(map_location, dict) else "cpu").eval()
