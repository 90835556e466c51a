"""Where a Lightning training step spends its time: one configuration of ``train_step.py``, profiled.

The profiled window is the ``--steps`` steps after ``--warmup`` warm-up steps; a *logging step* is one
where the trainer logs, ``(global_step + 1) % --log-every == 0``. Prints, per step of that window:

* ``wall time per step``: ``time.perf_counter`` between a device synchronisation before the first
  profiled step and one after the last, divided by the steps; ``host span per step``: the same time
  split into non-logging and logging steps, from a zero-length profiler marker (``profile_step#N``)
  recorded when each step starts (a step's span runs to the next step's marker);
* on GPU, from the profiler's device records, of which only device *work* counts -- kernels, and
  memcpy / memset as their own family. Device-side user-annotation ranges (``record_function`` ranges,
  e.g. inductor's "## Call CompiledFxGraph ##" or "CompiledFunction", which span many kernels and the
  idle gaps between them) and other records that are not work are dropped (:func:`device_records`):

  - ``GPU kernel time per step``: the summed durations of that work / steps (work on concurrent
    streams adds up); ``GPU busy``: the union of its intervals / steps, as a share of the wall time;
  - ``GPU idle per step``: wall minus busy; and per non-logging / logging step: each step's host span
    minus the union of the device intervals clipped to that span (work that one step queues and that
    runs during the next step's span counts for the later step);
  - ``kernels per step``, plus memcpy / memset, and the number of annotation ranges left out;
  - host side: CPU time and calls per step in CUDA launch APIs (``cudaLaunchKernel``, ``cuLaunchKernel``,
    ``cuLaunchKernelEx``, ``cudaLaunchKernelExC``, ``cudaGraphLaunch``, ...) and in synchronising APIs
    (``cudaStreamSynchronize``, ``cudaDeviceSynchronize``, ``cudaEventSynchronize``, blocking
    ``cudaMemcpy``, ...), see :func:`host_api_kind`; the synchronising ones split by step kind;
  - one verdict line, host-bound or device-bound, by the rule of :func:`verdict`;
* the time shares by family (:func:`family`): on GPU of the summed kernel durations, on CPU of the
  aten ops' self CPU time (inductor's compiled CPU code runs no aten op and is not in that table); a
  family's ms/step is its summed time / steps, so the rows add up to the total;
* from a second, unprofiled run: the number of aten ops dispatched and of host syncs (``.item()`` /
  ``bool(tensor)`` / ``.tolist()``, device-to-host copies and data-dependent shapes such as
  ``nonzero`` / ``unique``), step by step, so that logging steps and the others can be told apart.

The profiler costs host time of its own (a CUPTI callback per CUDA API call, a record per aten op):
the wall time and the launch API times here are upper bounds, and a profiled step leans further to
host-bound than an unprofiled one; compare the wall time with ``train_step.py``'s img/s.

    python benchmarks/profile_step.py --config small --device cpu --steps 8 --log-every 4
    python benchmarks/profile_step.py --config cifar10_ddpmpp --device cuda --batch-size 128 \\
        --precision bf16-mixed --channels-last --compile
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import os
import re
import sys
import time
from typing import Iterable, NamedTuple, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_step  # noqa: E402  (also puts this checkout on sys.path)

# aten ops that make the host wait for the device (or would, on a GPU): reading a value, a
# device-to-host copy, or an output whose shape depends on the data.
_SYNC_OPS = {"_local_scalar_dense", "nonzero", "_unique2", "unique_dim", "unique_consecutive", "masked_select",
             "repeat_interleave"}

# ----------------------------------------------------------------------------- kernel / op families
# (family, regex searched in the name); the first match wins. The names are CUDA kernel / CUPTI record
# names (GPU) or aten op names without "aten::" (CPU); patterns anchored with ^...$ are aten names.
FAMILIES = [
    # inductor's generated kernels first: their names list the aten ops they fuse ("convolution",
    # "native_group_norm", "_to_copy", ...), which would match the op families below
    ("fused (triton) pointwise", r"^triton_poi_"),
    ("fused (triton) reduction", r"^triton_(red|per)_"),  # red: looped reduction, per: persistent
    ("gemm/conv", r"^triton_tem_"),  # inductor's matmul / convolution templates (max-autotune)
    ("fused (triton) other", r"^triton_"),
    # CUPTI's records of copies and fills ("Memcpy HtoD (Pageable -> Device)", "Memset (Device)")
    ("memcpy/memset", r"^(Memcpy|Memset|memcpy|memset)\b"),
    # aten ops that move no data on the device: views, allocation, dispatch wrappers (host time only)
    ("view/alloc (host only)",
     r"^(view|_unsafe_view|view_as|reshape|_reshape_alias|expand|expand_as|as_strided|permute|transpose|t|"
     r"unsqueeze|squeeze|slice|select|narrow|split|split_with_sizes|chunk|unbind|flatten|unflatten|detach|"
     r"alias|lift_fresh|empty|empty_strided|empty_like|resize_|to|contiguous|set_)$"),
    # before gemm/conv: cuDNN's fused attention kernels are named "cudnn_..._sdpa_..._fprop_..."
    ("attention", r"flash_fwd|flash_bwd|pytorch_flash|flash_attn|fmha|sdpa|attention"),
    # before gemm/conv: cuDNN's layout transposes are "cudnn::ops::nchwToNhwcKernel"
    ("NCHW<->NHWC transpose", r"nchwToNhwc|nhwcToNchw|^(?!.*conv).*[Tt]ranspose"),
    # before gemm/conv: cuDNN's batch norm kernels are "cudnn::bn_fw_..."; the GroupNorm lambdas
    # inside at::native elementwise kernels name their op
    ("norm layers (group/layer/batch)",
     r"group_norm|GroupNorm|layer_norm|LayerNorm|batch_?norm|BatchNorm|\bbn_(fw|bw)|[Ww]elford|RowwiseMoments|"
     r"ComputeFused|Compute1dBackwardFused|ComputeBackwardFused|GammaBetaBackward|ComputeInternalGradients|"
     r"ComputeGradOutputCoeffs"),
    # cuBLAS (nvjet_*, sm90_xmma_*, ampere_*gemm*, cutlass*, splitKreduce_kernel), cuDNN, and the aten ops
    ("gemm/conv",
     r"gemm|GEMM|conv|Conv|cutlass|xmma|nvjet|cudnn|cublas|splitKreduce|wgrad|dgrad|fprop|"
     r"^(addmm|mm|bmm|baddbmm|matmul|linear)$"),
    # multi-tensor (foreach) kernels: fused Adam, the EMA's lerp, clip_grad_norm's norms
    ("optimizer/foreach", r"multi_tensor|foreach|[Ff]used_?[Aa]dam|_fused_adam|adam"),
    ("RNG (rand/normal/dropout)",
     r"^(rand|randn|randint|rand_like|randn_like|normal|normal_|uniform_|bernoulli|bernoulli_|native_dropout|"
     r"dropout)$|distribution_|philox|curand|fused_dropout"),
    ("dtype cast/copy", r"copy|Copy|^(cat|stack|clone)$"),
    ("pool/upsample", r"upsample|[Pp]ool"),
    ("reduction",
     r"reduce_kernel|[Rr]educe|[Ss]oft[Mm]ax|^(sum|mean|norm|linalg_vector_norm|amax|amin|max|min|argmax|argmin|"
     r"std|var|var_mean|std_mean|prod|cumsum|logsumexp|all|any)$"),
    ("elementwise",
     r"elementwise|^(abs|add|addcdiv|addcmul|bitwise|clamp|cos|div|eq|exp|fill|full|ge|gelu|gt|isfinite|isnan|"
     r"le|lerp|log|logical|lt|masked_fill|maximum|minimum|mul|ne|neg|ones|pow|reciprocal|relu|rsqrt|rsub|"
     r"scalar_tensor|sigmoid|silu|sin|sqrt|sub|tanh|threshold|where|zero|zeros)(_\w*)?$"),
]
_FAMILY_RES = [(name, re.compile(pattern)) for name, pattern in FAMILIES]


@functools.lru_cache(maxsize=None)  # a profile repeats a few hundred names thousands of times
def family(name: str) -> str:
    """The family of a CUDA kernel / CUPTI record name, or of an aten op name without "aten::":
    the first entry of ``FAMILIES`` whose regex is found in it, else "other"."""
    return next((f for f, pattern in _FAMILY_RES if pattern.search(name)), "other")


# ----------------------------------------------------------------------------- device records
class DeviceRecord(NamedTuple):
    """One device-side profiler record: its name, start and end (microseconds, profiler clock) and
    whether it is an annotation (a range over other records, not device work of its own)."""
    name: str
    start_us: float
    end_us: float
    is_annotation: bool


# kineto activity types of device-side records that are not work: record_function ranges mirrored on
# the GPU timeline, CUDA synchronisation records, cudaProfilerStart/Stop ranges
_NOT_WORK_ACTIVITIES = {"gpu_user_annotation", "user_annotation", "cuda_sync", "cuda_profiler_range", "overhead"}


def device_records(events: Iterable) -> list[DeviceRecord]:
    """The device-side (non-CPU) records among profiler events (``FunctionEvent``-like: ``name``,
    ``device_type``, ``time_range``), with ``is_annotation`` set for those that are not device work:
    ``is_user_annotation`` (read with a default of False, older torch has no such attribute) or, where
    the event reports its kineto ``activity_type``, a type that is an annotation or a sync record.
    Kernels, memcpy and memset records are work."""
    cpu = torch.autograd.DeviceType.CPU
    out = []
    for e in events:
        if getattr(e, "device_type", cpu) == cpu:
            continue
        activity = getattr(e, "activity_type", None) or ""
        not_work = bool(getattr(e, "is_user_annotation", False)) or activity in _NOT_WORK_ACTIVITIES \
            or "annotation" in activity
        out.append(DeviceRecord(e.name, float(e.time_range.start), float(e.time_range.end), not_work))
    return out


def kernel_events(records: Iterable[Sequence]) -> list[DeviceRecord]:
    """The device work among ``(name, start_us, end_us, is_annotation)`` records: kernels and
    memcpy / memset, without the annotation ranges."""
    return [DeviceRecord(*r) for r in records if not r[3]]


def _union_us(intervals) -> float:
    """Length of the union of ``(start, end)`` intervals (overlaps count once)."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def _clip(intervals, lo: float, hi: float) -> list[tuple[float, float]]:
    """The parts of ``intervals`` inside ``[lo, hi]``."""
    return [(max(a, lo), min(b, hi)) for a, b in intervals if b > lo and a < hi]


