"""Data loading with worker processes and the real-format loaders under exact resume, found by a
held-out-check audit (each test failed before its fix)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sgm_lightning.training.data import HFImageDataModule


def _write_grey_folder(root, n_per_class=6, size=8):
    """Two class folders of random grey ``size`` x ``size`` PNGs (never symmetric: a flip shows)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(n_per_class):
            Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(root / c / f"{i}.png")


def _flip_module(tmp_path, **options):
    return HFImageDataModule(name="imagefolder", root=str(tmp_path / "imgs"), image_size=8, channels=1,
                             random_flip=True, batch_size=4, cache_dir=str(tmp_path / "cache"), seed=3, **options)


def _epoch(dm, epoch, state=None):
    """The training batches of ``epoch`` (after ``load_state_dict(state)`` when given) as one tensor."""
    from types import SimpleNamespace

    dm.trainer = SimpleNamespace(global_rank=0, world_size=1, current_epoch=epoch)
    if state is not None:
        dm.load_state_dict(state)
    return torch.cat([x for x, _ in dm.train_dataloader()])


def test_random_flips_are_a_function_of_seed_epoch_and_example(tmp_path):
    """random_flip drew from the worker's RNG (seeded per worker at the loader's start) or, with
    num_workers=0, from the global RNG that dropout uses: the flips depended on the number of workers,
    on persistent workers, on which worker loaded which batch, and a run resumed mid-epoch flipped
    other images than the uninterrupted one. They are now drawn per example from (seed, epoch, index)."""
    _write_grey_folder(tmp_path / "imgs")
    plain = _flip_module(tmp_path, num_workers=0)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    ref = [_epoch(plain, e) for e in (0, 1)]
    assert torch.equal(torch.get_rng_state(), before)  # data loading leaves the global (dropout) stream alone
    unflipped = _epoch(HFImageDataModule(name="imagefolder", root=str(tmp_path / "imgs"), image_size=8, channels=1,
                                         batch_size=4, cache_dir=str(tmp_path / "cache"), seed=3), 0)
    flipped = [not torch.equal(a, b) for a, b in zip(ref[0], unflipped)]
    assert any(flipped) and not all(flipped)  # the flips happen, per example
    assert all(torch.equal(a, b) or torch.equal(a, b.flip(-1)) for a, b in zip(ref[0], unflipped))

    two = _flip_module(tmp_path, num_workers=2, persistent_workers=True)
    assert torch.equal(_epoch(two, 0), ref[0]) and torch.equal(_epoch(two, 1), ref[1])
    # resumed after the first of the 3 batches of epoch 1, with workers
    resumed = _epoch(_flip_module(tmp_path, num_workers=2), 1,
                     {"epoch": 1, "batches_consumed": 1, "seed": 3, "batch_size": 4})
    assert torch.equal(resumed, ref[1][4:])


def _same_run(a, b, data_key="HFImageDataModule"):
    from test_resume_matrix import assert_same_run_state

    assert_same_run_state({**a, "DigitsDataModule": a[data_key]}, {**b, "DigitsDataModule": b[data_key]})


def test_train_with_flips_and_workers_resumes_exactly(tmp_path):
    """train.py on an image folder with random flips (the cifar10 / celeba setting) and 2 persistent
    workers, stopped in the middle of epoch 1 and resumed, ended with other weights than the
    uninterrupted run; the same run without workers had other weights again."""
    from test_resume_matrix import run

    _write_grey_folder(tmp_path / "imgs", n_per_class=12)  # 19 training images (5 held out): 2 batches of 8
    data = ["data=imagefolder", f"data.root={tmp_path / 'imgs'}", "data.image_size=8", "+data.channels=1",
            "data.batch_size=8", "+data.val_fraction=0.2", f"+data.cache_dir={tmp_path / 'cache'}"]
    workers = [*data, "data.num_workers=2", "+data.persistent_workers=true"]
    full = run(tmp_path / "full", "trainer.max_steps=5", *workers)
    assert full["HFImageDataModule"]["epoch"] == 2
    run(tmp_path / "part", "trainer.max_steps=3", *workers)
    _same_run(full, run(tmp_path / "part", "trainer.max_steps=5", "ckpt_path=last", *workers))
    _same_run(full, run(tmp_path / "none", "trainer.max_steps=5", *data, "data.num_workers=0"))


def test_too_small_training_set_errors_say_what_to_change():
    """A global batch larger than the training set, or a val_fraction that holds out every example, stopped
    the run with an error that named the problem but not the setting to change."""
    from types import SimpleNamespace

    from sgm_lightning.training.data import DigitsDataModule, ToyDataModule

    with pytest.raises(ValueError, match=r"batch_size=2048 \(global\) is larger than the training set \(1707 "
                                         r"examples.*val_fraction=0.05.*use batch_size<=1707"):
        DigitsDataModule(batch_size=2048).train_dataloader()
    dm = ToyDataModule(n_samples=9, batch_size=12, val_fraction=0.0)
    dm.trainer = SimpleNamespace(global_rank=0, world_size=4, current_epoch=0)
    with pytest.raises(ValueError, match=r"batch_size=12 .*\(9 examples\).*use batch_size<=8 \(a multiple of the "
                                         r"world size 4\)"):
        dm.train_dataloader()
    with pytest.raises(ValueError, match=r"training set of .* is empty: val_fraction=0.9 holds out all 4 examples"
                                         r".*smaller val_fraction"):
        ToyDataModule(n_samples=4, batch_size=2, val_fraction=0.9).setup()


