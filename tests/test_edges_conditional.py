"""Edge cases of conditional generation (held-out-check audit): classifier guidance, classifier-free
guidance and SR3's degradation / conditional sampler / data wrapper on inputs the other tests do not
use (labels outside the classifier's classes, integral-float factors, un-batched images, a ``device``
option, a base data module of vectors)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sgm_lightning.analytic import GaussianMixture
from sgm_lightning.guidance import cfg_score_fn, classifier_guidance_score_fn, classifier_log_prob_grad
from sgm_lightning.inverse.sr3 import downsample, sr3_condition, sr3_sample
from sgm_lightning.sde import VPSDE

MEANS = torch.tensor([[-2.0, 0.0], [2.0, 1.0]], dtype=torch.float64)
MIX = GaussianMixture([0.7, 0.3], MEANS, [0.25, 0.25])


def exact_classifier(sde):
    """Logits log p(k | x_t) of the mixture's two components (the exact noisy classifier)."""
    return lambda x, t: torch.log(MIX.responsibilities(x, sde, t))


# ----------------------------------------------------------------------------- classifier guidance
@pytest.mark.parametrize("y", [2, -1, torch.tensor([0, 1, 2, 0])])
def test_classifier_guidance_label_outside_the_classes_names_y(y):
    """y = 2 for a 2-class classifier failed in torch.gather ('index 2 is out of bounds for dimension 1
    with size 2'), naming neither y nor the classes (and a device-side assert on CUDA); -1 (the null
    label of classifier-free guidance) is no class of a classifier either."""
    sde = VPSDE()
    x, t = torch.randn(4, 2, dtype=torch.float64), torch.full((4,), 0.5, dtype=torch.float64)
    fn = classifier_guidance_score_fn(MIX.score_fn(sde), exact_classifier(sde), y, scale=2.0)
    with pytest.raises(ValueError, match=r"y \(class labels\) must lie in 0\.\.1, the 2 classes"):
        fn(x, t)
    # in range, at scale 2 the guided score is s + 2 (s_k - s) with s_k the component's exact score
    s, s1 = MIX.score(x, sde, t), GaussianMixture([1.0], MEANS[1:], [0.25]).score(x, sde, t)
    got = classifier_guidance_score_fn(MIX.score_fn(sde), exact_classifier(sde), 1, scale=2.0)(x, t)
    torch.testing.assert_close(got, s + 2.0 * (s1 - s), rtol=1e-8, atol=1e-8)
    with pytest.raises(ValueError, match="must lie in 0..1"):
        classifier_log_prob_grad(exact_classifier(sde), x, t, torch.tensor([0, 1, 1, 5]))