@dataclasses.dataclass
class DeviceSummary:
    """Per-step device figures of a profiled window (times in ms per step); see :func:`summarize_device`."""
    steps: int
    wall_ms: float  # wall time per step
    kernel_ms: float  # summed durations of the device work / steps
    busy_ms: float  # union of the work's intervals / steps
    idle_ms: float  # wall_ms - busy_ms (>= 0)
    kernels: float  # kernels per step (work records other than memcpy / memset)
    copies: float  # memcpy / memset records per step
    annotations: float  # annotation records per step, left out of everything above
    families: list[tuple[str, float, float]]  # (family, share of kernel_ms, ms/step), largest first
    # per step kind ("non-logging", "logging"): (host span ms/step, device idle ms/step within the spans)
    by_kind: dict[str, tuple[float, float]]


def step_kinds(spans: dict[int, tuple[float, float]], logging_steps) -> dict[str, list[int]]:
    """The steps of ``spans`` grouped as "non-logging" / "logging" (only non-empty groups)."""
    logging_steps = set(logging_steps)
    groups = {"non-logging": [s for s in sorted(spans) if s not in logging_steps],
              "logging": [s for s in sorted(spans) if s in logging_steps]}
    return {k: v for k, v in groups.items() if v}


def summarize_device(records: Iterable[Sequence], steps: int, wall_s: float,
                     spans: dict[int, tuple[float, float]] | None = None, logging_steps=()) -> DeviceSummary:
    """Per-step figures of ``(name, start_us, end_us, is_annotation)`` records over ``steps`` steps that
    took ``wall_s`` seconds in all. Only the work (:func:`kernel_events`) counts: kernel time is the
    summed durations / steps, busy time the union of the intervals / steps (an annotation spanning
    kernels and the gaps between them adds nothing), idle = wall - busy. Family shares are of the
    summed durations and a family's ms/step is its summed duration / steps. With ``spans`` (step ->
    host ``(start_us, end_us)``), ``by_kind`` gives each step kind's mean span and mean device idle
    time within its spans."""
    records = list(records)
    work = kernel_events(records)
    intervals = [(r.start_us, r.end_us) for r in work]
    summed_us = sum(b - a for a, b in intervals)
    busy_ms = _union_us(intervals) / 1e3 / steps
    wall_ms = wall_s * 1e3 / steps
    by_family: collections.Counter = collections.Counter()
    for r in work:
        by_family[family(r.name)] += r.end_us - r.start_us
    families = [(f, t / summed_us if summed_us else 0.0, t / 1e3 / steps) for f, t in by_family.most_common()]
    copies = sum(1 for r in work if family(r.name) == "memcpy/memset")
    by_kind = {}
    for kind, group in step_kinds(spans or {}, logging_steps).items():
        span_us = sum(spans[s][1] - spans[s][0] for s in group)
        busy_us = sum(_union_us(_clip(intervals, *spans[s])) for s in group)
        by_kind[kind] = (span_us / 1e3 / len(group), (span_us - busy_us) / 1e3 / len(group))
    return DeviceSummary(steps=steps, wall_ms=wall_ms, kernel_ms=summed_us / 1e3 / steps, busy_ms=busy_ms,
                         idle_ms=max(wall_ms - busy_ms, 0.0), kernels=(len(work) - copies) / steps,
                         copies=copies / steps, annotations=(len(records) - len(work)) / steps,
                         families=families, by_kind=by_kind)


