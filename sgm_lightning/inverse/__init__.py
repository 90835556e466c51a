"""Inverse problems with score-based priors: measurement operators and posterior samplers.

``operators`` (A, A^T, pseudo-inverse) and ``solvers`` (DPS, replacement, RePaint) import only torch.
Image-restoration runs with PSNR/SSIM live in ``sgm_lightning.evaluation.inverse_tasks``.
"""

from sgm_lightning.inverse.operators import (AvgPoolDownsample, BoxInpainting, GaussianBlur, Grayscale,
                                             HalfInpainting, Inpainting, LinearOperator, MatrixOperator,
                                             RandomInpainting)
from sgm_lightning.inverse.solvers import dps_sample, repaint_sample, repaint_schedule, replacement_sample

__all__ = ["LinearOperator", "Inpainting", "BoxInpainting", "RandomInpainting", "HalfInpainting", "Grayscale",
           "AvgPoolDownsample", "GaussianBlur", "MatrixOperator", "dps_sample", "replacement_sample",
           "repaint_sample", "repaint_schedule"]

