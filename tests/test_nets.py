"""Tests of the networks layer: shapes, argument validation, conditioning, exact oracles, gradients."""

from __future__ import annotations

import math
import os

import pytest
import torch

from sgm_lightning.nets import (GaussianFourierFeatures, LabelEmbedding, MLPClassifier, MLPScoreNet, NoiseFreeMLP,
                                NoisyClassifier, TimeEmbedding, UNet, sinusoidal_embedding)
from sgm_lightning.nets.unet import AttnBlock, ResBlock, group_norm

# tiny configuration (8x8 images) so that the whole file runs in a few seconds on 2 CPU cores
SMALL = dict(base_channels=16, channel_mults=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0)


def perturb_(net: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
    """Add small Gaussian noise to every parameter (breaks the zero initialisation)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return net


def small_unet(**kw) -> UNet:
    args = dict(in_channels=1, image_size=8, **SMALL)
    args.update(kw)
    return UNet(**args)


# ------------------------------------------------------------------------------------------ shapes
@pytest.mark.parametrize("shape, kw", [
    ((3, 1, 8, 8), dict(channel_mults=(1, 2), attn_resolutions=(4,))),
    ((2, 3, 16, 16), dict(channel_mults=(1, 2, 2), attn_resolutions=(8,), embedding="fourier", attention_heads=2)),
    ((2, 1, 28, 28), dict(channel_mults=(1, 2, 2), attn_resolutions=(14,), resample_with_conv=False,
                          skip_rescale=False)),
    ((2, 2, 8, 8), dict(channel_mults=(1, 3), attn_resolutions=(), num_groups=4, num_classes=4)),
])
def test_unet_output_shape(shape, kw):
    args = dict(SMALL, **kw)
    net = perturb_(UNet(in_channels=shape[1], image_size=shape[2], **args))
    out = net(torch.randn(shape), torch.rand(shape[0]) * 999)
    assert out.shape == shape and torch.isfinite(out).all()


def test_unet_out_channels_and_fresh_output_is_zero():
    net = small_unet(out_channels=2)
    out = net(torch.randn(2, 1, 8, 8), torch.tensor([3.0, 700.0]))
    assert out.shape == (2, 2, 8, 8)
    assert torch.count_nonzero(out) == 0  # zero-initialised output conv (Ho et al. 2020)


def test_resblock_starts_as_scaled_identity():
    """Zero-initialised residual branch: ResBlock(x) = x / sqrt(2) at init when in == out channels."""
    block = ResBlock(16, 16, emb_dim=8, num_groups=4, skip_rescale=True)
    x = torch.randn(2, 16, 4, 4)
    torch.testing.assert_close(block(x, torch.randn(2, 8)), x / math.sqrt(2))


def test_unet_construction_errors():
    with pytest.raises(ValueError, match=r"image_size=28.*channel_mults"):
        UNet(in_channels=1, image_size=28, base_channels=16, channel_mults=(1, 2, 2, 2))
    bad = [dict(dropout=1.0), dict(dropout=-0.1), dict(embedding="learned"), dict(num_res_blocks=0),
           dict(channel_mults=()), dict(channel_mults=(1, 0)), dict(attention_heads=3), dict(num_classes=0),
           dict(base_channels=15), dict(fourier_scale=-1.0, embedding="fourier"), dict(attn_resolutions=8)]
    names = ["dropout", "dropout", "embedding", "num_res_blocks", "channel_mults", "channel_mults",
             "attention_heads", "num_classes", "base_channels", "fourier_scale", "attn_resolutions"]
    for kw, name in zip(bad, names):
        with pytest.raises(ValueError, match=name):
            small_unet(**kw)


def test_group_norm_auto_reduces_and_unused_attention_warns():
    assert [group_norm(c, 32).num_groups for c in (16, 32, 48, 256)] == [16, 32, 16, 32]
    with pytest.warns(UserWarning, match="attn_resolutions"):
        small_unet(attn_resolutions=(16,))  # an 8x8 U-Net has no 16x16 level


def test_unet_forward_errors():
    net = small_unet()
    with pytest.raises(ValueError, match="in_channels=1"):
        net(torch.randn(2, 3, 8, 8), torch.rand(2))
    with pytest.raises(ValueError, match="image_size=8"):
        net(torch.randn(2, 1, 16, 16), torch.rand(2))
    with pytest.raises(ValueError, match="label"):
        net(torch.randn(2, 1, 8, 8), torch.rand(3))
    with pytest.raises(ValueError, match="num_classes"):
        net(torch.randn(2, 1, 8, 8), torch.rand(2), y=torch.tensor([0, 1]))


# ------------------------------------------------------------------------------------ conditioning
@pytest.mark.parametrize("embedding, labels", [("sinusoidal", (10.0, 500.0)), ("fourier", (-2.0, 1.5))])
def test_time_conditioning_changes_output(embedding, labels):
    net = perturb_(small_unet(embedding=embedding)).eval()
    x = torch.randn(1, 1, 8, 8).expand(2, -1, -1, -1)
    out = net(x, torch.tensor(labels))
    assert (out[0] - out[1]).abs().max() > 1e-3 * out.abs().max()
    # a (B,) label equal across the batch gives identical rows (no cross-talk between examples)
    out_same = net(x, torch.tensor([labels[0], labels[0]]))
    torch.testing.assert_close(out_same[0], out_same[1])


def test_class_conditioning_and_null_label():
    net = perturb_(small_unet(num_classes=3)).eval()
    x = torch.randn(1, 1, 8, 8).expand(5, -1, -1, -1)
    out = net(x, torch.full((5,), 100.0), y=torch.tensor([0, 1, 3, -1, 2]))
    assert (out[0] - out[1]).abs().max() > 1e-3 * out.abs().max()
    torch.testing.assert_close(out[2], out[3])  # -1 and num_classes are both the null label
    out_none = net(x, torch.full((5,), 100.0))  # y=None: null label for the whole batch
    torch.testing.assert_close(out_none[0], out[2])
    with pytest.raises(ValueError, match="y must lie"):
        net(x, torch.full((5,), 100.0), y=torch.tensor([0, 1, 4, 0, 0]))
    with pytest.raises(ValueError, match="integer"):
        net(x, torch.full((5,), 100.0), y=torch.zeros(5))


def test_label_embedding_null_row():
    emb = LabelEmbedding(num_classes=4, dim=6)
    assert emb.null_label == 4
    out = emb(torch.tensor([-1, 4, 2]))
    torch.testing.assert_close(out[0], emb.table.weight[4])
    torch.testing.assert_close(out[1], emb.table.weight[4])
    torch.testing.assert_close(out[2], emb.table.weight[2])
    torch.testing.assert_close(emb(None, batch=2), emb.table.weight[[4, 4]])


# -------------------------------------------------------------------------------------- embeddings
def test_sinusoidal_embedding_closed_form():
    label = torch.tensor([0.0, 1.0, 999.0, -3.5])
    dim, half = 16, 8
    e = sinusoidal_embedding(label, dim)
    freqs = 10000.0 ** (-torch.arange(half, dtype=torch.float64) / half)
    expected = torch.cat([torch.sin(label.double()[:, None] * freqs), torch.cos(label.double()[:, None] * freqs)], 1)
    torch.testing.assert_close(e.double(), expected, atol=2e-4, rtol=0)  # float32 args up to 999
    with pytest.raises(ValueError, match="dim"):
        sinusoidal_embedding(label, 7)


def test_fourier_features_closed_form_and_buffer():
    torch.manual_seed(0)
    ff = GaussianFourierFeatures(64, scale=16.0)
    assert len(list(ff.parameters())) == 0 and "W" in ff.state_dict()  # fixed W, saved, not trained
    label = torch.tensor([0.3, -1.2])
    e = ff(label)
    torch.testing.assert_close(e[:, :32], torch.sin(2 * math.pi * label[:, None] * ff.W))
    torch.testing.assert_close((e**2).sum(1), torch.full((2,), 32.0))  # sin^2 + cos^2 = 1 per frequency
    # W ~ N(0, 16^2): with 32 draws, the sample std is within 16 * (1 +- 0.5) with overwhelming probability
    assert 8.0 < ff.W.std().item() < 24.0
    with pytest.raises(ValueError, match="embedding"):
        TimeEmbedding(8, kind="gaussian")


# ---------------------------------------------------------------------------------- exact oracles
def test_attention_matches_naive_softmax_attention():
    torch.manual_seed(1)
    block = perturb_(AttnBlock(8, num_heads=2, num_groups=4, skip_rescale=True), scale=0.3)
    x = torch.randn(2, 8, 3, 3)
    h = block.qkv(block.norm(x)).reshape(2, 3, 2, 4, 9)  # (b, qkv, head, d, positions)
    q, k, v = h[:, 0], h[:, 1], h[:, 2]
    attn = torch.softmax(torch.einsum("bndi,bndj->bnij", q, k) / math.sqrt(4), dim=-1)
    out = torch.einsum("bnij,bndj->bndi", attn, v).reshape(2, 8, 3, 3)
    expected = (x + block.proj(out)) / math.sqrt(2)
    torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=1e-5)


def test_channels_last_matches_contiguous():
    net = perturb_(small_unet(in_channels=3, num_classes=2, attention_heads=2)).eval()
    x = torch.randn(3, 3, 8, 8)
    label, y = torch.tensor([1.0, 400.0, 998.0]), torch.tensor([0, 1, -1])
    ref = net(x, label, y=y)
    net_cl = net.to(memory_format=torch.channels_last)
    out = net_cl(x.to(memory_format=torch.channels_last), label, y=y)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


def test_dropout_active_only_in_training():
    net = perturb_(small_unet(dropout=0.5))
    x, label = torch.randn(2, 1, 8, 8), torch.tensor([5.0, 50.0])
    net.train()
    assert not torch.allclose(net(x, label), net(x, label))
    net.eval()
    torch.testing.assert_close(net(x, label), net(x, label))


# --------------------------------------------------------------------------------------------- MLP
@pytest.mark.parametrize("shape, embedding", [((7, 2), "sinusoidal"), ((7, 1, 2, 2), "fourier")])
def test_mlp_score_net_shapes_and_conditioning(shape, embedding):
    dim = math.prod(shape[1:])
    net = MLPScoreNet(dim=dim, hidden_dim=32, num_layers=3, embedding_dim=16, embedding=embedding)
    x = torch.randn(1, *shape[1:]).expand(shape)
    out = net(x, torch.linspace(-2.0, 2.0, shape[0]))
    assert out.shape == shape
    assert (out[0] - out[-1]).abs().max() > 1e-4  # the label changes the output
    with pytest.raises(ValueError, match=f"dim={dim}"):
        net(torch.randn(3, dim + 1), torch.rand(3))


def test_mlp_class_conditioning_and_validation():
    net = MLPScoreNet(dim=2, hidden_dim=32, num_layers=2, embedding_dim=8, num_classes=2)
    x = torch.randn(1, 2).expand(4, 2)
    out = net(x, torch.ones(4), y=torch.tensor([0, 1, 2, -1]))
    assert (out[0] - out[1]).abs().max() > 1e-4
    torch.testing.assert_close(out[2], out[3])
    for kw, name in [(dict(num_layers=0), "num_layers"), (dict(activation="swishy"), "activation"),
                     (dict(embedding_dim=7), "embedding_dim"), (dict(embedding="x"), "embedding")]:
        with pytest.raises(ValueError, match=name):
            MLPScoreNet(**kw)


def test_noise_free_mlp():
    net = NoiseFreeMLP(dim=4, hidden_dim=16, num_layers=2)
    x = torch.randn(5, 2, 2, requires_grad=True)
    out = net(x)
    assert out.shape == x.shape
    # smooth (softplus) net: the Jacobian trace needed by implicit/sliced score matching is differentiable
    (jac,) = torch.autograd.grad(out[:, 0, 0].sum(), x, create_graph=True)
    jac[:, 0, 0].sum().backward()
    assert net.trunk.inp.weight.grad is not None and net.trunk.inp.weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------- classifiers
def test_classifiers_shapes_and_time_dependence():
    clf = perturb_(NoisyClassifier(in_channels=1, image_size=8, num_classes=5, **SMALL)).eval()
    x = torch.randn(1, 1, 8, 8).expand(2, -1, -1, -1)
    logits = clf(x, torch.tensor([10.0, 900.0]))
    assert logits.shape == (2, 5) and (logits[0] - logits[1]).abs().max() > 1e-4
    with pytest.raises(ValueError, match="image_size"):
        NoisyClassifier(in_channels=1, image_size=12, num_classes=5, channel_mults=(1, 2, 2, 2))
    mlp = MLPClassifier(dim=2, num_classes=3, hidden_dim=16, num_layers=2, embedding_dim=8)
    logits = mlp(torch.randn(1, 2).expand(2, 2), torch.tensor([0.0, 3.0]))
    assert logits.shape == (2, 3) and (logits[0] - logits[1]).abs().max() > 1e-4


# ------------------------------------------------------------------------------------ gradients, DDP
def _all_params_get_grad(net, out):
    loss = (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(3))).sum()
    net.zero_grad(set_to_none=True)
    loss.backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"parameters without gradient: {missing}"


@pytest.mark.parametrize("make, inputs", [
    (lambda: small_unet(num_classes=3, embedding="fourier"),
     lambda: (torch.randn(2, 1, 8, 8), torch.tensor([-1.0, 2.0]), torch.tensor([0, 3]))),
    (lambda: NoisyClassifier(in_channels=1, image_size=8, num_classes=4, **SMALL),
     lambda: (torch.randn(2, 1, 8, 8), torch.tensor([3.0, 300.0]))),
    (lambda: MLPScoreNet(dim=2, hidden_dim=16, num_layers=3, embedding_dim=8, num_classes=2),
     lambda: (torch.randn(4, 2), torch.rand(4), torch.tensor([0, 1, 2, 1]))),
    (lambda: MLPClassifier(dim=2, num_classes=3, hidden_dim=16, num_layers=2, embedding_dim=8),
     lambda: (torch.randn(4, 2), torch.rand(4))),
    (lambda: NoiseFreeMLP(dim=2, hidden_dim=16, num_layers=2), lambda: (torch.randn(4, 2),)),
])
def test_every_parameter_receives_gradient(make, inputs):
    torch.manual_seed(0)
    net = perturb_(make())
    args = inputs()
    out = net(*args[:2], y=args[2]) if len(args) == 3 else net(*args)
    _all_params_get_grad(net, out)


# ------------------------------------------------------------------------------------ size, seeding
def test_cifar10_ddpmpp_parameter_count():
    with torch.device("meta"):
        net = UNet(in_channels=3, image_size=32, base_channels=128, channel_mults=(1, 2, 2, 2), num_res_blocks=2,
                   attn_resolutions=(16,))
    n = sum(p.numel() for p in net.parameters())
    # DDPM's CIFAR-10 model has 35.7M parameters (Ho et al. 2020, Table 1 caption); scale-shift
    # conditioning adds one (emb_dim x C) projection per residual block (about 2.6M).
    assert 35e6 < n < 40e6, n


def test_same_seed_same_init_and_hparams_round_trip():
    torch.manual_seed(123)
    a = small_unet(embedding="fourier", num_classes=2)
    torch.manual_seed(123)
    b = UNet(**a.hparams())
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    torch.manual_seed(124)
    c = small_unet(embedding="fourier", num_classes=2)
    assert not torch.equal(sa["time_embed.fourier.W"], c.state_dict()["time_embed.fourier.W"])


def test_float64_forward():
    net = perturb_(MLPScoreNet(dim=2, hidden_dim=16, num_layers=2, embedding_dim=8)).double()
    out = net(torch.randn(3, 2, dtype=torch.float64), torch.rand(3, dtype=torch.float64))
    assert out.dtype == torch.float64


def test_group_norm_normalizes_in_float32_and_keeps_the_input_dtype():
    """fp32: bitwise nn.GroupNorm (same state-dict keys, so older checkpoints load); half precision
    under autocast: the float32 result rounded to the input dtype (not float32, which would make the
    SiLU / scale-shift after it run in float32 under CUDA autocast); channels-last kept; gradients flow."""
    from sgm_lightning.nets.unet import GroupNorm
    torch.manual_seed(0)
    norm, reference = GroupNorm(4, 16, eps=1e-6), torch.nn.GroupNorm(4, 16, eps=1e-6)
    torch.nn.init.normal_(norm.weight), torch.nn.init.normal_(norm.bias)
    reference.load_state_dict(norm.state_dict())
    x = (torch.randn(2, 16, 8, 8) * 3 + 1).requires_grad_()
    assert torch.equal(norm(x), reference(x))
    for dtype in (torch.bfloat16, torch.float16):
        xh = x.detach().to(dtype)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = norm(xh)
        assert out.dtype == dtype and torch.equal(out, reference(xh.float()).to(dtype))
    x_cl = x.detach().contiguous(memory_format=torch.channels_last)
    assert norm(x_cl).is_contiguous(memory_format=torch.channels_last)
    norm(x).square().sum().backward()
    assert x.grad is not None and norm.weight.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_group_norm_output_stays_bf16_under_cuda_autocast():
    from sgm_lightning.nets.unet import GroupNorm
    norm = GroupNorm(8, 32).cuda()
    x = torch.randn(4, 32, 16, 16, device="cuda", dtype=torch.bfloat16)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = norm(x)
        plain = torch.nn.functional.group_norm(x, 8, norm.weight, norm.bias, norm.eps)
    assert out.dtype == torch.bfloat16 and plain.dtype == torch.float32  # what autocast alone gives
    torch.testing.assert_close(out.float(), plain, atol=1e-2, rtol=1e-2)


def test_additive_conditioning_is_ddpms_block_and_network_size():
    """conditioning="add": h = GN(conv0(SiLU(GN(x))) + proj(e)) (Ho et al. 2020), checked against the
    formula; the embedding still conditions the output; configs/net/ddpm_cifar10.yaml has DDPM's
    35.7M parameters (35,746,307), the scale-shift variant 38,307,203."""
    import torch.nn.functional as F
    from hydra.utils import instantiate
    from omegaconf import OmegaConf
    torch.manual_seed(0)
    block = ResBlock(8, 16, emb_dim=12, num_groups=4, skip_rescale=False, conditioning="add")
    torch.nn.init.normal_(block.conv1.weight, std=0.1)
    x, e = torch.randn(2, 8, 6, 6), torch.randn(2, 12)
    h = block.conv0(F.silu(block.norm0(x)))
    h = block.conv1(F.silu(block.norm1(h + block.emb_proj(e)[:, :, None, None])))
    torch.testing.assert_close(block(x, e), block.skip(x) + h)
    assert block.emb_proj.out_features == 16  # one bias per channel, not a (scale, shift) pair
    net = perturb_(small_unet(conditioning="add", num_groups=4)).eval()
    xs = torch.randn(1, 1, 8, 8).expand(2, -1, -1, -1)
    out = net(xs, torch.tensor([10.0, 900.0]))
    assert (out[0] - out[1]).abs().max() > 1e-3 * out.abs().max()
    cfg = OmegaConf.load(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                      "configs", "net", "ddpm_cifar10.yaml"))
    cfg.in_channels, cfg.image_size = 3, 32
    ddpm = instantiate(cfg)
    assert sum(p.numel() for p in ddpm.parameters()) == 35_746_307
    cfg.conditioning = "scale_shift"
    assert sum(p.numel() for p in instantiate(cfg).parameters()) == 38_307_203
    with pytest.raises(ValueError, match="conditioning"):
        small_unet(conditioning="film")
    with pytest.raises(ValueError, match="one channel.*would vanish"):  # 16 channels in 16 groups
        small_unet(conditioning="add")
