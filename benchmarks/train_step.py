"""Training-step throughput: Lightning (``ScoreLitModule`` + ``Trainer``) vs. a hand-written PyTorch loop.

Both variants train the same module (one after the other, so that a compiled network compiles once), on the same synthetic data in [-1, 1],
with the same loss (``DSMLoss``, Song et al. 2021, Eq. 7; ``ScoreLitModule.train_losses``, which
applies ``--channels-last`` / ``--compile``), optimizer (fused Adam + linear warm-up, built by
``ScoreLitModule.configure_optimizers``), gradient clipping (norm 1.0) and EMA update
(``ScoreLitModule.ema_update``); the Lightning variant also runs the NaN guard and logs to CSV every
25 steps, as train.py does. Both are timed the same way: one device synchronisation after the
warm-up steps and one after the last step. Repeats are interleaved (plain, lightning, plain, ...)
and the median img/s is reported, with the peak memory (``torch.cuda.max_memory_allocated`` on GPU;
the process's ``ru_maxrss`` high-water mark on CPU, which only grows, so the plain loop runs first)
and, on GPU, the model FLOP utilisation (FLOPs of one step counted by ``torch.utils.flop_counter``).

    python benchmarks/train_step.py --config cifar10_ddpmpp --batch-size 8 --steps 3 --warmup 1
    python benchmarks/train_step.py --config cifar10_ddpmpp --device cuda --batch-size 128 \
        --precision bf16-mixed --channels-last --compile --compile-mode max-autotune-no-cudagraphs
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import os
import resource
import statistics
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # this checkout's sgm_lightning, not an installed copy
CONFIGS = {  # name -> (net config file, data shape, default batch size, net overrides)
    "small": ("unet_small", (1, 16, 16), 64, {}),
    "cifar10_ddpmpp": ("ddpmpp_cifar10", (3, 32, 32), 8, {}),
    "ddpm_cifar10": ("ddpm_cifar10", (3, 32, 32), 8, {}),
    # DDPM++'s modules and parameter tensors (the same hooks, loops and kernel launches per step) at a
    # width and size where the arithmetic is negligible: a CPU proxy for the host time of a step
    "ddpmpp_host": ("ddpmpp_cifar10", (3, 16, 16), 1, {"base_channels": 16, "dropout": 0.0}),
}
# dense, per GPU (vendor data sheets); fp32 runs use TF32 tensor cores (cuDNN convolutions by default)
PEAK_TFLOPS = {"H100": {"bf16": 989.0, "tf32": 494.7}, "H200": {"bf16": 989.0, "tf32": 494.7},
               "A100": {"bf16": 312.0, "tf32": 156.0}}


def build_module(config: str, seed: int, compile: bool = False, compile_mode: str | None = None,
                 channels_last: bool = False):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from sgm_lightning.losses import DSMLoss
    from sgm_lightning.sde import VPSDE
    from sgm_lightning.training.lit_module import ScoreLitModule
    from sgm_lightning.training.optim import warmup_schedule

    net_name, shape, _, overrides = CONFIGS[config]
    net_cfg = OmegaConf.load(os.path.join(REPO, "configs", "net", f"{net_name}.yaml"))
    net_cfg.in_channels, net_cfg.image_size = shape[0], shape[1]
    for key, value in overrides.items():
        net_cfg[key] = value
    torch.manual_seed(seed)
    net = instantiate(net_cfg)
    sde = VPSDE()
    return ScoreLitModule(net=net, sde=sde, loss=DSMLoss(sde=sde), data_shape=shape,
                          optimizer=functools.partial(torch.optim.Adam, lr=2e-4),
                          lr_scheduler=functools.partial(warmup_schedule, warmup_steps=100), ema_decay=0.9999,
                          seed=seed, compile=compile, compile_mode=compile_mode, channels_last=channels_last), shape


def make_loader(shape, batch_size: int, num_batches: int, seed: int, device: str = "cpu"):
    """Synthetic images in [-1, 1]; pinned host memory for a GPU, as train.py's data modules do (a
    pageable host-to-device copy waits for the GPU's queue, a host sync every step)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((batch_size * num_batches, *shape), generator=g) * 2 - 1
    return torch.utils.data.DataLoader(list(x), batch_size=batch_size, shuffle=False, drop_last=True,
                                       pin_memory=device.startswith("cuda"))


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def lightning_trainer(args, callbacks=(), log_every_n_steps: int = 25, root_dir: str | None = None):
    """The Lightning variant's Trainer: train.py's hot-path callbacks (EMA, NaN guard) and CSV logging."""
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    from sgm_lightning.training.callbacks.ema import EMACallback
    from sgm_lightning.training.fault_tolerance import NaNGuard

    root_dir = root_dir or tempfile.mkdtemp(prefix="sgm_bench_")
    return L.Trainer(max_steps=args.warmup + args.steps, accelerator="gpu" if args.device.startswith("cuda") else "cpu",
                     devices=1, precision=args.precision, benchmark=torch.backends.cudnn.benchmark,
                     gradient_clip_val=1.0, log_every_n_steps=log_every_n_steps,
                     logger=CSVLogger(root_dir), default_root_dir=root_dir, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                     callbacks=[EMACallback(), NaNGuard(), *callbacks])


