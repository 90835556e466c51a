"""Edge cases of the evaluation layer (FID / KID / IS, extractors, reference statistics, evaluation
callbacks) found by a held-out-check audit; each test failed before its fix."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from sgm_lightning.evaluation.features import IdentityFeatures, RandomProjectionFeatures
from sgm_lightning.evaluation.fid import make_fid_metric
from sgm_lightning.evaluation.fid_callback import FIDCallback
from tests.test_fid_callback import SHAPE, StubModule, ToyData, _Strategy


def _trainer(step=0, rank=0, world_size=1):
    return SimpleNamespace(global_rank=rank, world_size=world_size, global_step=step, is_global_zero=rank == 0,
                           datamodule=ToyData(), strategy=_Strategy(), loggers=[])


# ---------------------------------------------------------------------------- non-finite samples
def test_fd_of_non_finite_features_is_nan_not_a_crash():
    # NaN features used to reach torch.linalg.eigvals, which segfaults the process on CPU (MKL)
    g = torch.Generator().manual_seed(0)
    m = make_fid_metric(IdentityFeatures((3,)))
    m.update(torch.randn(10, 3, generator=g), real=True)
    x = torch.randn(10, 3, generator=g)
    x[0, 0] = float("nan")
    m.update(x, real=False)
    assert math.isnan(float(m.compute()))
    m.reset()  # the real statistics survive; finite samples give a finite value again
    m.update(torch.randn(10, 3, generator=g), real=False)
    assert math.isfinite(float(m.compute()))


class _NaNFirstModule(StubModule):
    """Samples NaN at its first ``generate`` calls (a diverged early sampler), finite afterwards."""

    nan_calls = 2

    def generate(self, num_samples, generator=None, **kw):
        self.calls.append(num_samples)
        x = 0.3 * torch.randn((num_samples, *SHAPE), generator=generator)
        if len(self.calls) <= self.nan_calls:
            x[0] = float("nan")
        return SimpleNamespace(samples=x, nfe=1)


def test_fid_callback_nan_evaluation_is_logged_but_never_the_best(tmp_path):
    cb = FIDCallback(extractor=IdentityFeatures(SHAPE), every_n_steps=1, num_samples=32, batch_size=16,
                     reference_num_samples=128, cache_dir=str(tmp_path))
    module = _NaNFirstModule()
    cb.on_fit_start(_trainer(), module)
    first = cb.evaluate(_trainer(1), module)
    assert math.isnan(first["fd_identity"]) and math.isnan(first["fd_identity_best"])
    second = cb.evaluate(_trainer(2), module)
    assert math.isfinite(second["fd_identity"]) and second["fd_identity_best"] == second["fd_identity"]
    assert cb.best == second["fd_identity"]


# ---------------------------------------------------------------------------- reference-statistics cache
def test_reference_cache_key_follows_the_held_out_split(tmp_path):
    # the digits' dataset_id does not say which examples val_fraction / seed hold out of "train":
    # another split reused the cached statistics of the old one (wrong n, mean and covariance)
    from sgm_lightning.evaluation.reference import reference_statistics
    from sgm_lightning.training.data.embedded import DigitsDataModule
    ext = RandomProjectionFeatures((1, 8, 8), dim=4, seed=0)

    def stats(**data_kw):
        dm = DigitsDataModule(**data_kw)
        return dm, reference_statistics(ext, dm, dm.dataset_id, "train", None, tmp_path)

    _, full = stats(val_fraction=0.0)
    assert not full.hit and full.n == 1797
    dm, held_out = stats(val_fraction=0.2, seed=0)
    assert not held_out.hit and held_out.n == len(dm.train_dataset) == 1438
    x = torch.stack([dm.train_dataset[i][0] for i in range(len(dm.train_dataset))])
    assert torch.allclose(held_out.mu, ext(x).double().mean(0), atol=1e-5)
    assert not stats(val_fraction=0.2, seed=1)[1].hit  # same size, other examples
    assert stats(val_fraction=0.2, seed=0)[1].hit and stats(val_fraction=0.0)[1].hit


def test_extractor_settings_that_change_features_change_the_cache_key():
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    narrow, default = RandomProjectionFeatures((1, 8, 8), dim=4, width=16), RandomProjectionFeatures((1, 8, 8), dim=4)
    assert not torch.allclose(narrow(x), default(x))
    assert narrow.name != default.name and default.name == "randproj4_s0"  # the documented key is unchanged


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_unreadable_cache_file_is_recomputed(tmp_path, damage):
    from torch.utils.data import DataLoader, TensorDataset

    from sgm_lightning.evaluation.reference import reference_statistics
    data = torch.rand(40, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1
    loader = DataLoader(TensorDataset(data), batch_size=16)
    ext = RandomProjectionFeatures((1, 4, 4), dim=4)
    kw = dict(dataset_id="toy", split="train", num_samples=32, cache_dir=tmp_path, resolution=(1, 4, 4))
    first = reference_statistics(ext, loader, **kw)
    raw = first.path.read_bytes()
    first.path.write_bytes(b"not an npz file" if damage == "garbage" else raw[: len(raw) // 2])
    again = reference_statistics(ext, loader, **kw)  # was: ValueError / BadZipFile from np.load
    assert not again.hit and torch.equal(again.mu, first.mu) and torch.equal(again.sigma, first.sigma)
    assert reference_statistics(ext, loader, **kw).hit  # the file was rewritten


# ---------------------------------------------------------------------------- schedule
def _fit(tmp_path, cb, max_steps, ckpt_path=None, module=None, **trainer_kw):
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    ck = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1, filename="{step}")
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, callbacks=[cb, ck], logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=True,
                        default_root_dir=tmp_path, **{"limit_val_batches": 0, **trainer_kw})
    trainer.fit(module or StubModule(), datamodule=ToyData(), ckpt_path=ckpt_path)
    return trainer


def _fid(tmp_path, **kw):
    return FIDCallback(extractor=IdentityFeatures(SHAPE), num_samples=16, batch_size=16, reference_num_samples=64,
                       cache_dir=str(tmp_path / "stats"), **{"every_n_steps": 2, **kw})


def test_resume_with_gradient_accumulation_does_not_repeat_an_evaluation(tmp_path):
    # the first batches after resuming from step 2 still show global_step 2 (accumulating for step 3):
    # step 2 was evaluated a second time (history [2, 2, 4])
    _fit(tmp_path, _fid(tmp_path), 2, accumulate_grad_batches=2)
    cb = _fid(tmp_path)
    module = StubModule()
    _fit(tmp_path, cb, 4, ckpt_path=str(tmp_path / "ckpt" / "step=2.ckpt"), module=module, accumulate_grad_batches=2)
    assert [s for s, _ in cb.history] == [2, 4] and len(module.calls) == 1


class _ValModule(StubModule):
    def validation_step(self, batch, batch_idx):
        return None


class _ValData(ToyData):
    def val_dataloader(self):
        return self.train_dataloader()


def test_validation_at_an_evaluated_step_reuses_the_figures(tmp_path):
    # every_n_steps and at_validation at the same step: the second evaluation drew the same samples again
    import lightning as L
    cb = _fid(tmp_path, at_validation=True)
    module = _ValModule()
    trainer = L.Trainer(max_steps=4, accelerator="cpu", devices=1, callbacks=[cb], logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        num_sanity_val_steps=0, val_check_interval=2, limit_val_batches=1, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=_ValData())
    assert [s for s, _ in cb.history] == [2, 4] and len(module.calls) == 2
    assert float(trainer.callback_metrics["val/fd_identity"]) == pytest.approx(cb.history[-1][1])


# ---------------------------------------------------------------------------- start-up checks
def test_fid_callback_settings_that_cannot_be_computed_stop_at_fit_start(tmp_path):
    # both used to fail at the first evaluation, after training to step every_n_steps
    module = StubModule()
    cb = FIDCallback(extractor=IdentityFeatures(SHAPE), num_samples=64, batch_size=16, reference_num_samples=128,
                     cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="divisible by batch_size x world_size = 16 x 3"):
        cb.on_fit_start(_trainer(world_size=3), module)
    kid = FIDCallback(extractor=IdentityFeatures(SHAPE), num_samples=64, batch_size=16, reference_num_samples=40,
                      cache_dir=str(tmp_path), kid=True, kid_subset_size=50)
    with pytest.raises(ValueError, match=r"kid_subset_size=50 is larger than the 40 reference images.*<= 40"):
        kid.on_fit_start(_trainer(), module)


# ---------------------------------------------------------------------------- extractor input
class _Recorder(torch.nn.Module):
    """Stands in for the TorchScript Inception net: records its input, returns 2 features."""

    def __init__(self):
        super().__init__()
        self.inputs = []

    def forward(self, x):
        self.inputs.append(x)
        return x.mean(dim=(2, 3))[:, :2]


def _tf1_bilinear(p: torch.Tensor, out: int) -> torch.Tensor:
    """Hand-written TF1 resize_bilinear(align_corners=False) of (H, W) pixels: output i reads source
    i * in / out, linear between floor and floor + 1 (clamped to the last row / column)."""
    def weights(n_in):
        src = torch.arange(out, dtype=torch.float64) * n_in / out
        lo = src.floor().long()
        hi, w = (lo + 1).clamp(max=n_in - 1), src - lo
        m = torch.zeros(out, n_in, dtype=torch.float64)
        m[torch.arange(out), lo] += 1 - w
        m[torch.arange(out), hi] += w
        return m
    return weights(p.shape[0]) @ p.double() @ weights(p.shape[1]).T


@pytest.fixture
def stub_inception(monkeypatch, tmp_path):
    from sgm_lightning.evaluation import features as feat_mod
    weights = tmp_path / "default_1.pt"
    weights.write_bytes(b"stub")
    net = _Recorder()
    net.weights = weights
    monkeypatch.setattr(feat_mod, "find_inception_weights", lambda path=None: weights)
    monkeypatch.setattr(feat_mod.torch.jit, "load", lambda *a, **k: net)
    return net


def test_inception_preprocessing_by_hand_grey_odd_size_and_uint8(stub_inception):
    from sgm_lightning.evaluation.features import InceptionV3Features
    ext = InceptionV3Features(verify=False)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, 5, 7, generator=g) * 2 - 1  # grey, neither square nor 32x32
    ext(x)
    seen = stub_inception.inputs[-1]
    assert seen.shape == (2, 3, 299, 299) and seen.dtype == torch.float32
    assert torch.equal(seen[:, 0], seen[:, 1]) and torch.equal(seen[:, 0], seen[:, 2])  # grey -> RGB
    pixels = torch.round((x[:, 0].double() + 1) * 127.5)
    for b in range(2):
        expected = (_tf1_bilinear(pixels[b], 299) - 128) / 128
        assert torch.allclose(seen[b, 0].double(), expected, atol=1e-4)
    # uint8 pixels are pixels (they were read as data in [-1, 1]: every pixel > 0 became 255)
    ext(pixels.to(torch.uint8)[:, None])
    assert torch.equal(stub_inception.inputs[-1], seen)
    with pytest.raises(ValueError, match=r"uint8.*p.float\(\) / 127.5 - 1"):
        ext(pixels.long()[:, None])
    # other features, other cache key: unquantized pixels, or weights that are not the recorded file
    assert InceptionV3Features(verify=False, quantize=False).name == ext.name + "_noquant"
    from sgm_lightning.evaluation.features import sha256_file
    assert ext.name == "inception_v3_tf_pool3_sha" + sha256_file(stub_inception.weights)[:12]


def test_uint8_reference_images_give_the_statistics_of_their_float_version():
    from sgm_lightning.evaluation.reference import compute_features_statistics
    p = torch.randint(0, 256, (40, 1, 8, 8), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    ext = RandomProjectionFeatures((1, 8, 8), dim=4)
    mu, sigma, n, _ = compute_features_statistics(ext, [p[:20], p[20:]], data_range="[0,1]")
    mu_f, sigma_f, n_f, _ = compute_features_statistics(ext, [p.float() / 255], data_range="[0,1]")
    assert n == n_f == 40 and torch.allclose(mu, mu_f, atol=1e-6) and torch.allclose(sigma, sigma_f, atol=1e-6)
    assert torch.allclose(ext(p), ext(p.float() / 127.5 - 1))


def test_figures_are_written_once_at_the_step_they_were_computed(tmp_path):
    # at validation end pl_module.log wrote at global_step - 1: the step-4 figure landed on the row of
    # the step-3 evaluation; a step evaluated by both schedules was written twice
    import lightning as L
    from lightning.pytorch.loggers.logger import Logger

    class Recorder(Logger):
        name, version = "rec", 0

        def __init__(self):
            super().__init__()
            self.rows = []

        def log_metrics(self, metrics, step=None):
            if "val/fd_identity" in metrics:
                self.rows.append((step, metrics["val/fd_identity"]))

        def log_hyperparams(self, *args, **kwargs):
            pass

    rec, cb = Recorder(), _fid(tmp_path, every_n_steps=3, at_validation=True)
    trainer = L.Trainer(max_steps=6, accelerator="cpu", devices=1, callbacks=[cb], logger=rec,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        num_sanity_val_steps=0, val_check_interval=2, limit_val_batches=1, log_every_n_steps=50,
                        default_root_dir=tmp_path)
    trainer.fit(_ValModule(), datamodule=_ValData())
    assert [s for s, _ in cb.history] == [2, 3, 4, 6]
    assert rec.rows == [(s, pytest.approx(v)) for s, v in cb.history]


# ---------------------------------------------------------------------------- KID
def test_kid_does_not_depend_on_the_order_of_the_features():
    # torchmetrics' subsets are randperm indices into the features as concatenated (rank by rank under
    # DDP, round-robin shares): the same sets under the same seed gave another KID on 2 processes
    from sgm_lightning.evaluation.fid import compute_seeded, load_reference_features, make_kid_metric
    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(64, 3, generator=g), 0.2 + torch.randn(48, 3, generator=g)

    def kid(real_rows, fake_chunks):
        m = make_kid_metric(IdentityFeatures((3,)), subset_size=16, subsets=5)
        load_reference_features(m, real_rows)
        for chunk in fake_chunks:
            m.update(chunk, real=False)
        return compute_seeded(m, 0)

    ordered = kid(real, fake.split(16))
    interleaved = kid(torch.cat([real[0::2], real[1::2]]), [fake[32:], fake[:16], fake[16:32]])
    assert torch.equal(ordered[0], interleaved[0]) and torch.equal(ordered[1], interleaved[1])


# ---------------------------------------------------------------------------- LikelihoodCallback
def test_likelihood_callback_on_a_missing_split_names_the_setting_to_change():
    from sgm_lightning.evaluation.likelihood_callback import LikelihoodCallback
    from sgm_lightning.training.data.embedded import DigitsDataModule
    cb = LikelihoodCallback(every_n_steps=2, split="test")  # the digits have no test split
    with pytest.raises(ValueError, match=r"split='test'.*no test split.*callbacks.likelihood.split=val"):
        cb.setup(SimpleNamespace(datamodule=DigitsDataModule()), None, "fit")


@pytest.mark.parametrize("split, val_fraction", [("val", 0.0), ("test", 0.05)])
def test_reference_split_without_data_names_the_setting_to_change(tmp_path, split, val_fraction):
    from sgm_lightning.evaluation.reference import reference_statistics
    from sgm_lightning.training.data.embedded import DigitsDataModule
    dm = DigitsDataModule(val_fraction=val_fraction)
    with pytest.raises(ValueError, match=rf"'{split}' split of DigitsDataModule.*metrics.reference_split=train"):
        reference_statistics(RandomProjectionFeatures((1, 8, 8), dim=4), dm, dm.dataset_id, split, 100, tmp_path)


@pytest.mark.parametrize("n_bits", [0, -3, 2.5])
def test_likelihood_callback_refuses_a_bad_n_bits_at_construction(n_bits):
    from sgm_lightning.evaluation.likelihood_callback import LikelihoodCallback
    with pytest.raises(ValueError, match="n_bits must be a positive integer"):
        LikelihoodCallback(every_n_steps=2, n_bits=n_bits)


@pytest.mark.parametrize("kw, match", [({"method": "dddim"}, "method"), ({"method": "ddim", "steps": 0}, "steps")])
def test_fid_callback_refuses_a_bad_sampler_at_construction(kw, match):
    # both failed at the first evaluation, after training to step every_n_steps
    with pytest.raises(ValueError, match=match):
        FIDCallback(extractor=IdentityFeatures(SHAPE), every_n_steps=2, num_samples=16, batch_size=16, **kw)


class _RandomFlipData(torch.utils.data.Dataset):
    """Images flipped at random with the global RNG in ``__getitem__`` (like the Hub datamodules'
    ``random_flip`` training sets, which ``reference_dataloader`` reads)."""

    def __init__(self):
        self.x = torch.rand(24, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i].flip(-1) if torch.rand(()) < 0.5 else self.x[i]


def test_reference_statistics_are_reproducible_and_leave_the_global_rng_alone(tmp_path):
    # were other numbers under every global seed, and moved training's random stream only on a cache miss
    from torch.utils.data import DataLoader

    from sgm_lightning.evaluation.reference import reference_statistics
    ext = RandomProjectionFeatures((1, 4, 4), dim=4)
    loader = DataLoader(_RandomFlipData(), batch_size=8)
    stats = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        state = torch.get_rng_state()
        stats.append(reference_statistics(ext, loader, "flips", "train", None, tmp_path / str(seed),
                                          resolution=(1, 4, 4)))
        assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(stats[0].mu, stats[1].mu) and torch.equal(stats[0].sigma, stats[1].sigma)


def test_reference_features_for_kid_run_the_extractor_once_per_batch():
    from sgm_lightning.evaluation.reference import compute_features_statistics

    class Counting(RandomProjectionFeatures):
        calls = 0

        def forward(self, x):
            Counting.calls += 1
            return super().forward(x)

    x = torch.rand(40, 1, 4, 4, generator=torch.Generator().manual_seed(2)) * 2 - 1
    ext = Counting((1, 4, 4), dim=4)
    mu, sigma, n, feats = compute_features_statistics(ext, x.split(16), keep_features=True)
    assert Counting.calls == 3  # was 6: once for the metric, once for the kept copy
    mu0, sigma0, n0, _ = compute_features_statistics(ext, x.split(16))
    assert n == n0 == 40 and torch.equal(mu, mu0) and torch.equal(sigma, sigma0)
    assert torch.allclose(feats, ext(x), atol=1e-6)


# ---------------------------------------------------------------------------- IS, bits/dim arguments
def test_inception_score_closed_forms_and_too_many_splits():
    import warnings

    from sgm_lightning.evaluation.fid import compute_seeded, make_is_metric
    k = 5

    def score(logits, splits):
        m = make_is_metric(IdentityFeatures((k,)), splits=splits)
        m.update(logits)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the std of a single split
            return float(compute_seeded(m, 0)[0])

    assert score(torch.zeros(40, k), 4) == pytest.approx(1.0, abs=1e-6)  # p(y|x) = p(y): the lower bound
    assert score(60.0 * torch.eye(k).repeat(8, 1), 1) == pytest.approx(k, rel=1e-5)  # confident, balanced: K
    rand = score(3 * torch.randn(40, k, generator=torch.Generator().manual_seed(0)), 2)
    assert 1.0 < rand < k
    # 10 splits of 5 samples held one sample each: IS = 1 exactly, silently
    with pytest.raises(ValueError, match=r"at least 2 x splits = 20 samples, got 5"):
        score(3 * torch.randn(5, k), 10)


def test_batch_bits_per_dim_refuses_zero_dequantization_draws():
    from sgm_lightning.evaluation.likelihood_callback import batch_bits_per_dim
    from tests.test_fid_callback import ExactScoreModule
    with pytest.raises(ValueError, match="n_dequant must be a positive integer"):  # was NaN bits/dim
        batch_bits_per_dim(ExactScoreModule(), torch.zeros(2, 2), n_dequant=0)


# ---------------------------------------------------------------------------- several callbacks, checkpoints
def test_two_fid_callbacks_in_one_trainer_and_legacy_checkpoints(tmp_path):
    # Lightning refused a second FIDCallback (same state_key: the class name)
    import lightning as L
    cbs = [_fid(tmp_path), FIDCallback(extractor=RandomProjectionFeatures(SHAPE, dim=4), every_n_steps=2,
                                       num_samples=16, batch_size=16, reference_num_samples=64,
                                       cache_dir=str(tmp_path / "stats"))]
    trainer = L.Trainer(max_steps=2, accelerator="cpu", devices=1, callbacks=cbs, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(StubModule(), datamodule=ToyData())
    assert [s for s, _ in cbs[0].history] == [s for s, _ in cbs[1].history] == [2]
    assert cbs[0].history[0][1] != cbs[1].history[0][1]
    # a checkpoint written when the state was keyed by the class name still restores best / history
    trainer.save_checkpoint(tmp_path / "new.ckpt")
    ckpt = torch.load(tmp_path / "new.ckpt", weights_only=False)
    ckpt["callbacks"] = {"FIDCallback": ckpt["callbacks"][cbs[0].state_key]}
    torch.save(ckpt, tmp_path / "legacy.ckpt")
    resumed = _fid(tmp_path)
    _fit(tmp_path, resumed, 2, ckpt_path=str(tmp_path / "legacy.ckpt"))
    assert resumed.best == cbs[0].best and resumed.history == cbs[0].history
