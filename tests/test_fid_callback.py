"""FIDCallback: logging / checkpoint selection in a tiny Trainer run, and 2-process DDP == 1 process."""

from __future__ import annotations

import itertools
import os
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from sgm_lightning.evaluation.fid_callback import FIDCallback, chunk_seeds
from sgm_lightning.evaluation.features import IdentityFeatures, RandomProjectionFeatures

SHAPE = (1, 4, 4)
# generated std per evaluation (one evaluation every 2 steps); real data has std 0.3, so the
# Fréchet distance is smallest at the second evaluation (step 4)
SCHEDULE = {2: 0.9, 4: 0.32, 6: 0.6}


class ToyData(L.LightningDataModule):
    dataset_id = "toy-gauss-0.3"
    data_shape = SHAPE

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.train_dataset = TensorDataset((0.3 * torch.randn(256, *SHAPE, generator=g)).clamp(-1, 1))

    def train_dataloader(self):
        return DataLoader(self.train_dataset, batch_size=32, shuffle=False)


class StubModule(L.LightningModule):
    """Exposes the ``generate`` contract of ScoreLitModule; sample spread depends on the step."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.calls = []

    def training_step(self, batch, batch_idx):
        return (self.w - 1.0) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def generate(self, num_samples, method="pc", steps=None, generator=None, batch_size=None, y=None,
                 use_ema=True, **options):
        self.calls.append((num_samples, method, steps, use_ema))
        std = SCHEDULE.get(self.trainer.global_step, 0.5) if self._trainer is not None else 0.5
        x = std * torch.randn((num_samples, *SHAPE), generator=generator, device=self.device)
        return SimpleNamespace(samples=x, nfe=7)


class InceptionLike(IdentityFeatures):
    is_inception = True  # stands in for the Inception network: only then is the key "fid"


@pytest.mark.parametrize("extractor,key", [
    (RandomProjectionFeatures(SHAPE, dim=8, seed=0), "val/fd_randproj8_s0"),
    (InceptionLike(SHAPE), "val/fid"),
])
def test_fid_callback_logs_and_checkpoint_selects(tmp_path, extractor, key):
    cb = FIDCallback(extractor=extractor, every_n_steps=2, num_samples=64, batch_size=32, method="ode", steps=5,
                     reference_num_samples=128, cache_dir=str(tmp_path / "stats"), seed=3)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor=key, mode="min", save_top_k=1, every_n_train_steps=2,
                           filename="{step}")
    module = StubModule()
    trainer = L.Trainer(max_steps=6, accelerator="cpu", devices=1, callbacks=[cb, ckpt], logger=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=tmp_path)
    trainer.fit(module, datamodule=ToyData())
    steps = [s for s, _ in cb.history]
    values = dict(cb.history)
    assert steps == [2, 4, 6]
    assert min(values, key=values.get) == 4  # the spread closest to the data's
    assert cb.best == pytest.approx(values[4])
    assert float(ckpt.best_model_score) == pytest.approx(values[4], rel=1e-5)
    assert "step=4" in os.path.basename(ckpt.best_model_path)
    assert key in trainer.callback_metrics and f"{key}_best" in trainer.callback_metrics
    assert module.calls[0] == (32, "ode", 5, True)  # batch_size per call, sampler settings passed on
    assert len(module.calls) == 3 * 2
    assert cb.settings["reference_key"] is not None and cb.state_dict()["best"] == cb.best


def test_chunk_seeds_cover_all_chunks_once_for_any_world_size():
    for ws in (1, 2, 4):
        got = sorted(c for r in range(ws) for c in chunk_seeds(64, 8, 10, r, ws))
        assert got == [(c, 10 + c) for c in range(8)]
    with pytest.raises(ValueError, match="divisible"):
        chunk_seeds(64, 8, 0, 0, 3)
    with pytest.raises(ValueError, match="every_n_steps"):
        FIDCallback(extractor=IdentityFeatures(SHAPE), every_n_steps=None)


# ---------------------------------------------------------------------------- DDP (gloo, 2 processes)
class _Strategy:
    def barrier(self, name=None):
        if dist.is_initialized():
            dist.barrier()

    def broadcast(self, obj, src=0):
        if not dist.is_initialized():
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]


def _evaluate(rank: int, world_size: int, cache_dir: str, kid: bool = True) -> dict:
    module = StubModule()
    trainer = SimpleNamespace(global_rank=rank, world_size=world_size, global_step=0, is_global_zero=rank == 0,
                              datamodule=ToyData(), strategy=_Strategy(), loggers=[])
    cb = FIDCallback(extractor=RandomProjectionFeatures(SHAPE, dim=8, seed=0), every_n_steps=1, num_samples=64,
                     batch_size=16, reference_num_samples=128, cache_dir=cache_dir, kid=kid, kid_subset_size=32)
    cb.on_fit_start(trainer, module)
    return cb.evaluate(trainer, module)


def _worker(rank: int, world_size: int, init_file: str, cache_dir: str, out_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        out = _evaluate(rank, world_size, cache_dir)
        torch.save(out, f"{out_file}.{rank}")
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes_equal_single_process(tmp_path):
    single = _evaluate(0, 1, str(tmp_path / "stats"))
    # fork: the children reuse the imported modules (spawn would re-import lightning: ~10 s each)
    mp.start_processes(_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "stats"), str(tmp_path / "out")),
                       nprocs=2, start_method="fork")
    r0, r1 = torch.load(f"{tmp_path / 'out'}.0"), torch.load(f"{tmp_path / 'out'}.1")
    key = "fd_randproj8_s0"
    assert single[key] > 0
    assert r0[key] == pytest.approx(single[key], rel=1e-5)  # same 64 samples, states summed over ranks
    assert r1[key] == r0[key]  # every rank gets the synced value (no rank-0-only compute)
    assert r1["kd_randproj8_s0"] == r0["kd_randproj8_s0"]
    assert r0["kd_randproj8_s0"] == pytest.approx(single["kd_randproj8_s0"], rel=1e-6)  # same subsets as 1 process


# ---------------------------------------------------------------------------- LikelihoodCallback
class GaussData(L.LightningDataModule):
    """8-bit quantized 2-D data in [-1, 1] (values k / 127.5 - 1)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        k = torch.round((0.3 * torch.randn(64, 2, generator=g) + 1) * 127.5).clamp(0, 255)
        self.val = TensorDataset((k / 127.5 - 1).float())

    def train_dataloader(self):
        return DataLoader(self.val, batch_size=16)

    def val_dataloader(self):
        return DataLoader(self.val, batch_size=16)