class CallCounter:
    """Python-level function calls (Python functions and C functions called from Python) between
    ``start()`` and ``stop()``: a deterministic measure of the host work of the timed steps, the
    same on any machine, where wall time on a busy 2-core CPU varies by +-30 %."""

    def __init__(self):
        self.calls = 0

    def _hook(self, frame, event, arg) -> None:
        if event in ("call", "c_call"):
            self.calls += 1

    def start(self) -> None:
        sys.setprofile(self._hook)

    def stop(self) -> None:
        sys.setprofile(None)


def run_lightning(template, shape, args, counter: CallCounter | None = None, cpu_ms: list | None = None) -> float:
    import lightning as L

    module = template  # one module for all runs: a compiled forward is compiled once
    times: list[float] = []
    thread_times: list[float] = []

    class Timer(L.Callback):  # one sync after the warm-up steps, one after the last step (as run_plain)
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == args.warmup:
                _sync(args.device)
                times.append(time.perf_counter())
                thread_times.append(time.thread_time())
                if counter is not None:
                    counter.start()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == args.warmup + args.steps - 1:
                if counter is not None:
                    counter.stop()
                thread_times.append(time.thread_time())
                _sync(args.device)
                times.append(time.perf_counter())

    trainer = lightning_trainer(args, callbacks=[Timer()])
    trainer.fit(module, make_loader(shape, args.batch_size, args.warmup + args.steps, args.seed, args.device))
    if cpu_ms is not None:
        cpu_ms.append((thread_times[1] - thread_times[0]) * 1e3 / args.steps)
    return args.steps * args.batch_size / (times[1] - times[0])


def run_plain(template, shape, args, counter: CallCounter | None = None, cpu_ms: list | None = None) -> float:
    module = template.to(args.device)
    module.configure_model()  # channels-last weights, compiled forward (Lightning calls it in fit)
    module.ema.to(module.device)
    conf = module.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    params = [p for p in module.score_model.parameters()]
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(args.precision)
    amp = torch.autocast(args.device.split(":")[0], dtype=dtype) if dtype else contextlib.nullcontext()
    scaler = torch.amp.GradScaler(args.device.split(":")[0]) if args.precision == "16-mixed" else None
    module.train()
    t0 = None
    for i, x in enumerate(make_loader(shape, args.batch_size, args.warmup + args.steps, args.seed, args.device)):
        if i == args.warmup:
            _sync(args.device)
            t0, c0 = time.perf_counter(), time.thread_time()
            if counter is not None:
                counter.start()
        x = x.to(args.device, non_blocking=True)
        with amp:
            loss = module.train_losses(x)[0].mean()
        opt.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)  # as on CUDA, on any device
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)  # as on CUDA, on any device
            scaler.step(opt)
            scaler.update()
        sched.step()
        module.ema_update()
    if counter is not None:
        counter.stop()
    if cpu_ms is not None:
        cpu_ms.append((time.thread_time() - c0) * 1e3 / args.steps)
    _sync(args.device)
    return args.steps * args.batch_size / (time.perf_counter() - t0)


def step_flops(template, shape, args) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    module = copy.deepcopy(template).to(args.device)
    x = torch.rand((args.batch_size, *shape), device=args.device) * 2 - 1
    with FlopCounterMode(display=False) as fc:
        module.loss_fn(module.score_model, x).mean().backward()
    return fc.get_total_flops()