# ----------------------------------------------------------------------------- host side
_API_SUFFIX = r"(_v\d+|_ptsz|_ptds)*$"  # CUPTI's versioned / per-thread-stream API names
_LAUNCH_API = re.compile(r"^(cudaLaunchKernel|cudaLaunchKernelExC|cudaLaunchCooperativeKernel|cudaGraphLaunch|"
                         r"cuLaunchKernel|cuLaunchKernelEx|cuLaunchCooperativeKernel|cuGraphLaunch)" + _API_SUFFIX)
_SYNC_API = re.compile(r"^(cudaStreamSynchronize|cudaDeviceSynchronize|cudaEventSynchronize|cudaMemcpy|cudaMemcpy2D|"
                       r"cudaMemcpy3D|cudaMemcpyToSymbol|cudaMemcpyFromSymbol|cuStreamSynchronize|cuCtxSynchronize|"
                       r"cuEventSynchronize|cuMemcpy|cuMemcpyDtoH|cuMemcpyHtoD)" + _API_SUFFIX)


def host_api_kind(name: str) -> str | None:
    """"launch" for a CUDA runtime / driver call that launches work (a kernel or a CUDA graph), "sync"
    for one that blocks the host until the device (or a stream / event) is done, including the blocking
    ``cudaMemcpy`` (not ``cudaMemcpyAsync``); None for anything else."""
    if _LAUNCH_API.match(name):
        return "launch"
    if _SYNC_API.match(name):
        return "sync"
    return None


