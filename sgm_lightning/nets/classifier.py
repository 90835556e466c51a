"""Noise-conditional classifiers p_phi(y | x_t, t) for classifier guidance.

Classifier guidance adds s * grad_x log p_phi(y | x_t, t) to the unconditional score
(Song et al. 2021, Eq. 14 and App. I; Dhariwal & Nichol 2021, Alg. 1); the classifier must be
trained on noisy inputs x_t at every noise level, so it takes the same time/noise ``label`` as the
score network. Both classifiers return logits (B, num_classes); the guidance code (math layer)
takes log_softmax and differentiates.

* ``NoisyClassifier`` -- the U-Net's way down + middle block (``nets.unet.UNetEncoder``, the same
  blocks as the score network), GroupNorm-SiLU, global average pooling and a linear head
  (Dhariwal & Nichol 2021, Sec. 4 / App. "classifier architecture", with mean instead of attention pooling).
* ``MLPClassifier`` -- the shared MLP trunk (``nets.mlp.ConditionedMLP``) for (B, D) toy data.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from sgm_lightning.nets.embeddings import TimeEmbedding, check_even, check_label
from sgm_lightning.nets.mlp import ConditionedMLP, flatten_check
from sgm_lightning.nets.unet import UNetEncoder, check_image, group_norm
from sgm_lightning.utils import check_choice, check_int


class NoisyClassifier(nn.Module):
    """Time-conditioned image classifier ``clf(x, label) -> logits`` (B, num_classes).

    Args mirror ``UNet``: in_channels, image_size, base_channels, channel_mults, num_res_blocks,
    attn_resolutions, dropout, embedding, fourier_scale, num_groups, resample_with_conv,
    skip_rescale, attention_heads; plus num_classes (size of the output).
    """

    def __init__(self, in_channels: int = 3, image_size: int = 32, num_classes: int = 10, base_channels: int = 64,
                 channel_mults: Sequence[int] = (1, 2, 2, 2), num_res_blocks: int = 2,
                 attn_resolutions: Sequence[int] = (16,), dropout: float = 0.0, embedding: str = "sinusoidal",
                 fourier_scale: float = 16.0, num_groups: int = 32, resample_with_conv: bool = True,
                 skip_rescale: bool = True, attention_heads: int = 1):
        super().__init__()
        in_channels, image_size, num_classes, base_channels, num_res_blocks, num_groups, attention_heads = (
            check_int(name, value) for name, value in (
                ("in_channels", in_channels), ("image_size", image_size), ("num_classes", num_classes),
                ("base_channels", base_channels), ("num_res_blocks", num_res_blocks), ("num_groups", num_groups),
                ("attention_heads", attention_heads)))
        check_choice("embedding", embedding, ("sinusoidal", "fourier"))
        if base_channels % 2:
            raise ValueError(f"base_channels must be even (it sizes the sin/cos time features), got {base_channels}")
        self.in_channels, self.image_size, self.num_classes = in_channels, image_size, num_classes
        emb_dim = 4 * base_channels
        self.time_embed = TimeEmbedding(base_channels, kind=embedding, fourier_scale=fourier_scale, out_dim=emb_dim)
        self.encoder = UNetEncoder(in_channels, image_size, base_channels, channel_mults, num_res_blocks,
                                   attn_resolutions, dropout, emb_dim, num_groups, resample_with_conv,
                                   skip_rescale, attention_heads)
        self._hparams = dict(in_channels=in_channels, image_size=image_size, num_classes=num_classes,
                             base_channels=base_channels, channel_mults=self.encoder.channel_mults,
                             num_res_blocks=num_res_blocks, attn_resolutions=self.encoder.attn_resolutions,
                             dropout=dropout, embedding=embedding, fourier_scale=fourier_scale,
                             num_groups=num_groups, resample_with_conv=resample_with_conv,
                             skip_rescale=skip_rescale, attention_heads=attention_heads)
        ch = self.encoder.out_channels
        self.norm_out = group_norm(ch, num_groups)
        self.head = nn.Linear(ch, num_classes)

    def hparams(self) -> dict:
        """Constructor keyword arguments (for logging and checkpoints)."""
        return dict(self._hparams)

    def forward(self, x: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        check_image(x, self.in_channels, self.image_size)
        emb = F.silu(self.time_embed(check_label(label, x)))
        h, _ = self.encoder(x, emb)
        h = F.silu(self.norm_out(h)).mean(dim=(2, 3))
        return self.head(h)


class MLPClassifier(nn.Module):
    """Time-conditioned MLP classifier ``clf(x, label) -> logits`` (B, num_classes) for (B, D) data.

    Args:
        dim: data dimension D = prod(x.shape[1:]).
        num_classes: number of classes.
        hidden_dim, num_layers: width and number of hidden layers.
        embedding_dim, embedding, fourier_scale: label features (see ``nets.embeddings``).
        activation: one of ``nets.mlp.ACTIVATIONS``.
    """

    def __init__(self, dim: int = 2, num_classes: int = 2, hidden_dim: int = 256, num_layers: int = 3,
                 embedding_dim: int = 64, embedding: str = "sinusoidal", fourier_scale: float = 16.0,
                 activation: str = "silu"):
        super().__init__()
        dim, num_classes, hidden_dim, num_layers = (
            check_int(name, value) for name, value in (("dim", dim), ("num_classes", num_classes),
                                                       ("hidden_dim", hidden_dim), ("num_layers", num_layers)))
        embedding_dim = check_even("embedding_dim", embedding_dim)
        self._hparams = dict(dim=dim, num_classes=num_classes, hidden_dim=hidden_dim, num_layers=num_layers,
                             embedding_dim=embedding_dim, embedding=embedding, fourier_scale=fourier_scale,
                             activation=activation)
        self.dim, self.num_classes = dim, num_classes
        self.time_embed = TimeEmbedding(embedding_dim, kind=embedding, fourier_scale=fourier_scale, out_dim=hidden_dim)
        self.trunk = ConditionedMLP(dim, num_classes, hidden_dim, num_layers, hidden_dim, activation)

    def hparams(self) -> dict:
        """Constructor keyword arguments (for logging and checkpoints)."""
        return dict(self._hparams)

    def forward(self, x: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        emb = F.silu(self.time_embed(check_label(label, x)))
        return self.trunk(flatten_check(x, self.dim), emb)