def test_workers_outlive_a_preemption_signal_sent_to_the_whole_job():
    """SLURM preempts by signalling every process of the job: SIGTERM / SIGUSR1 killed the DataLoader
    workers, and the training process failed with "DataLoader worker ... is killed by signal" before its
    preemption checkpoint. Workers now ignore these signals unless the training process sends them."""
    import subprocess
    import time

    from sgm_lightning.training.data import DigitsDataModule
    from torch.utils.data._utils import signal_handling

    dm = DigitsDataModule(batch_size=256, num_workers=2, persistent_workers=True, val_fraction=0.0)
    loader = dm.train_dataloader()
    it = iter(loader)
    first = [next(it), next(it)]  # one batch from each worker: both have started (run their init)
    workers = list(it._workers)
    for sig in ("TERM", "USR1"):  # from another process, as a scheduler's
        subprocess.run(["kill", f"-{sig}", *(str(w.pid) for w in workers)], check=True)
    time.sleep(0.5)  # (a killed worker is gone by then)
    rest = first + list(it)  # (the SIGCHLD handler raised here: the workers were dead)
    assert len(rest) == len(loader) and all(w.is_alive() for w in workers)
    assert torch.equal(torch.cat([y for _, y in rest]), torch.cat([y for _, y in dm.train_dataloader()]))
    # the training process itself still ends them with SIGTERM (multiprocessing does at exit), and
    # with exit status 0: the DataLoader's SIGCHLD handler (armed here) reports any other as an error
    for w in workers:
        w.terminate()
        w.join(timeout=10)
        assert w.exitcode == 0
    signal_handling._remove_worker_pids(id(it))
    it._worker_pids_set = False


@pytest.mark.slow  # ~20 s: a train.py start-up
def test_train_with_workers_preempted_by_a_job_wide_sigterm_writes_its_checkpoint(tmp_path):
    """train.py data.num_workers=2, SIGTERM to its whole process group (as a scheduler signals every
    process of a job): exit code 1 and no preemption checkpoint before; now 143 and last.ckpt at the
    step the signal ended."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from sgm_lightning.training.checkpoint import load_checkpoint

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    last = tmp_path / "checkpoints" / "last.ckpt"
    args = ["logger=none", "~callbacks.samples", "data.batch_size=64", "net.base_channels=8", "net.channel_mults=[1]",
            "net.num_groups=4", "+trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
            "callbacks.checkpoint.every_n_train_steps=2", "data.num_workers=2", "trainer.max_steps=100000",
            f"hydra.run.dir={tmp_path}"]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    with open(tmp_path / "log.txt", "w") as log:
        proc = subprocess.Popen([sys.executable, os.path.join(repo, "train.py"), *args], cwd=repo, env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            t0 = time.time()
            while (not last.exists() or load_checkpoint(last)["global_step"] < 2) and time.time() - t0 < 240:
                assert proc.poll() is None, (tmp_path / "log.txt").read_text()[-3000:]
                time.sleep(0.2)
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    out = (tmp_path / "log.txt").read_text()
    assert proc.returncode == 143, out[-3000:]
    assert "killed by signal" not in out
    step = load_checkpoint(last)["global_step"]
    assert f"checkpoint {last} written at global step {step}; exiting with code 143" in out


def test_parquet_with_string_labels_says_how_to_encode_them(tmp_path):
    """A Parquet (or save_to_disk) dataset whose label column holds strings ("cat", "dog": pandas writes
    them so) failed with "invalid literal for int() with base 10: 'dog'"; the error now names the
    column and the ways out. Integer labels that are not a ClassLabel still count max + 1 classes."""
    import datasets
    from PIL import Image

    imgs = [Image.fromarray(np.full((4, 4), 5 * i, dtype=np.uint8)) for i in range(4)]
    for kind, labels, feature in (("str", ["cat", "dog", "cat", "bird"], datasets.Value("string")),
                                  ("int", [0, 3, 1, 3], datasets.Value("int64"))):
        ds = datasets.Dataset.from_dict({"image": imgs, "label": labels},
                                        features=datasets.Features({"image": datasets.Image(), "label": feature}))
        (tmp_path / kind).mkdir()
        ds.to_parquet(str(tmp_path / kind / "train.parquet"))
    dm = HFImageDataModule(name="parquet", root=str(tmp_path / "int"), batch_size=2, cache_dir=str(tmp_path / "c"))
    assert dm.num_classes == 4
    dm = HFImageDataModule(name="parquet", root=str(tmp_path / "str"), batch_size=2, cache_dir=str(tmp_path / "c"))
    with pytest.raises(ValueError, match=r"label column 'label' .*string.* class ids.*class_encode_column\('label'\)"
                                         r".*label_key"):
        dm.setup()