class HostCall(NamedTuple):
    """One CUDA API call on the host: name, "launch" / "sync", start and end (us), thread."""
    name: str
    kind: str
    start_us: float
    end_us: float
    thread: int = 0


def host_calls(events: Iterable) -> list[HostCall]:
    """The launch and sync API calls among profiler events (CPU-side runtime / driver records)."""
    cpu = torch.autograd.DeviceType.CPU
    out = []
    for e in events:
        kind = host_api_kind(e.name) if getattr(e, "device_type", cpu) == cpu else None
        if kind:
            out.append(HostCall(e.name, kind, float(e.time_range.start), float(e.time_range.end),
                                int(getattr(e, "thread", 0) or 0)))
    return out


STEP_MARKER = "profile_step#"  # + global step, or "end" after the last profiled step


def step_spans(markers: Iterable[tuple[str, float]]) -> dict[int, tuple[float, float]]:
    """Host span of each step, from ``(name, start_us)`` markers ``profile_step#<global step>`` (set when
    a step starts) and ``profile_step#end`` (after the last): a step runs from its marker to the next."""
    ordered = sorted((t, name[len(STEP_MARKER):]) for name, t in markers if name.startswith(STEP_MARKER))
    return {int(tag): (t, t_next) for (t, tag), (t_next, _) in zip(ordered, ordered[1:]) if tag != "end"}


@dataclasses.dataclass
class HostSummary:
    """Per-step CUDA API figures (CPU ms and calls per step); see :func:`summarize_host`."""
    launch_calls: float
    launch_ms: float
    sync_calls: float
    sync_ms: float
    launch_names: dict[str, float]  # calls per step by API name
    sync_names: dict[str, float]
    by_kind: dict[str, tuple[float, float]]  # step kind -> (sync calls/step, sync ms/step)


