"""Training-step throughput: Lightning (``ScoreLitModule`` + ``Trainer``) vs. a hand-written PyTorch loop.

Both variants train the same network (same initial weights), on the same synthetic data in [-1, 1],
with the same loss (``DSMLoss``, Song et al. 2021, Eq. 7), optimizer (Adam + linear warm-up, built
by ``ScoreLitModule.configure_optimizers``), gradient clipping (norm 1.0) and EMA update
(``ScoreLitModule.ema_update``). Repeats are interleaved (lightning, plain, lightning, ...) and the
median img/s is reported, with the peak memory (``torch.cuda.max_memory_allocated`` on GPU; the
process's ``ru_maxrss`` high-water mark on CPU, which only grows, so the plain loop runs first) and,
on GPU, the model FLOP utilisation (FLOPs of one step counted by ``torch.utils.flop_counter``).

    python benchmarks/train_step.py --config cifar10_ddpmpp --batch-size 8 --steps 3 --warmup 1
    python benchmarks/train_step.py --config cifar10_ddpmpp --device cuda --batch-size 128 \
        --precision bf16-mixed --channels-last --compile
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import resource
import statistics
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {  # name -> (net config file, data shape, default batch size)
    "small": ("unet_small", (1, 16, 16), 64),
    "cifar10_ddpmpp": ("ddpmpp_cifar10", (3, 32, 32), 8),
}
PEAK_TFLOPS = {"H100": {"bf16": 989.0, "fp32": 67.0}, "H200": {"bf16": 989.0, "fp32": 67.0},
               "A100": {"bf16": 312.0, "fp32": 19.5}}  # dense, per GPU (vendor data sheets)


def build_module(config: str, seed: int):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from sgm_lightning.training.lit_module import ScoreLitModule
    from sgm_lightning.losses import DSMLoss
    from sgm_lightning.sde import VPSDE

    net_name, shape, _ = CONFIGS[config]
    net_cfg = OmegaConf.load(os.path.join(REPO, "configs", "net", f"{net_name}.yaml"))
    net_cfg.in_channels, net_cfg.image_size = shape[0], shape[1]
    torch.manual_seed(seed)
    net = instantiate(net_cfg)
    sde = VPSDE()
    return ScoreLitModule(net=net, sde=sde, loss=DSMLoss(sde=sde), data_shape=shape, lr=2e-4, warmup_steps=100,
                          ema_decay=0.9999, seed=seed), shape


def make_loader(shape, batch_size: int, num_batches: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((batch_size * num_batches, *shape), generator=g) * 2 - 1
    return torch.utils.data.DataLoader(list(x), batch_size=batch_size, shuffle=False, drop_last=True)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _prepare(module, args):
    if args.channels_last:
        module.score_model.to(memory_format=torch.channels_last)
    if args.compile:
        module.score_model.net = torch.compile(module.score_model.net)
    return module


def run_lightning(template, shape, args) -> float:
    import lightning as L

    from sgm_lightning.training.callbacks.ema import EMACallback

    module = _prepare(copy.deepcopy(template), args)
    times: list[float] = []

    class Timer(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            _sync(args.device)
            times.append(time.perf_counter())

    trainer = L.Trainer(max_steps=args.warmup + args.steps, accelerator="gpu" if args.device.startswith("cuda") else "cpu",
                        devices=1, precision=args.precision, gradient_clip_val=1.0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[EMACallback(), Timer()], num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, make_loader(shape, args.batch_size, args.warmup + args.steps, args.seed))
    dt = times[-1] - times[args.warmup - 1] if args.warmup > 0 else times[-1] - times[0]
    n = args.steps if args.warmup > 0 else args.steps - 1
    return n * args.batch_size / dt


def run_plain(template, shape, args) -> float:
    module = _prepare(copy.deepcopy(template), args).to(args.device)
    module.ema.to(module.device)
    conf = module.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    params = [p for p in module.score_model.parameters()]
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(args.precision)
    amp = torch.autocast(args.device.split(":")[0], dtype=dtype) if dtype else contextlib.nullcontext()
    module.train()
    t0 = None
    for i, x in enumerate(make_loader(shape, args.batch_size, args.warmup + args.steps, args.seed)):
        if i == args.warmup:
            _sync(args.device)
            t0 = time.perf_counter()
        x = x.to(args.device, non_blocking=True)
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with amp:
            loss = module.loss_fn(module.score_model, x, generator=gen).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        module.ema_update()
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
    p.add_argument("--compile", action="store_true")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
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

    template, shape = build_module(args.config, args.seed)
    nparams = sum(p.numel() for p in template.score_model.parameters())
    results = {"plain": [], "lightning": []}
    memory = {}
    for r in range(args.repeats):
        for name, fn in (("plain", run_plain), ("lightning", run_lightning)):
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            results[name].append(fn(template, shape, args))
            memory[name] = max(memory.get(name, 0.0), _peak_memory_mb(args.device))
            print(f"  repeat {r}: {name:9s} {results[name][-1]:9.2f} img/s", file=sys.stderr, flush=True)
    med = {k: statistics.median(v) for k, v in results.items()}
    mem_label = "peak CUDA alloc MiB" if args.device.startswith("cuda") else "ru_maxrss MiB (cumulative)"
    print(f"\nconfig={args.config} params={nparams / 1e6:.2f}M batch={args.batch_size} device={args.device} "
          f"precision={args.precision} compile={args.compile} channels_last={args.channels_last} "
          f"steps={args.steps}x{args.repeats} (warm-up {args.warmup})")
    header = f"{'variant':10s} {'img/s (median)':>15s} {'min':>9s} {'max':>9s} {mem_label:>27s}"
    extra = ""
    flops = None
    if args.device.startswith("cuda"):
        flops = step_flops(template, shape, args)
        name = torch.cuda.get_device_name()
        kind = "bf16" if args.precision != "32-true" else "fp32"
        peak = args.peak_tflops or next((v[kind] for k, v in PEAK_TFLOPS.items() if k in name), None)
        extra = f" {'TFLOP/s':>9s} {'MFU':>7s}"
    print(header + extra)
    for name in ("lightning", "plain"):
        line = f"{name:10s} {med[name]:15.2f} {min(results[name]):9.2f} {max(results[name]):9.2f} {memory[name]:27.0f}"
        if flops is not None:
            achieved = flops / args.batch_size * med[name] / 1e12
            line += f" {achieved:9.1f} {(achieved / peak if peak else float('nan')):7.1%}"
        print(line)
    print(f"lightning/plain ratio: {med['lightning'] / med['plain']:.3f} (goal >= 0.97)")
    if flops is not None:
        print(f"FLOPs per training step (fwd+bwd, batch {args.batch_size}): {flops / 1e12:.3f} TFLOP")
    return 0


if __name__ == "__main__":
    sys.exit(main())
