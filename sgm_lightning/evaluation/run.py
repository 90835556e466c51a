"""Paper-quotable evaluation of a trained model: FID / KID / IS of its samples and bits/dim of held-out data.

``evaluate`` generates ``num_samples`` samples on every visible device with ``Trainer.predict`` over
a dataset of chunk indices: chunk c (``batch_size`` samples) is drawn with the seed ``seed + c``, so
the sample set and the figures do not depend on the number of devices. Metric states are summed
across ranks by torchmetrics; samples are written as ``<out_dir>/samples.npz`` (uint8 NHWC images,
chunk order, plus the settings as JSON; ``samples-v1.npz``, ... when an earlier evaluation wrote
there). The returned dict holds every figure and the exact settings (sampler, steps, NFE, seed, EMA,
checkpoint step, extractor, reference-statistics key), which ``sample.py`` prints as one JSON line.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from sgm_lightning.evaluation.fid_callback import chunk_seeds, shared_reference_statistics
from sgm_lightning.evaluation.features import extractor_name
from sgm_lightning.evaluation.fid import (compute_seeded, load_reference_features, load_reference_statistics,
                                          make_fid_metric, make_is_metric, make_kid_metric, metric_key)
from sgm_lightning.training.data.ranges import to_signed
from sgm_lightning.training.viz import to_images
from sgm_lightning.utils import unused_stem


class _Chunks(Dataset):
    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


class _SampleTask(L.LightningModule):
    """Wraps the model for ``Trainer.predict``: one chunk of samples per predict step."""

    def __init__(self, model: nn.Module, extractor: nn.Module, datamodule, dataset_id: str, cfg: dict,
                 is_classifier: nn.Module | None):
        super().__init__()
        self.model, self.cfg, self.datamodule_, self.dataset_id = model, cfg, datamodule, dataset_id
        self.fid = make_fid_metric(extractor)
        self.kid = make_kid_metric(extractor, subset_size=cfg["kid_subset_size"]) if cfg["kid"] else None
        self.inception = make_is_metric(is_classifier) if is_classifier is not None else None
        self.results: dict = {}
        self.nfe = 0

    def on_predict_start(self) -> None:
        t, cfg = self.trainer, self.cfg
        n_chunks = cfg["num_samples"] // cfg["batch_size"]
        chunk_seeds(cfg["num_samples"], cfg["batch_size"], cfg["seed"], t.global_rank, t.world_size)  # validates
        ref = shared_reference_statistics(t, self.fid.inception, self.datamodule_, self.dataset_id,
                                          cfg["reference_split"], cfg["reference_num_samples"], cfg["cache_dir"],
                                          keep_features=cfg["kid"], device=self.device, batch_size=cfg["batch_size"])
        load_reference_statistics(self.fid, ref.mu, ref.sigma, ref.n, rank=t.global_rank)
        if self.kid is not None:
            if ref.n < cfg["kid_subset_size"]:  # before any sample is drawn
                raise ValueError(f"kid_subset_size={cfg['kid_subset_size']} is larger than the {ref.n} reference "
                                 f"images: lower kid_subset_size (metrics.kid_subset_size) or use more reference "
                                 f"images (metrics.reference_num_samples)")
            load_reference_features(self.kid, ref.features[t.global_rank::t.world_size], rank=0)
        self.results.update(reference_key=ref.key, reference_n=ref.n, world_size=t.world_size, num_chunks=n_chunks)

    def predict_step(self, batch, batch_idx):
        chunk = int(batch.reshape(-1)[0])
        cfg = self.cfg
        g = torch.Generator(device=self.device).manual_seed(cfg["seed"] + chunk)
        res = self.model.generate(cfg["batch_size"], method=cfg["method"], steps=cfg["steps"], generator=g,
                                  batch_size=cfg["batch_size"], use_ema=cfg["use_ema"], **cfg["sampler_options"])
        x = to_signed(res.samples, self.model.hparams.get("data_range", "[-1,1]"))
        self.nfe = int(getattr(res, "nfe", 0) or 0)
        self.fid.update(x, real=False)
        if self.kid is not None:
            self.kid.update(x, real=False)
        if self.inception is not None:
            self.inception.update(x)
        return chunk, to_images(x)

    def on_predict_epoch_end(self) -> None:
        ext = self.fid.inception
        self.results[metric_key(ext, "fid")] = float(self.fid.compute())
        if self.kid is not None:
            m, s = compute_seeded(self.kid, self.cfg["seed"])
            self.results[metric_key(ext, "kid")], self.results[metric_key(ext, "kid") + "_std"] = float(m), float(s)
        if self.inception is not None:
            m, s = compute_seeded(self.inception, self.cfg["seed"])
            key = metric_key(self.inception.inception, "is")
            self.results[key], self.results[key + "_std"] = float(m), float(s)
        self.results["nfe"] = self.nfe


def _write_npz(path: Path, chunks: list, settings: dict) -> None:
    chunks = sorted(chunks, key=lambda c: c[0])
    images = np.concatenate([c[1] for c in chunks]) if chunks else np.zeros((0,))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, images=images, chunks=np.array([c[0] for c in chunks]), settings=json.dumps(settings))
    os.replace(tmp, path)


def _new_path(path: Path) -> Path:
    """``path``, or ``<stem>-v1<suffix>``, ``-v2``, ... when it exists: an evaluation never overwrites
    earlier samples."""
    return Path(unused_stem(str(path.with_suffix("")), (path.suffix,)) + path.suffix)


def evaluate(module, datamodule, *, num_samples: int = 50_000, method: str = "ode", steps: int | None = None,
             seed: int = 0, batch_size: int = 250, extractor: nn.Module, kid: bool = False,
             inception_score: nn.Module | None = None, use_ema: bool = True, out_dir: str | None = None,
             devices="auto", accelerator: str = "auto", reference_split: str = "train",
             reference_num_samples: int | None = 50_000, cache_dir: str | None = None, kid_subset_size: int = 1000,
             sampler_options: dict | None = None, checkpoint_step: int | None = None,
             dataset_id: str | None = None) -> dict:
    """FID (or ``fd_<name>``), optional KID and IS of ``num_samples`` samples of ``module`` vs cached real statistics.

    Args:
        module: a model with ``generate(num_samples, method, steps, generator, batch_size, use_ema, **options)``.
        datamodule: provides ``dataset_id``, ``data_shape`` and the reference split's data.
        extractor: feature network (``InceptionV3Features`` for a real FID).
        inception_score: a classifier returning logits for an IS (the FID network has no logits).
        out_dir: where ``samples.npz`` goes (``samples-v1.npz``, ... if it exists; None: samples are not written).
        devices, accelerator: passed to ``lightning.Trainer`` (predict); all visible devices by default.
        checkpoint_step: recorded in the settings (the training step of the evaluated weights).
    Returns a dict of figures and settings (JSON-serialisable).
    """
    if num_samples % batch_size:
        raise ValueError(f"num_samples={num_samples} must be divisible by batch_size={batch_size}")
    if kid and kid_subset_size > num_samples:  # torchmetrics would fail only after every sample was drawn
        raise ValueError(f"kid_subset_size={kid_subset_size} must be <= num_samples={num_samples}: lower "
                         f"kid_subset_size (metrics.kid_subset_size) or draw more samples")
    dataset_id = dataset_id or getattr(datamodule, "dataset_id", None)
    if dataset_id is None:
        raise ValueError("the datamodule needs a dataset_id attribute (or pass dataset_id=...) for the reference cache")
    cfg = dict(num_samples=int(num_samples), method=method, steps=steps, seed=int(seed), batch_size=int(batch_size),
               kid=bool(kid), use_ema=bool(use_ema), reference_split=reference_split,
               reference_num_samples=reference_num_samples, cache_dir=cache_dir, kid_subset_size=int(kid_subset_size),
               sampler_options=dict(sampler_options or {}))
    task = _SampleTask(module, extractor, datamodule, dataset_id, cfg, inception_score)
    target = None if out_dir is None else _new_path(Path(out_dir) / "samples.npz")  # before any rank writes
    trainer = L.Trainer(accelerator=accelerator, devices=devices, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False)
    loader = DataLoader(_Chunks(num_samples // batch_size), batch_size=1, shuffle=False)
    outputs = trainer.predict(task, dataloaders=loader, return_predictions=True) or []
    settings = {k: v for k, v in cfg.items() if k != "cache_dir"}
    settings.update(extractor=extractor_name(extractor), dataset_id=dataset_id, checkpoint_step=checkpoint_step,
                    reference_key=task.results.get("reference_key"), reference_n=task.results.get("reference_n"),
                    world_size=task.results.get("world_size"), nfe=task.results.get("nfe"))
    result = {k: v for k, v in task.results.items() if k not in settings and k not in ("num_chunks",)}
    result.update(settings)
    if out_dir is not None:
        out = Path(out_dir)
        rank, ws = trainer.global_rank, trainer.world_size
        shard = out / f"samples.rank{rank}.npz" if ws > 1 else target
        _write_npz(shard, list(outputs), settings)
        if ws > 1:  # rank 0 merges the shards once every rank has written its own
            trainer.strategy.barrier("evaluate_samples")
            if rank == 0:
                parts = []
                for r in range(ws):
                    with np.load(out / f"samples.rank{r}.npz") as z:
                        parts += list(zip(z["chunks"].tolist(), np.split(z["images"], len(z["chunks"]))))
                _write_npz(target, parts, settings)
                for r in range(ws):
                    os.unlink(out / f"samples.rank{r}.npz")
        result["samples_path"] = str(target)
    return result