def _outermost(calls: list[HostCall]) -> list[HostCall]:
    """The calls not nested in an earlier call of the same kind on the same thread (a runtime call that
    the profiler also records as the driver call it makes is counted once)."""
    out, open_end = [], {}
    for c in sorted(calls, key=lambda c: (c.start_us, -c.end_us)):
        key = (c.kind, c.thread)
        if c.end_us <= open_end.get(key, float("-inf")):
            continue
        out.append(c)
        open_end[key] = c.end_us
    return out


def summarize_host(calls: Iterable[HostCall], steps: int, spans: dict[int, tuple[float, float]] | None = None,
                   logging_steps=()) -> HostSummary:
    """Calls and CPU time per step of the launch and of the synchronising CUDA APIs (nested calls of one
    kind count once, :func:`_outermost`); with ``spans``, the sync figures per step kind, each call
    attributed to the step whose host span contains its start."""
    calls = _outermost(list(calls))
    launch = [c for c in calls if c.kind == "launch"]
    sync = [c for c in calls if c.kind == "sync"]

    def per_step(cs, n=steps):
        return len(cs) / n, sum(c.end_us - c.start_us for c in cs) / 1e3 / n

    by_kind = {}
    for kind, group in step_kinds(spans or {}, logging_steps).items():
        mine = [c for c in sync if any(spans[s][0] <= c.start_us < spans[s][1] for s in group)]
        by_kind[kind] = per_step(mine, len(group))
    return HostSummary(*per_step(launch), *per_step(sync),
                       launch_names={k: v / steps for k, v in collections.Counter(c.name for c in launch).items()},
                       sync_names={k: v / steps for k, v in collections.Counter(c.name for c in sync).items()},
                       by_kind=by_kind)


IDLE_THRESHOLD = 0.10  # GPU idle share of a step above which a step is called host-bound


def verdict(device: DeviceSummary, host: HostSummary) -> str:
    """One line: is a GPU step host-bound? Judged on the non-logging steps (all steps when the step
    spans are unknown), which are the steady state:

    * idle share = device idle time / host span of those steps;
    * idle share < ``IDLE_THRESHOLD`` (10 %): "device-bound" -- the host keeps the device queue fed;
    * otherwise, with no synchronising API call on those steps: "host-bound" -- the device waits for
      work that the host has not launched yet (launch API time is printed beside it, but Python and
      dispatch overhead between launches count too);
    * otherwise: "host-bound with syncs" -- the steps also block the host on the device, after which the
      queue is empty and the device idles until the host launches again.
    """
    if "non-logging" in device.by_kind:
        span_ms, idle_ms = device.by_kind["non-logging"]
        sync_calls, sync_ms = host.by_kind.get("non-logging", (0.0, 0.0))
        where = "non-logging steps"
    else:
        span_ms, idle_ms, sync_calls, sync_ms, where = device.wall_ms, device.idle_ms, host.sync_calls, host.sync_ms, \
            "all steps"
    share = idle_ms / span_ms if span_ms > 0 else 0.0
    if share < IDLE_THRESHOLD:
        return (f"device-bound: GPU idle {idle_ms:.1f} ms/step ({share:.0%} of the step) on {where}; "
                f"the host keeps the queue fed")
    if sync_calls == 0:
        return (f"host-bound: GPU idle {idle_ms:.1f} ms/step ({share:.0%} of the step) with no sync on {where}; "
                f"launch APIs take {host.launch_ms:.1f} ms/step of host time for {host.launch_calls:.0f} launches")
    return (f"host-bound with syncs: GPU idle {idle_ms:.1f} ms/step ({share:.0%} of the step) on {where}, which "
            f"make {sync_calls:.1f} synchronising calls per step ({sync_ms:.1f} ms/step waiting)")


def logging_steps(steps: Iterable[int], log_every: int) -> list[int]:
    """The global steps among ``steps`` at which the trainer logs (``log_every_n_steps``)."""
    return [s for s in steps if (s + 1) % log_every == 0]


def _top(names: dict[str, float], n: int = 4) -> str:
    return ", ".join(f"{k} {v:.1f}" for k, v in sorted(names.items(), key=lambda kv: -kv[1])[:n])


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
        trainer.fit(template, train_step.make_loader(shape, args.batch_size, args.warmup + args.steps, args.seed,
                                                  args.device))
    return counter