# ----------------------------------------------------------------------------- classifier-free guidance
class _Net(torch.nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.num_classes = num_classes


class _CondModel:
    """A class-conditional model whose network has ``num_classes`` classes (null label = num_classes)."""

    def __init__(self, num_classes):
        self.net = _Net(num_classes)

    def score(self, x, t, y):
        return -x + y[:, None].to(x.dtype)


def test_cfg_null_label_must_be_the_networks_null_class():
    """null_label=9 for a 10-class network (the last class, not the null one) guided away from class 9
    instead of from the unconditional score, silently; a network without classes failed only at the
    first sampler step."""
    model = _CondModel(10)
    for bad in (9, 11):
        with pytest.raises(ValueError, match="null_label=10"):
            cfg_score_fn(model, 3, scale=2.0, null_label=bad)
    with pytest.raises(ValueError, match="not class-conditional"):
        cfg_score_fn(_CondModel(None), 3, scale=2.0, null_label=10)
    x, t = torch.randn(3, 2), torch.rand(3)
    want = model.score(x, t, torch.full((3,), 10)) + 2.0 * (model.score(x, t, torch.full((3,), 3))
                                                             - model.score(x, t, torch.full((3,), 10)))
    torch.testing.assert_close(cfg_score_fn(model, 3, scale=2.0, null_label=10)(x, t), want)


# ----------------------------------------------------------------------------- SR3 helpers
def test_integral_float_factor_is_the_integer_factor():
    """factor=2.0 (a YAML / JSON number) passed the integer check but failed in avg_pool2d ('kernel_size
    must be tuple of ints, not float') and in the antialiased modes (a float output size)."""
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    for mode in ("area", "bilinear", "bicubic"):
        assert torch.equal(downsample(x, 2.0, mode), downsample(x, 2, mode))
    torch.testing.assert_close(sr3_condition(x, 2.0), F.interpolate(F.avg_pool2d(x, 2), size=(8, 8), mode="bicubic"))


@pytest.mark.parametrize("shape", [(1, 8, 8), (8, 8), (1, 2, 1, 8, 8)])
def test_sr3_condition_of_an_unbatched_image_names_the_shape(shape):
    """A (C, H, W) image failed in F.interpolate ('Input and output must have the same number of spatial
    dimensions ... spatial dimensions of [4]'), an (H, W) one with an IndexError."""
    with pytest.raises(ValueError, match=r"\(B, C, H, W\).*x\[None\]"):
        sr3_condition(torch.rand(*shape), 2)


def test_sr3_condition_of_integer_images_names_the_dtype():
    with pytest.raises(ValueError, match="floating-point"):
        sr3_condition(torch.randint(0, 255, (2, 1, 8, 8), dtype=torch.uint8), 2)


class _CondScore:
    """score(x, t, x_cond) = x_cond - x: a score model with an image condition (no network)."""

    def score(self, x, t, x_cond):
        return x_cond - x


def test_sr3_sample_takes_the_device_option():
    """device= (an option common to all samplers) was a TypeError: 'sample() got multiple values for
    keyword argument device'. The device of x_cond is used; another one is refused with the fix."""
    sde, c = VPSDE(), torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    a = sr3_sample(_CondScore(), sde, c, "ddpm", steps=3, generator=torch.Generator().manual_seed(1), device="cpu")
    b = sr3_sample(_CondScore(), sde, c, "ddpm", steps=3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.samples, b.samples) and a.nfe == 3
    with pytest.raises(ValueError, match=r"x_cond\.to"):
        sr3_sample(_CondScore(), sde, c, "ddpm", steps=3, device="meta")


# ----------------------------------------------------------------------------- SR3 data
def test_superres_data_module_errors_name_the_fix():
    """factor=3 on 8x8 digits said the factor must divide the size but not which would; a base of 2-D
    points was told the same (it is no image data); factor=2.0 gave the dataset id 'sr2.0x'."""
    from sgm_lightning.training.data.embedded import DigitsDataModule
    from sgm_lightning.training.data.superres import SuperResDataModule
    from sgm_lightning.training.data.toy import ToyDataModule
    base = DigitsDataModule(batch_size=8, image_size=8)
    with pytest.raises(ValueError, match=r"factor=3 must divide the image size 8x8.*factor=2 or 4"):
        SuperResDataModule(base=base, factor=3)
    with pytest.raises(ValueError, match=r"images \(C, H, W\).*shape \(2,\)"):
        SuperResDataModule(base=ToyDataModule(name="two_moons", n_samples=16, batch_size=8), factor=2)
    dm = SuperResDataModule(base=base, factor=2.0)
    assert dm.factor == 2 and dm.dataset_id == SuperResDataModule(base=base, factor=2).dataset_id


# ----------------------------------------------------------------------------- noisy classifier training
def _fit_classifier(root, steps, ckpt_path=None, val_every=None):
    import lightning as L

    from sgm_lightning.nets.classifier import MLPClassifier
    from sgm_lightning.training.data.toy import ToyDataModule
    from sgm_lightning.training.lit_classifier import NoisyClassifierModule
    L.seed_everything(0, verbose=False)
    torch.manual_seed(0)
    module = NoisyClassifierModule(MLPClassifier(dim=2, num_classes=2, hidden_dim=16, num_layers=2), VPSDE(), lr=1e-2)
    data = ToyDataModule(name="two_moons", n_samples=64, batch_size=16, val_fraction=0.25, seed=0)  # 3 batches / epoch
    trainer = L.Trainer(max_steps=steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu", default_root_dir=root, num_sanity_val_steps=0,
                        val_check_interval=val_every or 1.0, limit_val_batches=1 if val_every else 0,
                        callbacks=[L.pytorch.callbacks.ModelCheckpoint(dirpath=root, save_last=True)])
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path, weights_only=True)
    return module, trainer, data


