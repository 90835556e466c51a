"""Low-dimensional toy distributions for score-matching experiments (Song & Ermon 2019, Fig. 2 style).

All sets are drawn with a ``torch.Generator`` seeded with ``seed``, so a seed gives the same points.
``two_moons``, ``swiss_roll``, ``checkerboard`` and ``rings`` are standardised (per-dimension mean 0,
one overall scale so that the average per-dimension variance is 1, which keeps their shape);
``gaussian_mixture`` is used exactly as specified so that :meth:`ToyDataModule.analytic` returns its
true density (score and log-density of every diffused marginal in closed form). Labels: the
mixture component, the moon or the ring of each point; ``-1`` for swiss roll and checkerboard.
``data_range`` does not apply to toy data (points are not rescaled to it).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from sgm_lightning.analytic import GaussianMixture
from sgm_lightning.training.data.base import NO_LABEL, BaseDataModule, LabelledTensorDataset
from sgm_lightning.utils import check_int

TOY_NAMES = ("gaussian_mixture", "two_moons", "swiss_roll", "checkerboard", "rings")


def _standardise(x: torch.Tensor) -> torch.Tensor:
    x = x - x.mean(0)
    return x / x.pow(2).mean().sqrt()


def two_moons(n: int, noise: float, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Two interleaved half circles: upper (cos a, sin a) and lower (1 - cos a, 1/2 - sin a), a ~ U(0, pi)."""
    y = torch.randint(0, 2, (n,), generator=g)
    a = torch.rand(n, generator=g, dtype=torch.float64) * math.pi
    upper = torch.stack([a.cos(), a.sin()], 1)
    lower = torch.stack([1 - a.cos(), 0.5 - a.sin()], 1)
    x = torch.where(y[:, None] == 0, upper, lower)
    return x + noise * torch.randn(n, 2, generator=g, dtype=torch.float64), y


def swiss_roll(n: int, noise: float, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """2-D swiss roll (t cos t, t sin t) with t = 1.5 pi (1 + 2u), u ~ U(0, 1)."""
    t = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=g, dtype=torch.float64))
    x = torch.stack([t * t.cos(), t * t.sin()], 1) / 5.0
    return x + noise * torch.randn(n, 2, generator=g, dtype=torch.float64), torch.full((n,), NO_LABEL)


