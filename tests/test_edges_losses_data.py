"""Edge cases of the losses, parametrizations, networks and data modules found by a held-out-check
audit (each test failed before its fix)."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from torch import nn

from sgm_lightning.nets import NoisyClassifier, UNet


# ------------------------------------------------------------------------------------------ networks
def test_group_norm_in_a_float64_or_bf16_network():
    """``net.double()`` normalizes in float64 (bitwise ``nn.GroupNorm``), ``net.to(bfloat16)`` in float32;
    both used to fail with "mixed dtype (CPU): expect parameter to have scalar type of Float"."""
    from sgm_lightning.nets.unet import GroupNorm
    torch.manual_seed(0)
    norm, reference = GroupNorm(4, 16, eps=1e-6), nn.GroupNorm(4, 16, eps=1e-6)
    nn.init.normal_(norm.weight), nn.init.normal_(norm.bias)
    reference.load_state_dict(norm.state_dict())
    x = torch.randn(2, 16, 5, 5, dtype=torch.float64) * 3 + 1
    assert torch.equal(norm.double()(x), reference.double()(x))
    xb = x.to(torch.bfloat16)
    out = norm.to(torch.bfloat16)(xb)
    want = nn.functional.group_norm(xb.float(), 4, norm.weight.float(), norm.bias.float(), 1e-6).to(torch.bfloat16)
    assert out.dtype == torch.bfloat16 and torch.equal(out, want)


def test_float64_unet_and_classifier_match_float32():
    kw = dict(base_channels=8, channel_mults=(1, 2), num_res_blocks=1, attn_resolutions=(3,), dropout=0.0,
              num_groups=4)
    torch.manual_seed(0)
    net = UNet(in_channels=1, image_size=6, num_classes=3, **kw)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x, label, y = torch.randn(1, 1, 6, 6), torch.tensor([321.0]), torch.tensor([2])
    out32 = net(x, label, y=y)
    out64 = net.double()(x.double(), label.double(), y=y)
    assert out64.dtype == torch.float64 and out64.shape == (1, 1, 6, 6)
    torch.testing.assert_close(out64.float(), out32, rtol=1e-4, atol=1e-5)
    clf = NoisyClassifier(in_channels=1, image_size=6, num_classes=3, **kw).double()
    assert clf(x.double(), label.double()).dtype == torch.float64


def test_networks_accept_the_integral_floats_their_checks_accept():
    """``check_int`` lets 8.0 (YAML) through, but the constructors passed the float on to the layers:
    "TypeError: empty(): argument 'size' ..."; the same network must come out as with ints."""
    from sgm_lightning.nets import MLPClassifier, MLPScoreNet, NoiseFreeMLP
    cases = [(UNet, dict(in_channels=1, image_size=8, base_channels=8, channel_mults=(1, 2), num_res_blocks=1,
                         attn_resolutions=(4,), num_groups=4, num_classes=3, out_channels=1, attention_heads=2)),
             (NoisyClassifier, dict(in_channels=1, image_size=8, num_classes=3, base_channels=8, channel_mults=(1,),
                                    num_res_blocks=1, num_groups=4, attn_resolutions=())),
             (MLPScoreNet, dict(dim=2, hidden_dim=8, num_layers=2, embedding_dim=8, num_classes=2)),
             (NoiseFreeMLP, dict(dim=2, hidden_dim=8, num_layers=2)),
             (MLPClassifier, dict(dim=2, num_classes=2, hidden_dim=8, num_layers=2, embedding_dim=8))]
    for cls, kw in cases:
        ints = {k: v for k, v in kw.items() if isinstance(v, int)}
        torch.manual_seed(0)
        a = cls(**kw)
        torch.manual_seed(0)
        b = cls(**{**kw, **{k: float(v) for k, v in ints.items()}})
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), cls.__name__
        assert a.hparams() == b.hparams() and all(type(b.hparams()[k]) is int for k in ints), cls.__name__
    with pytest.raises(ValueError, match="in_channels must be a positive integer"):  # named out_channels before
        UNet(in_channels=0, image_size=8)


# ---------------------------------------------------------------------------------- parametrization
class _Affine(nn.Module):
    def forward(self, x, label, **cond):
        return 0.7 * x + 1e-3 * label.reshape(-1, *[1] * (x.ndim - 1))


@pytest.mark.parametrize("prediction", ["eps", "score", "x0", "v", "edm"])
def test_python_number_and_integer_times_keep_float64_precision(prediction):
    """t given as a Python number or an integer tensor is taken in x's dtype: with float64 data the
    result is bitwise that of a float64 (B,) time (it was computed in float32: errors up to 4e-5)."""
    from sgm_lightning.parametrization import ScoreModel
    from sgm_lightning.sde import VESDE, VPSDE
    x = torch.randn(3, 2, 1, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for sde in (VPSDE(), VESDE()):
        model = ScoreModel(_Affine(), sde, prediction)
        for t, value in ((0.1, 0.1), (1, 1.0), (torch.tensor([1, 1, 1]), 1.0)):
            ref = model.outputs(x, torch.full((3,), value, dtype=torch.float64))
            got = model.outputs(x, t)
            assert all(torch.equal(a, b) for a, b in zip(got, ref)), (type(sde).__name__, t)
        eps = torch.randn_like(x)
        assert torch.equal(model.target(x, eps, 0.1), model.target(x, eps, torch.full((3,), 0.1, dtype=torch.float64)))


# ------------------------------------------------------------------------------------------- losses
def test_ncsn_ladder_outside_the_sdes_range_is_refused():
    """A level the SDE cannot reach used to be clipped silently (``loss.sigmas`` said 100, the loss used 50)."""
    from sgm_lightning.losses import NCSNLoss
    from sgm_lightning.sde import VESDE, VPSDE
    ve = VESDE(sigma_min=0.01, sigma_max=50.0)
    for sde, kw in ((ve, dict(sigma_max=100.0)), (ve, dict(sigma_min=1e-3)), (VPSDE(), dict(sigma_max=1e3))):
        with pytest.raises(ValueError, match=r"range .*choose sigma_min and sigma_max"):
            NCSNLoss(sde, **kw)
    loss = NCSNLoss(ve, sigma_min=0.05, sigma_max=50.0, num_scales=4)  # inside the range: exact levels
    torch.testing.assert_close(ve.noise_to_signal(loss.times), loss.sigmas, rtol=1e-12, atol=0.0)


def test_importance_sampling_grid_needs_two_points():
    """grid_size=1 made the tabulated normaliser 0 and the loss ~1e-16 whatever the network."""
    from sgm_lightning.losses import DSMLoss
    from sgm_lightning.sde import VPSDE
    with pytest.raises(ValueError, match="grid_size must be an integer >= 2"):
        DSMLoss(VPSDE(), weighting="likelihood", importance_sampling=True, grid_size=1)


# ---------------------------------------------------------------------------------------------- data
def test_image_folder_16_bit_and_grey_alpha_images(tmp_path):
    """16-bit grey PNGs (Pillow mode I;16) were clipped to white by convert("L"); grey + alpha (LA)
    images were detected as RGB."""
    from PIL import Image

    from sgm_lightning.training.data.hub import HFImageDataModule, pil_to_tensor
    rng = np.random.default_rng(0)
    wide = rng.integers(0, 65536, (6, 6), dtype=np.uint16)
    grey = rng.integers(0, 256, (6, 6), dtype=np.uint8)
    for name, image in (("wide", Image.fromarray(wide)), ("la", Image.fromarray(np.stack([grey, grey // 2], -1), "LA"))):
        (tmp_path / name).mkdir()
        image.save(tmp_path / name / "0.png")
        assert Image.open(tmp_path / name / "0.png").mode == ("I;16" if name == "wide" else "LA")
    dm = HFImageDataModule(name="imagefolder", root=str(tmp_path / "wide"), batch_size=1, cache_dir=str(tmp_path / "c"))
    assert dm.data_shape == (1, 6, 6)
    dm.setup()
    torch.testing.assert_close(dm.train_dataset[0][0][0], torch.from_numpy(wide / 65535.0 * 2 - 1).float())
    x = pil_to_tensor(Image.fromarray(wide), channels=3, image_size=3, center_crop=False)
    # bicubic 6 -> 3 in float32, clamped to [0, 1], grey in every channel
    assert x.shape == (3, 3, 3) and x.min() >= 0 and x.max() <= 1 and torch.equal(x[0], x[2])
    torch.testing.assert_close(x[0].mean(), torch.tensor(wide.mean() / 65535.0, dtype=torch.float32), atol=0.05, rtol=0)
    la = HFImageDataModule(name="imagefolder", root=str(tmp_path / "la"), batch_size=1, cache_dir=str(tmp_path / "c"))
    assert la.data_shape == (1, 6, 6)
    la.setup()
    torch.testing.assert_close(la.train_dataset[0][0][0], torch.from_numpy(grey / 255.0 * 2 - 1).float())


def test_parquet_folder(tmp_path, monkeypatch):
    """name=parquet root=DIR reads DIR's Parquet files (it used to run load_dataset("parquet") on the
    working directory and fail on the repository's files)."""
    import datasets
    from PIL import Image

    from sgm_lightning.training.data.hub import HFImageDataModule
    rng = np.random.default_rng(1)
    pixels = [rng.integers(0, 256, (4, 4), dtype=np.uint8) for _ in range(6)]
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=3)})
    ds = datasets.Dataset.from_dict({"image": [Image.fromarray(p) for p in pixels], "label": [i % 3 for i in range(6)]},
                                    features=feats)
    (tmp_path / "pq").mkdir()
    ds.to_parquet(str(tmp_path / "pq" / "train.parquet"))
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "notes.txt").write_text("not a parquet file")
    monkeypatch.chdir(tmp_path / "elsewhere")
    dm = HFImageDataModule(name="parquet", root=str(tmp_path / "pq"), batch_size=2, cache_dir=str(tmp_path / "c"))
    assert dm.data_shape == (1, 4, 4) and dm.num_classes == 3
    dm.setup()
    x, y = dm.train_dataset[4]
    assert torch.equal(x[0], torch.as_tensor(pixels[4], dtype=torch.float32) / 255 * 2 - 1) and y == 1
    with pytest.raises(ValueError, match="needs root=DIR"):
        HFImageDataModule(name="parquet", batch_size=2)
    with pytest.raises(ValueError, match=r"no parquet files \(\.parquet\)"):
        HFImageDataModule(name="parquet", root=str(tmp_path / "elsewhere"), batch_size=2).setup()