def _peak_memory_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kb / 1024


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", choices=sorted(CONFIGS), default="small")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--steps", type=int, default=5, help="timed steps per repeat")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed", "16-mixed"])
    p.add_argument("--compile", action="store_true", help="torch.compile the network (model.compile)")
    p.add_argument("--compile-mode", default=None,
                   help="default | reduce-overhead | max-autotune | max-autotune-no-cudagraphs (model.compile_mode)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true",
                   help="then run profile_step.py's report on the same (already compiled) module")
    p.add_argument("--log-every", type=int, default=5, help="trainer.log_every_n_steps of the --profile run")
    p.add_argument("--no-cudnn-benchmark", action="store_true",
                   help="GPU: leave torch.backends.cudnn.benchmark off (trainer=gpu turns it on)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (CPU: 1 keeps all arithmetic on the main thread)")
    p.add_argument("--count-calls", action="store_true",
                   help="then run each variant once more, counting Python function calls per timed step")
    p.add_argument("--skip-profiler", action="store_true", help="--profile: only count ops and host syncs")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: table lookup)")
    args = p.parse_args(argv)
    args.batch_size = args.batch_size or CONFIGS[args.config][2]
    for name in ("batch_size", "steps", "repeats"):
        if getattr(args, name) < 1:
            raise SystemExit(f"Error: --{name.replace('_', '-')} must be >= 1")
    if args.warmup < 1:
        raise SystemExit("Error: --warmup must be >= 1 (the first step includes one-off set-up)")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("Error: --device cuda requested but no CUDA GPU is available; use --device cpu")

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    # both variants: cuDNN autotuning as configs/trainer/gpu.yaml sets it (the Trainer gets the same value)
    torch.backends.cudnn.benchmark = args.device.startswith("cuda") and not args.no_cudnn_benchmark
    template, shape = build_module(args.config, args.seed, compile=args.compile, compile_mode=args.compile_mode,
                                   channels_last=args.channels_last)
    nparams = sum(p.numel() for p in template.score_model.parameters())
    results = {"plain": [], "lightning": []}
    cpu_ms = {"plain": [], "lightning": []}  # main-thread CPU time per step (the host's share of a step)
    memory = {}
    for r in range(args.repeats):
        for name, fn in (("plain", run_plain), ("lightning", run_lightning)):
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            results[name].append(fn(template, shape, args, cpu_ms=cpu_ms[name]))
            memory[name] = max(memory.get(name, 0.0), _peak_memory_mb(args.device))
            print(f"  repeat {r}: {name:9s} {results[name][-1]:9.2f} img/s", file=sys.stderr, flush=True)
    med = {k: statistics.median(v) for k, v in results.items()}
    mem_label = "peak CUDA alloc MiB" if args.device.startswith("cuda") else "ru_maxrss MiB (cumulative)"
    print(f"\nconfig={args.config} params={nparams / 1e6:.2f}M batch={args.batch_size} device={args.device} "
          f"precision={args.precision} compile={args.compile} ({args.compile_mode or 'default'}) "
          f"channels_last={args.channels_last} "
          f"steps={args.steps}x{args.repeats} (warm-up {args.warmup})")
    header = f"{'variant':10s} {'img/s (median)':>15s} {'min':>9s} {'max':>9s} {mem_label:>27s}"
    extra = ""
    flops = None
    if args.device.startswith("cuda"):
        flops = step_flops(template, shape, args)
        name = torch.cuda.get_device_name()
        kind = "bf16" if args.precision != "32-true" else "tf32"
        peak = args.peak_tflops or next((v[kind] for k, v in PEAK_TFLOPS.items() if k in name), None)
        extra = f" {'TFLOP/s':>9s} {'MFU':>7s}"
    print(header + extra)
    for name in ("lightning", "plain"):
        line = f"{name:10s} {med[name]:15.2f} {min(results[name]):9.2f} {max(results[name]):9.2f} {memory[name]:27.0f}"
        if flops is not None:
            achieved = flops / args.batch_size * med[name] / 1e12
            line += f" {achieved:9.1f} {(achieved / peak if peak else float('nan')):7.1%}"
        print(line)
    paired = sorted(lt / pl for lt, pl in zip(results["lightning"], results["plain"]))
    print(f"lightning/plain ratio: {med['lightning'] / med['plain']:.3f} (goal >= 0.97); per repeat (each "
          f"Lightning run against the plain run just before it): median {statistics.median(paired):.3f}, "
          f"range {paired[0]:.3f}..{paired[-1]:.3f}")
    cpu = {k: statistics.median(v) for k, v in cpu_ms.items()}
    print(f"main-thread CPU ms per step (median): lightning {cpu['lightning']:.2f}, plain {cpu['plain']:.2f}, "
          f"Lightning's extra host time {cpu['lightning'] - cpu['plain']:.2f} ms per step"
          + (" (on CPU this thread also does arithmetic, unless --threads 1 makes it do all of it)"
             if not args.device.startswith("cuda") else ""))
    if flops is not None:
        print(f"FLOPs per training step (fwd+bwd, batch {args.batch_size}): {flops / 1e12:.3f} TFLOP")
    if args.count_calls:
        calls = {}
        for name, fn in (("plain", run_plain), ("lightning", run_lightning)):
            counter = CallCounter()
            fn(template, shape, args, counter=counter)
            calls[name] = counter.calls / args.steps
        print(f"Python function calls per step: lightning {calls['lightning']:.0f}, plain {calls['plain']:.0f} "
              f"(Lightning's extra host work: {calls['lightning'] - calls['plain']:.0f} calls per step)")
    if args.profile:
        import profile_step
        print(flush=True)
        profile_step.run(template, shape, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