def checkerboard(n: int, noise: float, g: torch.Generator, cells: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform on the black squares of a ``cells`` x ``cells`` board on [-cells/2, cells/2]^2."""
    col = torch.randint(0, cells, (n,), generator=g)
    row = 2 * torch.randint(0, cells // 2, (n,), generator=g) + (col % 2)  # black squares: row - col even
    u = torch.rand(n, 2, generator=g, dtype=torch.float64)
    x = torch.stack([col + u[:, 0], row + u[:, 1]], 1) - cells / 2
    return x + noise * torch.randn(n, 2, generator=g, dtype=torch.float64), torch.full((n,), NO_LABEL)


def rings(n: int, noise: float, g: torch.Generator, num_rings: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Concentric circles of radii 1..num_rings, points split in proportion to the circumference."""
    radii = torch.arange(1, num_rings + 1, dtype=torch.float64)
    y = torch.multinomial(radii / radii.sum(), n, replacement=True, generator=g)
    a = 2 * math.pi * torch.rand(n, generator=g, dtype=torch.float64)
    x = radii[y, None] * torch.stack([a.cos(), a.sin()], 1)
    return x + noise * torch.randn(n, 2, generator=g, dtype=torch.float64), y


def default_mixture_means(k: int = 8, radius: float = 2.0) -> list[list[float]]:
    """``k`` means evenly spaced on a circle of ``radius`` (the classic 8-Gaussians toy)."""
    return [[radius * math.cos(2 * math.pi * i / k), radius * math.sin(2 * math.pi * i / k)] for i in range(k)]


class ToyDataModule(BaseDataModule):
    """A 2-D (or, for ``gaussian_mixture``, D-dimensional) toy dataset as a LightningDataModule.

    Args:
        name: one of ``TOY_NAMES``.
        n_samples: number of points drawn (before the validation split).
        noise: std of the Gaussian jitter of the non-mixture toys (before standardisation).
        weights: mixture weights (K,) of ``gaussian_mixture`` (default: uniform).
        means: (K, D) component means of ``gaussian_mixture`` (default: 8 points on a circle of radius 2).
        std: component standard deviation, a scalar or (K,) values (isotropic components).
        loader_options: batch_size (default 256), num_workers, pin_memory, persistent_workers, seed,
            val_fraction (default 0.05), data_range, val_batch_size of
            :class:`~sgm_lightning.training.data.base.BaseDataModule`.
    """

    def __init__(
        self,
        *,
        name: str = "gaussian_mixture",
        n_samples: int = 10000,
        noise: float = 0.05,
        weights: Sequence[float] | None = None,
        means: Sequence[Sequence[float]] | None = None,
        std: float | Sequence[float] = 0.2,
        **loader_options,
    ):
        super().__init__(**{"batch_size": 256, "val_fraction": 0.05, **loader_options})
        self.save_hyperparameters(logger=False)
        if name not in TOY_NAMES:
            raise ValueError(f"name={name!r} is not a toy dataset; allowed values: {', '.join(TOY_NAMES)}")
        check_int("n_samples", n_samples)
        if not noise >= 0:
            raise ValueError(f"noise must be >= 0, got {noise!r}")
        self.name, self.n_samples, self.noise = name, int(n_samples), float(noise)
        self._mixture: GaussianMixture | None = None
        if name == "gaussian_mixture":
            mu = torch.as_tensor(means if means is not None else default_mixture_means(), dtype=torch.float64)
            if mu.ndim != 2:
                raise ValueError(f"means must be a (K, D) list of component means, got shape {tuple(mu.shape)}")
            w = torch.as_tensor(weights, dtype=torch.float64) if weights is not None else torch.ones(mu.shape[0])
            s = torch.as_tensor(std, dtype=torch.float64)
            if (s <= 0).any() or s.ndim > 1 or (s.ndim == 1 and s.shape[0] != mu.shape[0]):
                raise ValueError(f"std must be a positive scalar or {mu.shape[0]} positive values, got {std!r}")
            self._mixture = GaussianMixture(w, mu, s**2)
            self.data_shape = (mu.shape[1],)
            self.num_classes = mu.shape[0]
            spec = f"k{mu.shape[0]}-d{mu.shape[1]}"
        else:
            self.data_shape = (2,)
            self.num_classes = {"two_moons": 2, "rings": 4}.get(name)
            spec = f"noise{self.noise:g}"
        self.dataset_id = f"toy_{name}-{spec}-n{self.n_samples}-seed{self.seed}"

    def analytic(self) -> GaussianMixture:
        """The exact data distribution (only for ``name="gaussian_mixture"``)."""
        if self._mixture is None:
            raise ValueError(f"analytic() needs name='gaussian_mixture', this toy is name={self.name!r}")
        return self._mixture

    def generate(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All ``n_samples`` points (float32, (n, D)) and labels (int64, (n,)), deterministic in ``seed``."""
        g = torch.Generator()
        g.manual_seed(self.seed)
        if self._mixture is not None:
            x, y = self._mixture.sample(self.n_samples, generator=g, return_labels=True)
        else:
            make = {"two_moons": two_moons, "swiss_roll": swiss_roll, "checkerboard": checkerboard, "rings": rings}
            x, y = make[self.name](self.n_samples, self.noise, g)
            x = _standardise(x)
        return x.to(torch.float32), y.to(torch.long)

    def _load(self):
        return self._split(LabelledTensorDataset(*self.generate()))