class ExactScoreModule(StubModule):
    """score_fn / sde / ema_scope contract of ScoreLitModule with the exact score of N(0, 0.3^2 I)."""

    def __init__(self):
        super().__init__()
        from sgm_lightning.analytic import GaussianMixture
        from sgm_lightning.sde import VPSDE
        self.sde = VPSDE()
        self.gm = GaussianMixture([1.0], [[0.0, 0.0]], [0.09])

    def score_fn(self, y=None, guidance_scale=None):
        return self.gm.score_fn(self.sde)

    def ema_scope(self, use_ema=True):
        import contextlib
        return contextlib.nullcontext()


def test_likelihood_callback_logs_exact_bits_per_dim(tmp_path):
    pytest.importorskip("sgm_lightning.likelihood")
    from sgm_lightning.evaluation.likelihood_callback import LikelihoodCallback
    from sgm_lightning.likelihood import bits_per_dim, dequantize
    cb = LikelihoodCallback(every_n_steps=2, num_batches=2, trace="exact", seed=4,
                            solver_options={"eps": 1e-5, "rtol": 1e-4, "atol": 1e-4})
    trainer = L.Trainer(max_steps=2, accelerator="cpu", devices=1, callbacks=[cb], logger=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=tmp_path)
    module, dm = ExactScoreModule(), GaussData()
    trainer.fit(module, datamodule=dm)
    # oracle: the same dequantization draws (seed + rank 0), NLL = -log N(x; 0, 0.09 I) exactly
    g = torch.Generator().manual_seed(4)
    expected = torch.cat([bits_per_dim(-module.gm.log_prob(dequantize(x, g).double()), 2)
                          for (x,) in itertools.islice(dm.val_dataloader(), 2)]).mean()
    assert float(trainer.callback_metrics["val/bpd"]) == pytest.approx(float(expected), abs=5e-3)
    assert cb.history[0][0] == 2 and trainer.callback_metrics["val/bpd_nfe"] > 0