@pytest.mark.parametrize("stop", [2, 4])  # mid-epoch, after an epoch boundary
def test_noisy_classifier_resume_is_bitwise_exact(tmp_path, stop):
    """The classifier drew its training noise from the global RNG, which checkpoints do not hold: a
    resumed fit trained on other noise than the uninterrupted one."""
    full, _, _ = _fit_classifier(tmp_path / "full", 6)
    _fit_classifier(tmp_path / "part", stop)
    resumed, _, _ = _fit_classifier(tmp_path / "part", 6, ckpt_path=str(tmp_path / "part" / "last.ckpt"))
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_noisy_classifier_validation_is_fixed_noise_and_leaves_training_alone(tmp_path):
    """Validation drew fresh noise from the global RNG: the same weights got another val/loss at every
    evaluation, and validating changed the training noise of every later step."""
    quiet, _, _ = _fit_classifier(tmp_path / "a", 4)
    module, trainer, data = _fit_classifier(tmp_path / "b", 4, val_every=2)
    for (name, a), b in zip(quiet.state_dict().items(), module.state_dict().values()):
        assert torch.equal(a, b), name
    first = trainer.validate(module, datamodule=data, verbose=False)[0]["val/loss"]
    assert trainer.validate(module, datamodule=data, verbose=False)[0]["val/loss"] == first


@pytest.mark.parametrize("y, match", [([0.7, 1.2], "integers"), ([0, -1], r"0\.\.1.*\[-1, 0\]"),
                                      ([2, 0], r"0\.\.1.*\[0, 2\]")])
def test_noisy_classifier_refuses_labels_it_cannot_learn(y, match):
    """Float labels were truncated to classes silently (y.long()); labels outside the classes, from a
    plain DataLoader (the data-module check of on_fit_start does not see it), failed in cross_entropy
    with 'Target -1 is out of bounds' (a device assert on CUDA)."""
    from sgm_lightning.nets.classifier import MLPClassifier
    from sgm_lightning.training.lit_classifier import NoisyClassifierModule
    module = NoisyClassifierModule(MLPClassifier(dim=2, num_classes=2, hidden_dim=8, num_layers=1), VPSDE())
    with pytest.raises(ValueError, match=match):
        module.noisy_loss(torch.randn(2, 2), torch.tensor(y))
    with pytest.raises(ValueError, match=match):  # a training batch
        module.noisy_loss(*module._unpack((torch.randn(2, 2), torch.tensor(y))))


@pytest.mark.parametrize("y, match", [(torch.tensor([0.5, 1.7]), "integer class labels"), (True, "integer class labels"),
                                      (torch.tensor([0, 1, 2]), r"got shape \(3,\)"),
                                      (torch.tensor([0]), r"got shape \(1,\)")])
def test_generate_checks_the_labels_before_sampling(y, match):
    """Float labels were cast to classes (1.7 -> 1), a longer y was cut to num_samples and a shorter one
    failed only after the first chunks had been sampled."""
    from sgm_lightning.nets.mlp import MLPScoreNet
    from sgm_lightning.losses import DSMLoss
    from sgm_lightning.sde import VPSDE
    from sgm_lightning.training.lit_module import ScoreLitModule
    sde = VPSDE()
    module = ScoreLitModule(net=MLPScoreNet(dim=2, hidden_dim=8, num_classes=3), sde=sde, loss=DSMLoss(sde),
                            data_shape=(2,))
    with pytest.raises(ValueError, match=match):
        module.generate(2, method="ddim", steps=2, y=y, batch_size=1)
    assert module.generate(2, method="ddim", steps=2, y=torch.tensor([0, 2])).samples.shape == (2, 2)
    assert module.generate(2, method="ddim", steps=2, y=1).samples.shape == (2, 2)
