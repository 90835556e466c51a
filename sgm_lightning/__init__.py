"""sgm_lightning: score-based generative models (score matching and diffusion) on PyTorch Lightning.

Importing the package has no side effects: submodules are imported explicitly, e.g.
``from sgm_lightning import sde, sampling``.
"""

__version__ = "0.1.0"
