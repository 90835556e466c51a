"""Time-conditioned U-Net of the DDPM / DDPM++ / NCSN++ family.

Architecture (Ho et al. 2020, App. B; Song et al. 2021, App. H "DDPM++"):

* a 3x3 input convolution, then ``len(channel_mults)`` resolution levels on the way down, each with
  ``num_res_blocks`` residual blocks (+ self-attention at ``attn_resolutions``) and a 2x downsampling
  between levels; a middle ResBlock-Attention-ResBlock; the mirrored way up with
  ``num_res_blocks + 1`` residual blocks per level that consume the stored skip activations; a
  GroupNorm-SiLU-3x3 output convolution.
* residual blocks: GroupNorm -> SiLU -> conv -> GroupNorm modulated by the embedding
  (h <- h (1 + gamma) + beta, "scale-shift"/FiLM, Perez et al. 2018; Dhariwal & Nichol 2021,
  "AdaGN") -> SiLU -> dropout -> conv; the output is (skip(x) + h) / sqrt(2) when
  ``skip_rescale`` (Song et al. 2021, App. H.1, "rescale skip connections by 1/sqrt(2)").
* self-attention over the H*W positions with ``torch.nn.functional.scaled_dot_product_attention``.
* the last convolution of every residual branch, the attention output projection and the output
  convolution are zero-initialised (Ho et al. 2020; Goyal et al. 2017), so a fresh U-Net outputs 0.

The embedding is the time/noise label embedding (``TimeEmbedding``), plus a learned class
embedding (``LabelEmbedding``, with a null class for classifier-free guidance) when ``num_classes``.
With ``cond_channels > 0`` the network also takes an image condition ``x_cond`` (B, cond_channels,
H, W) concatenated to x along channels before the input convolution (SR3, Saharia et al. 2022:
the bicubic-upsampled low-resolution image). The network is called
``net(x, label, y=None, x_cond=None)`` and never sees the SDE.
"""

from __future__ import annotations

import math
import warnings
from typing import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from sgm_lightning.nets.embeddings import LabelEmbedding, TimeEmbedding, embed_conditions
from sgm_lightning.utils import check_choice, check_int

_INV_SQRT2 = 1.0 / math.sqrt(2.0)
CONDITIONING = ("scale_shift", "add")  # how residual blocks take the time / class embedding


