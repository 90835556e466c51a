"""Where a Lightning training step spends its time: one configuration of ``train_step.py``, profiled.

Prints, per step after the warm-up:

* the wall time, and on GPU the kernel time (union of kernel intervals), the GPU-busy share
  (kernel time / wall) and the number of kernels;
* the number of aten ops dispatched and of host syncs (``.item()`` / ``bool(tensor)`` / ``.tolist()``,
  device-to-host copies and data-dependent shapes such as ``nonzero`` / ``unique``), step by step, so
  that logging steps (every ``--log-every``) and the others can be told apart;
* the time shares by kernel family (GPU) or aten-op family (CPU).

    python benchmarks/profile_step.py --config small --device cpu --steps 8 --log-every 4
    python benchmarks/profile_step.py --config cifar10_ddpmpp --device cuda --batch-size 128 \\
        --precision bf16-mixed --channels-last --compile
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sys
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_step  # noqa: E402  (also puts this checkout on sys.path)

# aten ops that make the host wait for the device (or would, on a GPU): reading a value, a
# device-to-host copy, or an output whose shape depends on the data.
_SYNC_OPS = {"_local_scalar_dense", "nonzero", "_unique2", "unique_dim", "unique_consecutive", "masked_select",
             "repeat_interleave"}
FAMILIES = [  # (family, regex on the kernel / op name); the first match wins
    ("gemm/conv", r"gemm|conv|cutlass|xmma|nvjet|cudnn|implicit_convolve|wgrad|dgrad|fprop|\baddmm|\bmm\b|bmm|matmul|linear"),
    ("NCHW<->NHWC transpose", r"nchwToNhwc|nhwcToNchw|[Tt]ranspose"),
    ("group/layer norm", r"group_norm|GroupNorm|layer_norm|LayerNorm|welford|Welford|RowwiseMoments|ComputeFused|native_batch_norm"),
    ("optimizer/foreach", r"multi_tensor|foreach|fused_adam|FusedAdam|_fused_adam|adam"),
    ("dtype cast/copy", r"copy|[Cc]ast|_to_copy|CatArrayBatchedCopy"),
    ("fused (triton) elementwise", r"triton_poi"),
    ("fused (triton) reduction", r"triton_(red|per)"),
    ("reduction", r"[Rr]educe|sum|mean|norm|softmax"),
    ("elementwise", r"elementwise|vectorized|unrolled|Elementwise|mul|add|sub|div|silu|sigmoid|exp|where|pow|sqrt|rand|lerp"),
]


def family(name: str) -> str:
    return next((f for f, pattern in FAMILIES if re.search(pattern, name)), "other")


class OpCounter(TorchDispatchMode):
    """Counts aten ops and host syncs, per ``self.step`` (set it from outside)."""

    def __init__(self):
        super().__init__()
        self.step = -1
        self.ops: collections.Counter = collections.Counter()
        self.syncs: collections.Counter = collections.Counter()
        self.sync_names: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
        self._patched = {}

    def _sync(self, name: str) -> None:
        self.syncs[self.step] += 1
        self.sync_names[self.step][name] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        self.ops[self.step] += 1
        index_is_bool = name == "index" and any(
            t is not None and t.dtype == torch.bool for t in (args[1] if len(args) > 1 else ()))
        if name in _SYNC_OPS or index_is_bool:
            self._sync(name)
        elif name in ("_to_copy", "copy_") and args and isinstance(args[0], torch.Tensor):
            src = args[1] if name == "copy_" else args[0]
            dst_cpu = (kwargs.get("device") is not None and torch.device(kwargs["device"]).type == "cpu") \
                if name == "_to_copy" else args[0].device.type == "cpu"
            if src.device.type != "cpu" and dst_cpu:
                self._sync(f"{name} to cpu")
        return func(*args, **kwargs)

    def __enter__(self):  # .tolist() / .numpy() of a CPU tensor dispatch no op: count them here
        for attr in ("tolist", "numpy"):
            orig = getattr(torch.Tensor, attr)
            self._patched[attr] = orig

            def wrapper(t, *a, _orig=orig, _name=attr, **k):
                self._sync(_name)
                return _orig(t, *a, **k)
            setattr(torch.Tensor, attr, wrapper)
        return super().__enter__()

    def __exit__(self, *exc):
        for attr, orig in self._patched.items():
            setattr(torch.Tensor, attr, orig)
        self._patched = {}
        return super().__exit__(*exc)


def count_ops(template, shape, args) -> OpCounter:
    """aten ops and host syncs of each step of a Lightning run (the counter sees every hook)."""
    import lightning as L

    counter = OpCounter()

    class Stamp(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            counter.step = trainer.global_step

    trainer = train_step.lightning_trainer(args, callbacks=[Stamp()], log_every_n_steps=args.log_every)
    with counter:
        trainer.fit(template, train_step.make_loader(shape, args.batch_size, args.warmup + args.steps, args.seed))
    return counter


def profile(template, shape, args):
    """torch.profiler over the steps after the warm-up: (wall s/step, events)."""
    import lightning as L
    from torch.profiler import ProfilerActivity

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
    prof = torch.profiler.profile(activities=activities)
    wall = []

    class Window(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == args.warmup:
                train_step._sync(args.device)
                prof.__enter__()
                wall.append(time.perf_counter())

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == args.warmup + args.steps - 1:
                train_step._sync(args.device)
                wall.append(time.perf_counter())
                prof.__exit__(None, None, None)

    trainer = train_step.lightning_trainer(args, callbacks=[Window()], log_every_n_steps=args.log_every)
    trainer.fit(template, train_step.make_loader(shape, args.batch_size, args.warmup + args.steps, args.seed))
    return (wall[1] - wall[0]) / args.steps, prof


def _union_us(intervals) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def report_profile(prof, wall: float, args) -> None:
    n = args.steps
    print(f"wall time per step: {wall * 1e3:.1f} ms")
    if args.device.startswith("cuda"):
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        busy = _union_us([(e.time_range.start, e.time_range.end) for e in kernels]) / 1e3 / n
        print(f"GPU kernel time per step: {busy:.1f} ms; GPU busy {busy / (wall * 1e3):.1%} of the wall time")
        print(f"kernels per step: {len(kernels) / n:.0f}")
        by_family = collections.Counter()
        for e in kernels:
            by_family[family(e.name)] += e.time_range.end - e.time_range.start
        unit = "kernel time"
    else:
        by_family = collections.Counter()
        for e in prof.key_averages():
            if e.key.startswith("aten::"):
                by_family[family(e.key[6:])] += e.self_cpu_time_total
        unit = "aten self CPU time"
    total = sum(by_family.values()) or 1.0
    print(f"time shares by family ({unit}):")
    for name, t in by_family.most_common():
        print(f"  {name:28s} {t / total:6.1%}  ({t / 1e3 / n:8.2f} ms/step)")


def run(template, shape, args) -> None:
    """Profile (unless ``args.skip_profiler``) and count ops / host syncs of ``template``'s Lightning steps."""
    print(f"config={args.config} batch={args.batch_size} device={args.device} precision={args.precision} "
          f"compile={args.compile} ({args.compile_mode or 'default'}) channels_last={args.channels_last} "
          f"steps={args.steps} after {args.warmup} warm-up, log every {args.log_every}", flush=True)
    if not args.skip_profiler:  # first: compiles, so that the counted run below sees the steady state
        wall, prof = profile(template, shape, args)
        report_profile(prof, wall, args)
    counter = count_ops(template, shape, args)
    steps = range(args.warmup, args.warmup + args.steps)
    logging = [s for s in steps if (s + 1) % args.log_every == 0]
    quiet = [s for s in steps if s not in logging]
    print("per step (global step: aten ops / host syncs):")
    print("  " + "  ".join(f"{s}:{counter.ops[s]}/{counter.syncs[s]}" + ("(log)" if s in logging else "") for s in steps))
    for name, group in (("non-logging", quiet), ("logging", logging)):
        if group:
            print(f"{name} steps: {sum(counter.ops[s] for s in group) / len(group):.0f} aten ops, "
                  f"{sum(counter.syncs[s] for s in group) / len(group):.1f} host syncs per step")
    if logging:
        print(f"host syncs on logging step {logging[0]}: {dict(counter.sync_names[logging[0]])}")
    if quiet:
        print(f"host syncs on non-logging step {quiet[-1]}: {dict(counter.sync_names[quiet[-1]])}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", choices=sorted(train_step.CONFIGS), default="small")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--steps", type=int, default=8, help="profiled steps after the warm-up")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--log-every", type=int, default=4, help="trainer.log_every_n_steps")
    p.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed", "16-mixed"])
    p.add_argument("--compile", action="store_true")
    p.add_argument("--compile-mode", default=None)
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-profiler", action="store_true", help="only count ops and host syncs")
    args = p.parse_args(argv)
    args.batch_size = args.batch_size or train_step.CONFIGS[args.config][2]
    if min(args.steps, args.warmup, args.log_every, args.batch_size) < 1:
        raise SystemExit("Error: --steps, --warmup, --log-every and --batch-size must be >= 1")
    template, shape = train_step.build_module(args.config, args.seed, compile=args.compile,
                                              compile_mode=args.compile_mode, channels_last=args.channels_last)
    run(template, shape, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
