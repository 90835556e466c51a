"""Networks layer (imports torch and einops only; knows nothing of SDEs, Lightning or Hydra).

Every score network is called ``net(x, label, y=None)``: x (B, ...) data, ``label`` a (B,) float
time/noise label chosen by ``parametrization.ScoreModel`` (999 t, log sigma, log(sigma) / 4, ...),
``y`` an optional LongTensor (B,) of class labels (-1 or num_classes = null label for
classifier-free guidance). It returns a tensor shaped like x. Classifiers for classifier guidance
are called ``clf(x, label)`` and return logits (B, num_classes).
"""

from sgm_lightning.nets.classifier import MLPClassifier, NoisyClassifier
from sgm_lightning.nets.embeddings import GaussianFourierFeatures, LabelEmbedding, TimeEmbedding, sinusoidal_embedding
from sgm_lightning.nets.mlp import MLPScoreNet, NoiseFreeMLP
from sgm_lightning.nets.unet import UNet

__all__ = ["UNet", "MLPScoreNet", "NoiseFreeMLP", "NoisyClassifier", "MLPClassifier", "TimeEmbedding",
           "LabelEmbedding", "GaussianFourierFeatures", "sinusoidal_embedding"]