# ---------------------------------------------------------------------------- evaluate()
def test_evaluate_writes_npz_and_matches_the_callback(tmp_path):
    import json

    import numpy as np

    from sgm_lightning.evaluation.run import evaluate
    ext = RandomProjectionFeatures(SHAPE, dim=8, seed=0)
    res = evaluate(StubModule(), ToyData(), num_samples=64, method="ode", steps=5, seed=0, batch_size=16,
                   extractor=ext, kid=True, kid_subset_size=32, use_ema=True, out_dir=str(tmp_path / "eval"),
                   devices=1, accelerator="cpu", reference_num_samples=128, cache_dir=str(tmp_path / "stats"),
                   checkpoint_step=123)
    # the same chunk seeds as the callback: the same 64 samples and the same value
    ref = _evaluate(0, 1, str(tmp_path / "stats"))
    assert res["fd_randproj8_s0"] == pytest.approx(ref["fd_randproj8_s0"], rel=1e-6)
    assert res["kd_randproj8_s0"] == pytest.approx(ref["kd_randproj8_s0"], rel=1e-5)
    assert res["nfe"] == 7 and res["checkpoint_step"] == 123 and res["method"] == "ode" and res["steps"] == 5
    assert res["extractor"] == "randproj8_s0" and res["reference_key"] and res["world_size"] == 1
    json.dumps(res)  # sample.py prints it as one JSON line
    with np.load(res["samples_path"]) as z:
        assert z["images"].shape == (64, 4, 4, 1) and z["images"].dtype == np.uint8
        assert json.loads(str(z["settings"]))["seed"] == 0


@pytest.mark.parametrize("options, match", [
    ({"solver": "rk4"}, "steps=N"),                        # a fixed-grid solver would take one step over [eps, T]
    ({"solver": "dopri5", "steps": 10}, "adaptive"),
    ({"solver": "not_a_solver"}, "solver"),
    ({"rtol": -1.0}, "rtol"),
])
def test_likelihood_callback_checks_its_solver_options_at_construction(options, match):
    from sgm_lightning.evaluation.likelihood_callback import LikelihoodCallback
    with pytest.raises(ValueError, match=match):
        LikelihoodCallback(every_n_steps=2, solver_options=options)
    LikelihoodCallback(every_n_steps=2, solver_options={"solver": "rk4", "steps": 4})  # a valid grid is accepted


@pytest.mark.parametrize("num_samples, reference, match", [(16, 128, "must be <= num_samples=16"),
                                                           (64, 24, "larger than the 24 reference images")])
def test_evaluate_checks_the_kid_subset_before_drawing_a_sample(tmp_path, num_samples, reference, match):
    """kid_subset_size above the number of samples or of reference images failed in torchmetrics after
    every sample had been drawn, with a message that did not name kid_subset_size."""
    from sgm_lightning.evaluation.run import evaluate
    module = StubModule()
    with pytest.raises(ValueError, match=match) as e:
        evaluate(module, ToyData(), num_samples=num_samples, method="ode", steps=5, batch_size=16,
                 extractor=RandomProjectionFeatures(SHAPE, dim=8, seed=0), kid=True, kid_subset_size=32,
                 devices=1, accelerator="cpu", reference_num_samples=reference, cache_dir=str(tmp_path / "stats"))
    assert "metrics.kid_subset_size" in str(e.value) and module.calls == []