def test_map_datamodule_numpy_uint8_palette_and_16_bit_items():
    """Every item kind lands in data_range: numpy float arrays used to skip ``input_range`` (kept in [0, 1]),
    uint8 tensors / arrays were read as [0, 1] values (-> [-1, 509]), palette images gave palette indices
    and 16-bit images their low bytes."""
    from PIL import Image

    from sgm_lightning.training.data.hub import MapDataModule
    rng = np.random.default_rng(2)
    rgb = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    wide = rng.integers(0, 65536, (4, 4), dtype=np.uint16)
    chw = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255  # the intended image in [0, 1]
    items = {
        "numpy float": (chw.numpy(), chw),
        "numpy uint8": (rgb.transpose(2, 0, 1).copy(), chw),
        "tensor uint8": (torch.from_numpy(rgb).permute(2, 0, 1).contiguous(), chw),
        "palette": (Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=256), None),
        "16 bit": (Image.fromarray(wide), torch.from_numpy(wide / 65535.0).float()[None]),
    }
    for name, (item, want) in items.items():
        dm = MapDataModule(dataset=[(item, 0)] * 2, batch_size=2)
        dm.setup()
        x, _ = dm.train_dataset[0]
        if name == "palette":
            want = torch.from_numpy(np.array(item.convert("RGB"))).permute(2, 0, 1).float() / 255
        assert x.dtype == torch.float32 and dm.data_shape == tuple(want.shape), name
        torch.testing.assert_close(x, want * 2 - 1, rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("name, classes, match", [("swiss_roll", 2, "no class labels"),
                                                  ("rings", 2, "build it with num_classes=4")])
def test_noisy_classifier_refuses_data_it_cannot_learn(name, classes, match):
    """Unlabelled data (y = -1) or more classes than outputs used to stop with "Target -1 is out of bounds"."""
    import lightning as L

    from sgm_lightning.nets import MLPClassifier
    from sgm_lightning.sde import VPSDE
    from sgm_lightning.training.data import ToyDataModule
    from sgm_lightning.training.lit_classifier import NoisyClassifierModule
    module = NoisyClassifierModule(MLPClassifier(dim=2, num_classes=classes, hidden_dim=8, num_layers=1), VPSDE())
    trainer = L.Trainer(max_steps=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, accelerator="cpu", use_distributed_sampler=False)
    with pytest.raises(ValueError, match=match):
        trainer.fit(module, datamodule=ToyDataModule(name=name, n_samples=64, batch_size=16))


def test_validation_batch_not_divisible_by_world_size_names_val_batch_size():
    """The error named batch_size (already fine here) instead of val_batch_size."""
    from types import SimpleNamespace

    from sgm_lightning.training.data import DigitsDataModule
    dm = DigitsDataModule(batch_size=8, val_batch_size=6, val_fraction=0.1)
    dm.trainer = SimpleNamespace(global_rank=0, world_size=4, current_epoch=0)
    assert len(dm.train_dataloader()) == int(1797 * 0.9 + 0.5) // 8
    with pytest.raises(ValueError, match=r"val_batch_size=6 \(global\) is not divisible by the world size 4: "
                                         r"use a multiple of 4, e.g. val_batch_size=4"):
        dm.val_dataloader()


def test_map_datamodule_dict_items():
    """Dict items (a Hugging Face Dataset's rows) stopped with "Could not infer dtype of dict"."""
    from PIL import Image

    from sgm_lightning.training.data.hub import MapDataModule
    grey = np.random.default_rng(3).integers(0, 256, (4, 4), dtype=np.uint8)
    rows = [{"image": Image.fromarray(grey), "label": i % 2} for i in range(4)]
    dm = MapDataModule(dataset=rows, batch_size=2, num_classes=2)
    dm.setup()
    x, y = dm.train_dataset[3]
    assert y == 1 and torch.equal(x[0], torch.from_numpy(grey).float() / 255 * 2 - 1)
    bare = MapDataModule(dataset=[{"x": torch.tensor([0.25, -3.0])}] * 2, batch_size=2, input_range=None)
    bare.setup()
    x, y = bare.train_dataset[0]
    assert bare.data_shape == (2,) and y == -1 and torch.equal(x, torch.tensor([0.25, -3.0]))
    with pytest.raises(ValueError, match=r"keys \['pixels'\] but none of 'x', 'img', 'image'"):
        MapDataModule(dataset=[{"pixels": torch.zeros(1, 2, 2)}] * 2, batch_size=2)


@pytest.mark.parametrize("bad", [dict(P_mean=float("nan")), dict(P_mean=float("inf")), dict(P_std=float("inf")),
                                 dict(sigma_data=float("inf"))])
def test_edm_loss_refuses_non_finite_settings(bad):
    """P_mean=nan was accepted and made every loss NaN."""
    from sgm_lightning.losses import EDMLoss
    from sgm_lightning.sde import VESDE
    with pytest.raises(ValueError, match=f"{list(bad)[0]} must be a finite number"):
        EDMLoss(VESDE(0.002, 80.0), **bad)


def test_noise_conditional_losses_refuse_integer_data():
    """Integer data stopped inside torch.randn ("normal_kernel_cpu not implemented for 'Long'")."""
    from sgm_lightning.losses import DDPMLoss, DSMLoss, EDMLoss, NCSNLoss
    from sgm_lightning.parametrization import ScoreModel
    from sgm_lightning.sde import VESDE
    sde = VESDE()
    model = ScoreModel(_Affine(), sde)
    for loss in (DSMLoss(sde), DDPMLoss(sde), NCSNLoss(sde), EDMLoss(sde)):
        with pytest.raises(ValueError, match=r"x0 must be a floating-point tensor, got dtype torch.int64"):
            loss(model, torch.ones(2, 3, dtype=torch.long))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gaussian_mixture_oracle_takes_cuda_inputs():
    """The oracle mixed its CPU parameters with CUDA inputs ("Expected all tensors to be on the same device")."""
    from sgm_lightning.analytic import GaussianMixture
    from sgm_lightning.sde import VPSDE
    gm = GaussianMixture([0.3, 0.7], [[0.0, 1.0], [2.0, -1.0]], [0.5, 1.5])
    x = gm.sample(8, generator=torch.Generator().manual_seed(0)).float()
    t = torch.full((8,), 0.3)
    for method in ("score", "log_prob", "responsibilities"):
        cpu, gpu = getattr(gm, method)(x, VPSDE(), t), getattr(gm, method)(x.cuda(), VPSDE(), t.cuda())
        assert gpu.device.type == "cuda" and torch.equal(gpu.cpu(), cpu), method
