"""Inverse problems with score-based priors: measurement operators and posterior samplers.

``operators`` and ``solvers`` are math-layer modules; ``tasks`` (image restoration with PSNR/SSIM
from torchmetrics) is loaded lazily on first access to ``run_inverse_task`` / ``make_task_grid``,
so importing this package pulls in nothing beyond torch.
"""

from sgm_lightning.inverse.operators import (AvgPoolDownsample, BoxInpainting, GaussianBlur, Grayscale,
                                             HalfInpainting, Inpainting, LinearOperator, MatrixOperator,
                                             RandomInpainting)
from sgm_lightning.inverse.solvers import dps_sample, repaint_sample, repaint_schedule, replacement_sample

__all__ = ["LinearOperator", "Inpainting", "BoxInpainting", "RandomInpainting", "HalfInpainting", "Grayscale",
           "AvgPoolDownsample", "GaussianBlur", "MatrixOperator", "dps_sample", "replacement_sample",
           "repaint_sample", "repaint_schedule", "run_inverse_task", "make_task_grid"]


def __getattr__(name):
    if name in ("run_inverse_task", "make_task_grid", "make_operator", "image_metrics"):
        from sgm_lightning.inverse import tasks

        return getattr(tasks, name)
    raise AttributeError(f"module 'sgm_lightning.inverse' has no attribute {name!r}")