class GroupNorm(nn.GroupNorm):
    """GroupNorm computed in float32 whose output keeps the input's dtype.

    Under CUDA autocast ``group_norm`` runs in float32 and returns float32, so the SiLU, the
    scale-shift and the dropout after it would run in float32 too, and the next convolution would cast
    back: twice the memory traffic of the bf16 / fp16 path in the eager step. Normalizing in float32
    and casting the result to the input's dtype keeps the statistics exact and the rest of the block
    in half precision (the same casts as before: one in, one out). In float32 training both casts are
    no-ops and the result equals ``nn.GroupNorm``'s bitwise; a float64 network (``.double()``)
    normalizes in float64, a bf16 / fp16 one (``.to(torch.bfloat16)``) in float32; parameters and
    state-dict keys are ``nn.GroupNorm``'s."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # float32 input: autocast keeps group_norm in float32 (CUDA's policy; CPU has none for it).
        # At least float32: a float64 network normalizes in float64, and the affine parameters are cast
        # to that dtype (group_norm refuses bf16 / fp16 parameters with a float32 input).
        # (casts only where the dtype differs: a no-op .to() is still a dispatcher call on the hot path)
        dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32  # promote(x, float32)
        weight, bias = (p if p is None or p.dtype == dtype else p.to(dtype) for p in (self.weight, self.bias))
        y = F.group_norm(x if x.dtype == dtype else x.to(dtype), self.num_groups, weight, bias, self.eps)
        return y if y.dtype == x.dtype else y.to(x.dtype)


def group_norm(channels: int, num_groups: int) -> GroupNorm:
    """GroupNorm (Wu & He 2018) with gcd(num_groups, channels) groups: 32 groups for wide layers,
    automatically fewer (always a divisor of ``channels``) for narrow ones."""
    return GroupNorm(math.gcd(num_groups, channels), channels, eps=1e-6)


def zero_init(module: nn.Module) -> nn.Module:
    """Zero the weight and bias of ``module`` (Ho et al. 2020: residual branches start at identity)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """Residual block conditioned on the embedding e.

    h = conv0(SiLU(GN(x))); with ``conditioning="scale_shift"`` (ADM / DDPM++ style)
    h = GN(h) (1 + gamma(e)) + beta(e), with ``"add"`` (DDPM, Ho et al. 2020) h = GN(h + proj(e));
    h = conv1(dropout(SiLU(h))); out = skip(x) + h, divided by sqrt(2) when ``skip_rescale``.
    ``e`` is passed already activated.
    """

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, dropout: float = 0.0,
                 num_groups: int = 32, skip_rescale: bool = True, conditioning: str = "scale_shift"):
        super().__init__()
        check_choice("conditioning", conditioning, CONDITIONING)
        self.scale_shift = conditioning == "scale_shift"
        self.norm0 = group_norm(in_channels, num_groups)
        self.conv0 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, (2 if self.scale_shift else 1) * out_channels)
        self.norm1 = group_norm(out_channels, num_groups)
        if not self.scale_shift and self.norm1.num_groups == out_channels:
            raise ValueError(f"conditioning='add' with {out_channels} channels in {out_channels} GroupNorm groups: "
                             "each group is one channel, whose mean GroupNorm subtracts, so the added embedding "
                             "would vanish. Use num_groups smaller than the channel count, or "
                             "conditioning='scale_shift'")
        self.dropout = nn.Dropout(dropout)
        self.conv1 = zero_init(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()
        self.skip_rescale = skip_rescale

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv0(F.silu(self.norm0(x)))
        if self.scale_shift:
            gamma, beta = rearrange(self.emb_proj(emb), "b (two c) -> two b c 1 1", two=2)
            h = self.norm1(h) * (1 + gamma) + beta
        else:
            h = self.norm1(h + self.emb_proj(emb)[:, :, None, None])
        h = self.conv1(self.dropout(F.silu(h)))
        out = self.skip(x) + h
        return out * _INV_SQRT2 if self.skip_rescale else out


class AttnBlock(nn.Module):
    """Multi-head self-attention over spatial positions (Vaswani et al. 2017; Ho et al. 2020).

    q, k, v = 1x1 conv of GN(x); h = softmax(q k^T / sqrt(d)) v per head; out = x + proj(h)
    (divided by sqrt(2) when ``skip_rescale``, as in NCSN++'s AttnBlockpp).
    """

    def __init__(self, channels: int, num_heads: int = 1, num_groups: int = 32, skip_rescale: bool = True):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"attention_heads={num_heads} must divide the channel count {channels} of every "
                             "attention block; choose attention_heads among the divisors of base_channels * mult")
        self.num_heads = num_heads
        self.norm = group_norm(channels, num_groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = zero_init(nn.Conv2d(channels, channels, 1))
        self.skip_rescale = skip_rescale

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        height = x.shape[2]
        q, k, v = rearrange(self.qkv(self.norm(x)), "b (three n d) h w -> three b n (h w) d",
                            three=3, n=self.num_heads)
        h = F.scaled_dot_product_attention(q.contiguous(), k.contiguous(), v.contiguous())
        h = self.proj(rearrange(h, "b n (h w) d -> b (n d) h w", h=height))
        out = x + h
        return out * _INV_SQRT2 if self.skip_rescale else out


class Downsample(nn.Module):
    """2x downsampling: stride-2 3x3 conv (``with_conv``) or 2x2 average pooling (Ho et al. 2020)."""

    def __init__(self, channels: int, with_conv: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if with_conv else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(x) if self.conv is not None else F.avg_pool2d(x, 2)


class Upsample(nn.Module):
    """2x nearest-neighbour upsampling, followed by a 3x3 conv when ``with_conv`` (Ho et al. 2020)."""

    def __init__(self, channels: int, with_conv: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1) if with_conv else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.conv is not None else x


class EmbSequential(nn.ModuleList):
    """Blocks applied in order, each called as ``block(h, emb)``."""

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for block in self:
            h = block(h, emb)
        return h


def _int_tuple(name: str, values, allow_empty: bool) -> tuple[int, ...]:
    """``values`` (list, tuple, Hydra ListConfig, ...) as a tuple of positive ints, else ValueError."""
    if isinstance(values, (int, str)) or not hasattr(values, "__iter__") or (not allow_empty and not len(values)):
        raise ValueError(f"{name} must be a {'' if allow_empty else 'non-empty '}sequence of positive integers, "
                         f"got {values!r}")
    return tuple(check_int(f"{name}[{i}]", v) for i, v in enumerate(values))


class UNetEncoder(nn.Module):
    """Input conv + the U-Net's way down + middle block (shared by ``UNet`` and ``NoisyClassifier``).

    ``forward(x, emb) -> (h, skips)``: h is the middle block's output (B, C_mid, r, r) and
    ``skips`` the list of activations stored for the skip connections (outermost first).
    ``skip_channels`` lists their channel counts, ``resolutions`` the side length per level.
    """

    def __init__(self, in_channels: int, image_size: int, base_channels: int, channel_mults: Sequence[int],
                 num_res_blocks: int, attn_resolutions: Sequence[int], dropout: float, emb_dim: int,
                 num_groups: int = 32, resample_with_conv: bool = True, skip_rescale: bool = True,
                 attention_heads: int = 1, conditioning: str = "scale_shift"):
        super().__init__()
        # check_int accepts integral floats (4.0 from YAML): keep its int, the layers need one
        in_channels, image_size, base_channels, num_res_blocks, num_groups, attention_heads = (
            check_int(name, value) for name, value in (
                ("in_channels", in_channels), ("image_size", image_size), ("base_channels", base_channels),
                ("num_res_blocks", num_res_blocks), ("num_groups", num_groups), ("attention_heads", attention_heads)))
        mults = _int_tuple("channel_mults", channel_mults, allow_empty=False)
        attn = _int_tuple("attn_resolutions", attn_resolutions, allow_empty=True)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout!r}")
        factor = 2 ** (len(mults) - 1)
        if image_size % factor:
            raise ValueError(f"image_size={image_size} must be divisible by 2^(len(channel_mults)-1) = {factor} "
                             f"for channel_mults={mults}; use fewer channel_mults or pad/resize the images to a "
                             f"multiple of {factor}")
        self.channel_mults, self.attn_resolutions = mults, attn
        self.resolutions = tuple(image_size // 2**i for i in range(len(mults)))
        unused = sorted(set(attn) - set(self.resolutions))
        if unused:
            warnings.warn(f"attn_resolutions {unused} do not occur in this U-Net (resolutions {self.resolutions}); "
                          "no attention is applied there", stacklevel=3)
        block_kw = dict(emb_dim=emb_dim, dropout=dropout, num_groups=num_groups, skip_rescale=skip_rescale,
                        conditioning=conditioning)
        attn_kw = dict(num_heads=attention_heads, num_groups=num_groups, skip_rescale=skip_rescale)

        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        self.down = nn.ModuleList()
        self.skip_channels = [base_channels]
        ch = base_channels
        for level, mult in enumerate(mults):
            for _ in range(num_res_blocks):
                blocks = [ResBlock(ch, base_channels * mult, **block_kw)]
                ch = base_channels * mult
                if self.resolutions[level] in attn:
                    blocks.append(AttnBlock(ch, **attn_kw))
                self.down.append(EmbSequential(blocks))
                self.skip_channels.append(ch)
            if level != len(mults) - 1:
                self.down.append(EmbSequential([Downsample(ch, resample_with_conv)]))
                self.skip_channels.append(ch)
        self.mid = EmbSequential([ResBlock(ch, ch, **block_kw), AttnBlock(ch, **attn_kw),
                                  ResBlock(ch, ch, **block_kw)])
        self.out_channels = ch

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        h = self.conv_in(x)
        skips = [h]
        for stage in self.down:
            h = stage(h, emb)
            skips.append(h)
        return self.mid(h, emb), skips


def check_image(x: torch.Tensor, in_channels: int, image_size: int) -> None:
    """Raise a ValueError unless x has shape (B, in_channels, image_size, image_size)."""
    if x.ndim != 4 or x.shape[1] != in_channels or tuple(x.shape[2:]) != (image_size, image_size):
        raise ValueError(f"expected input of shape (B, {in_channels}, {image_size}, {image_size}) "
                         f"(in_channels={in_channels}, image_size={image_size}), got {tuple(x.shape)}")


class UNet(nn.Module):
    """DDPM++-style time-(and class-)conditioned U-Net (Ho et al. 2020; Song et al. 2021, App. H).

    Args:
        in_channels: image channels C.
        out_channels: output channels (default ``in_channels``; the output is shaped like x).
        image_size: side length of the (square) images; must be divisible by 2^(len(channel_mults)-1).
        base_channels: channels of the first level; level i has base_channels * channel_mults[i].
        channel_mults: channel multiplier per resolution level.
        num_res_blocks: residual blocks per level on the way down (one more on the way up).
        attn_resolutions: side lengths at which self-attention follows each residual block.
        dropout: dropout probability inside residual blocks, in [0, 1).
        embedding: "sinusoidal" (DDPM, label 999 t) or "fourier" (NCSN++, label log sigma).
        fourier_scale: scale of the Fourier frequencies (``embedding="fourier"``).
        num_classes: number of classes for class conditioning (None: unconditional).
        num_groups: GroupNorm groups (reduced to gcd(num_groups, channels) for narrow layers).
        resample_with_conv: convolutional (True) or parameter-free (False) up/downsampling.
        skip_rescale: divide residual sums by sqrt(2) (DDPM++).
        attention_heads: heads of every attention block (must divide its channels).
        cond_channels: channels of an image condition concatenated to x (0: none; SR3 uses C).
        conditioning: how residual blocks take the embedding: "scale_shift" (GN(h)(1 + gamma) + beta,
            ADM / DDPM++) or "add" (GN(h + proj(e)), DDPM's network: ``configs/net/ddpm_cifar10.yaml``).

    ``forward(x, label, y=None, x_cond=None)``: x (B, C, H, W), label (B,) float, y (B,) LongTensor of
    classes (-1 or num_classes = null label; y=None = unconditional), x_cond (B, cond_channels, H, W)
    (required when cond_channels > 0). Returns a tensor shaped like x.
    """

    def __init__(self, in_channels: int = 3, out_channels: int | None = None, image_size: int = 32,
                 base_channels: int = 128, channel_mults: Sequence[int] = (1, 2, 2, 2), num_res_blocks: int = 2,
                 attn_resolutions: Sequence[int] = (16,), dropout: float = 0.1, embedding: str = "sinusoidal",
                 fourier_scale: float = 16.0, num_classes: int | None = None, num_groups: int = 32,
                 resample_with_conv: bool = True, skip_rescale: bool = True, attention_heads: int = 1,
                 cond_channels: int = 0, conditioning: str = "scale_shift"):
        super().__init__()
        in_channels, image_size, num_res_blocks, num_groups, attention_heads = (
            check_int(name, value) for name, value in (
                ("in_channels", in_channels), ("image_size", image_size), ("num_res_blocks", num_res_blocks),
                ("num_groups", num_groups), ("attention_heads", attention_heads)))
        out_channels = in_channels if out_channels is None else check_int("out_channels", out_channels)
        self.cond_channels = check_int("cond_channels", cond_channels, min=0)
        check_choice("embedding", embedding, ("sinusoidal", "fourier"))
        if num_classes is not None:
            num_classes = check_int("num_classes", num_classes)
        base_channels = check_int("base_channels", base_channels)
        if base_channels % 2:
            raise ValueError(f"base_channels must be even (it sizes the sin/cos time features), got {base_channels}")
        self.in_channels, self.out_channels, self.image_size = in_channels, out_channels, image_size
        self.num_classes = num_classes
        emb_dim = 4 * base_channels
        self.time_embed = TimeEmbedding(base_channels, kind=embedding, fourier_scale=fourier_scale, out_dim=emb_dim)
        self.label_embed = LabelEmbedding(num_classes, emb_dim) if num_classes is not None else None
        self.encoder = UNetEncoder(in_channels + self.cond_channels, image_size, base_channels, channel_mults,
                                   num_res_blocks, attn_resolutions, dropout, emb_dim, num_groups,
                                   resample_with_conv, skip_rescale, attention_heads, conditioning)
        mults, attn = self.encoder.channel_mults, self.encoder.attn_resolutions
        self._hparams = dict(in_channels=in_channels, out_channels=out_channels, image_size=image_size,
                             base_channels=base_channels, channel_mults=mults, num_res_blocks=num_res_blocks,
                             attn_resolutions=attn, dropout=dropout, embedding=embedding,
                             fourier_scale=fourier_scale, num_classes=num_classes, num_groups=num_groups,
                             resample_with_conv=resample_with_conv, skip_rescale=skip_rescale,
                             attention_heads=attention_heads, cond_channels=self.cond_channels,
                             conditioning=conditioning)
        block_kw = dict(emb_dim=emb_dim, dropout=dropout, num_groups=num_groups, skip_rescale=skip_rescale,
                        conditioning=conditioning)
        attn_kw = dict(num_heads=attention_heads, num_groups=num_groups, skip_rescale=skip_rescale)
        skips = list(self.encoder.skip_channels)
        ch = self.encoder.out_channels
        self.up = nn.ModuleList()
        for level in reversed(range(len(mults))):
            for _ in range(num_res_blocks + 1):
                blocks = [ResBlock(ch + skips.pop(), base_channels * mults[level], **block_kw)]
                ch = base_channels * mults[level]
                if self.encoder.resolutions[level] in attn:
                    blocks.append(AttnBlock(ch, **attn_kw))
                self.up.append(EmbSequential(blocks))
            if level != 0:
                self.up.append(Upsample(ch, resample_with_conv))
        self.norm_out = group_norm(ch, num_groups)
        self.conv_out = zero_init(nn.Conv2d(ch, out_channels, 3, padding=1))

    def hparams(self) -> dict:
        """Constructor keyword arguments (for logging and checkpoints)."""
        return dict(self._hparams)

    def embed(self, x: torch.Tensor, label: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """SiLU(time embedding + class embedding), (B, 4 * base_channels)."""
        return embed_conditions(self.time_embed, self.label_embed, label, x, y)

    def forward(self, x: torch.Tensor, label: torch.Tensor, y: torch.Tensor | None = None,
                x_cond: torch.Tensor | None = None) -> torch.Tensor:
        check_image(x, self.in_channels, self.image_size)
        emb = self.embed(x, label, y)
        if self.cond_channels:
            if x_cond is None:
                raise ValueError(f"this U-Net has cond_channels={self.cond_channels}: pass the image condition x_cond")
            check_image(x_cond, self.cond_channels, self.image_size)
            x = torch.cat([x, x_cond.to(x.dtype)], dim=1)
        elif x_cond is not None:
            raise ValueError("an image condition x_cond was given but the network has cond_channels=0; "
                             "build it with cond_channels=C for SR3-style conditioning")
        h, skips = self.encoder(x, emb)
        for stage in self.up:
            if isinstance(stage, EmbSequential):  # residual stages consume one skip activation each
                h = torch.cat([h, skips.pop()], dim=1)
            h = stage(h, emb)
        return self.conv_out(F.silu(self.norm_out(h)))