def profile(template, shape, args):
    """torch.profiler over the steps after the warm-up: (wall s/step, profiler). A zero-length
    ``profile_step#<global step>`` marker is recorded when each profiled step starts, and
    ``profile_step#end`` after the last one (see :func:`step_spans`)."""
    import lightning as L
    from torch.profiler import ProfilerActivity, record_function

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
    prof = torch.profiler.profile(activities=activities)
    wall = []

    def mark(tag):
        with record_function(f"{STEP_MARKER}{tag}"):
            pass

    class Window(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == args.warmup:
                train_step._sync(args.device)
                prof.__enter__()
                wall.append(time.perf_counter())
            if args.warmup <= batch_idx < args.warmup + args.steps:
                mark(trainer.global_step)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == args.warmup + args.steps - 1:
                train_step._sync(args.device)
                wall.append(time.perf_counter())
                mark("end")
                prof.__exit__(None, None, None)

    trainer = train_step.lightning_trainer(args, callbacks=[Window()], log_every_n_steps=args.log_every)
    trainer.fit(template, train_step.make_loader(shape, args.batch_size, args.warmup + args.steps, args.seed,
                                                  args.device))
    return (wall[1] - wall[0]) / args.steps, prof


def report_profile(prof, wall: float, args) -> None:
    """Print the figures of the module docstring from a :func:`profile` run (``wall`` in s/step)."""
    n = args.steps
    events = list(prof.events())
    logging = logging_steps(range(args.warmup, args.warmup + n), args.log_every)
    spans = step_spans((e.name, e.time_range.start) for e in events if e.name.startswith(STEP_MARKER))
    print(f"wall time per step: {wall * 1e3:.1f} ms")
    kinds = step_kinds(spans, logging)
    if kinds:
        print("host span per step (step start to next step start): " + ", ".join(
            f"{k} {sum(spans[s][1] - spans[s][0] for s in g) / 1e3 / len(g):.1f} ms" for k, g in kinds.items()))
    if args.device.startswith("cuda"):
        dev = summarize_device(device_records(events), n, wall * n, spans, logging)
        host = summarize_host(host_calls(events), n, spans, logging)
        print(f"GPU kernel time per step: {dev.kernel_ms:.1f} ms (summed durations, memcpy/memset included); "
              f"GPU busy {dev.busy_ms:.1f} ms (union of the intervals) = {dev.busy_ms / dev.wall_ms:.1%} of the wall time")
        print(f"GPU idle per step: {dev.idle_ms:.1f} ms (wall - busy)" + "".join(
            f"; {k} steps {idle:.1f} ms ({idle / span:.0%})" for k, (span, idle) in dev.by_kind.items() if span > 0))
        print(f"kernels per step: {dev.kernels:.0f} (+ {dev.copies:.1f} memcpy/memset; "
              f"{dev.annotations:.1f} GPU annotation ranges per step not counted)")
        print(f"host launch APIs per step: {host.launch_calls:.0f} calls, {host.launch_ms:.1f} ms CPU "
              f"({_top(host.launch_names)})")
        print(f"host sync APIs per step: {host.sync_calls:.1f} calls, {host.sync_ms:.1f} ms CPU" + "".join(
            f"; {k} steps {c:.1f} calls {t:.1f} ms" for k, (c, t) in host.by_kind.items())
            + (f" ({_top(host.sync_names)})" if host.sync_names else ""))
        print(verdict(dev, host))
        families = dev.families
        unit = f"kernel time: summed durations, {dev.kernel_ms:.2f} ms/step"
    else:
        print("GPU kernel / idle / launch figures and the host-bound verdict: not measured on CPU (no device queue)")
        by_op: collections.Counter = collections.Counter()
        for e in prof.key_averages():
            if e.key.startswith("aten::"):
                by_op[family(e.key[6:])] += e.self_cpu_time_total
        total = sum(by_op.values())
        families = [(f, t / total if total else 0.0, t / 1e3 / n) for f, t in by_op.most_common()]
        unit = f"aten self CPU time, {total / 1e3 / n:.2f} ms/step"
    print(f"time shares by family ({unit}):")
    for name, share, ms in families:
        print(f"  {name:32s} {share:6.1%}  ({ms:8.2f} ms/step)")


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
    logging = logging_steps(steps, args.log_every)
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
    torch.backends.cudnn.benchmark = args.device.startswith("cuda")  # as trainer=gpu and train_step.py
    template, shape = train_step.build_module(args.config, args.seed, compile=args.compile,
                                              compile_mode=args.compile_mode, channels_last=args.channels_last)
    run(template, shape, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
