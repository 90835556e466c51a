"""Optimizer and learning-rate schedule of ``ScoreLitModule`` as Hydra components.

``configs/optim/*.yaml`` build ``torch.optim`` partials (``_partial_: true``: the module calls them with
its parameters) and ``configs/lr_schedule/*.yaml`` build partials of ``warmup_schedule`` (called with
the optimizer). The published recipe (Song et al. 2021, App. H; Ho et al. 2020, App. B) is Adam with
lr 2e-4 and a linear warm-up over 5000 steps, then a constant rate; ``decay="cosine"`` anneals to
``min_lr_ratio * lr`` at ``total_steps`` instead.

Checkpoints written before these groups existed hold ``optimizer="adam"|"adamw"``, ``lr``, ``betas``,
``eps``, ``weight_decay`` and ``warmup_steps`` hyperparameters; ``from_legacy_hparams`` turns them
into the same two partials. The checks of the speed settings (``check_fused``, ``check_compile_options``)
live here too.
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
from typing import Callable, Mapping, Optional

import torch

from sgm_lightning.utils import check_choice, check_int

DECAYS = ("constant", "cosine")
LEGACY_OPTIM_KEYS = ("optimizer", "lr", "betas", "eps", "weight_decay", "warmup_steps")
_LEGACY_OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


class WarmupSchedule:
    """LR multiplier at step s: (s + 1) / warmup_steps during the warm-up, then 1 (``"constant"``)
    or a half cosine from 1 to ``min_lr_ratio`` at ``total_steps`` (``"cosine"``).

    A plain object (not a lambda), so that ``LambdaLR.state_dict`` stores its numbers.
    """

    def __init__(self, warmup_steps: int = 0, decay: str = "constant", total_steps: Optional[int] = None,
                 min_lr_ratio: float = 0.0):
        check_int("warmup_steps", warmup_steps, min=0)
        check_choice("decay", decay, DECAYS)
        if total_steps is not None and decay == "cosine":  # text: a TypeError; 10.5 was truncated
            total_steps = check_int("lr_schedule.total_steps", total_steps, min=-1)  # -1: max_steps unset, below
        if decay == "cosine" and (total_steps is None or total_steps <= warmup_steps):
            raise ValueError(f"decay=cosine needs total_steps > warmup_steps ({warmup_steps}), got {total_steps!r} "
                             "(lr_schedule.total_steps defaults to trainer.max_steps, which must then be set); "
                             "set trainer.max_steps (or lr_schedule.total_steps) above lr_schedule.warmup_steps, "
                             "or lower lr_schedule.warmup_steps")
        if not 0 <= min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio!r}")
        self.warmup_steps, self.decay = int(warmup_steps), decay
        self.total_steps = None if total_steps is None else int(total_steps)
        self.min_lr_ratio = float(min_lr_ratio)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.decay == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / (self.total_steps - self.warmup_steps))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupLR(torch.optim.lr_scheduler.LambdaLR):
    """``LambdaLR`` of a ``WarmupSchedule`` whose settings stay this run's when a checkpoint is loaded.

    ``LambdaLR.load_state_dict`` would overwrite them with the file's: a cosine run resumed with a
    larger ``trainer.max_steps`` (``lr_schedule.total_steps`` follows it) kept the old length, so an
    extended run trained on at ``min_lr_ratio * lr`` (0 by default) and a run stopped early by a
    smaller ``max_steps`` resumed on the short schedule. The saved step count is kept, the settings
    are this run's (as the EMA decay is), and the learning rate of the next step (restored with the
    optimizer) is recomputed with them; with unchanged settings the state is the saved one, bitwise.
    """

    def load_state_dict(self, state_dict: dict) -> None:
        settings = [dict(vars(fn)) for fn in self.lr_lambdas]
        super().load_state_dict(state_dict)
        for fn, own in zip(self.lr_lambdas, settings):
            vars(fn).update(own)
        lrs = [base * fn(self.last_epoch) for fn, base in zip(self.lr_lambdas, self.base_lrs)]  # as get_lr
        for group, lr in zip(self.optimizer.param_groups, lrs):
            if torch.is_tensor(group["lr"]):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
        self._last_lr = [g["lr"].clone() if torch.is_tensor(g["lr"]) else g["lr"] for g in self.optimizer.param_groups]


def warmup_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int = 0, decay: str = "constant",
                    total_steps: Optional[int] = None, min_lr_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then constant or cosine decay (stepped once per optimizer step)."""
    return WarmupLR(optimizer, WarmupSchedule(warmup_steps, decay, total_steps, min_lr_ratio))


def with_state_in_param_layout(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """``optimizer``, with a ``load_state_dict`` post-hook that gives each loaded state tensor of a
    parameter's shape (Adam's moments) that parameter's memory layout. A checkpoint of a
    ``model.channels_last`` run resumed without it (or the reverse) kept the saved layout, and the fused
    kernels pair state and parameter elements by memory position: the resumed run applied scrambled
    updates without an error (foreach and per-tensor kernels index elements and were right)."""
    def hook(opt: torch.optim.Optimizer) -> None:
        for p in (p for group in opt.param_groups for p in group["params"]):
            state = opt.state.get(p, {})
            for key, value in state.items():
                if torch.is_tensor(value) and value.shape == p.shape and value.stride() != p.stride():
                    state[key] = torch.empty_like(p, dtype=value.dtype).copy_(value)
    optimizer.register_load_state_dict_post_hook(hook)
    return optimizer


def check_fused(optimizer: Callable, fused: Optional[bool]) -> None:
    """``model.fused``: true needs an optimizer with a fused implementation (it was ignored silently)."""
    if fused not in (None, True, False):
        raise ValueError(f"model.fused must be true, false or null (fused when the optimizer supports it), got {fused!r}")
    if fused and not accepts(optimizer, "fused"):
        name = getattr(getattr(optimizer, "func", optimizer), "__name__", repr(optimizer))
        raise ValueError(f"model.fused=true, but {name} has no fused implementation (no `fused` argument); use "
                         "model.fused=null (fused when the optimizer supports it) or an optimizer that has one (optim=adam)")


def check_optimizer(optimizer: Callable, lr_scheduler: Optional[Callable] = None) -> None:
    """Fail at construction, not at the first step: build both on a dummy parameter."""
    if not callable(optimizer) or isinstance(optimizer, str):
        raise ValueError(f"optimizer must be a callable params -> torch.optim.Optimizer (a `_partial_: true` node "
                         f"such as configs/optim/adam.yaml), got {optimizer!r}")
    if lr_scheduler is not None and (not callable(lr_scheduler) or isinstance(lr_scheduler, str)):
        raise ValueError(f"lr_scheduler must be a callable optimizer -> LR scheduler (configs/lr_schedule/), "
                         f"got {lr_scheduler!r}")
    keywords = getattr(optimizer, "keywords", {})
    lr = keywords.get("lr")
    if lr is not None and (isinstance(lr, (str, bool)) or not 0 < lr < math.inf):
        raise ValueError(f"lr must be > 0 and finite, got {lr!r} (e.g. optim.lr=2e-4)")
    betas = keywords.get("betas")
    if betas is not None and (isinstance(betas, str) or not hasattr(betas, "__len__") or len(betas) != 2
                              or not all(isinstance(b, numbers.Real) and not isinstance(b, bool) for b in betas)):
        # torch: an IndexError (one value), a TypeError (text), or a third value silently ignored
        raise ValueError(f"optim.betas must be two numbers in [0, 1) (beta1, beta2), got {betas!r}; "
                         "e.g. 'optim.betas=[0.9,0.999]'")
    try:
        probe = optimizer([torch.zeros(1, requires_grad=True)])  # torch checks betas, eps, weight decay
    except (TypeError, ValueError, IndexError) as e:
        name = getattr(getattr(optimizer, "func", optimizer), "__name__", "the optimizer")
        raise ValueError(f"{name} refused its settings {dict(keywords)}: {e}. Correct the optim.* setting it "
                         "names (configs/optim/)") from None
    if lr_scheduler is not None:
        lr_scheduler(probe)


def accepts(fn: Callable, name: str) -> bool:
    """Whether ``fn`` (a function, class or partial) takes the keyword argument ``name``."""
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def from_legacy_hparams(hp: dict) -> tuple[Callable, Callable]:
    """(optimizer, lr_scheduler) partials from the optimizer hyperparameters of an older checkpoint.

    Pops the keys of ``LEGACY_OPTIM_KEYS`` from ``hp``.
    """
    old = {k: hp.pop(k) for k in LEGACY_OPTIM_KEYS if k in hp}
    name = old.get("optimizer", "adam")
    if name not in _LEGACY_OPTIMIZERS:
        raise ValueError(f"checkpoint hyperparameter optimizer={name!r} is not one of {sorted(_LEGACY_OPTIMIZERS)}; "
                         "this checkpoint was not written by sgm_lightning's train.py")
    kwargs = {k: old[k] for k in ("lr", "eps", "weight_decay") if k in old}
    if "betas" in old:
        kwargs["betas"] = tuple(old["betas"])
    optimizer = functools.partial(_LEGACY_OPTIMIZERS[name], **kwargs)
    return optimizer, functools.partial(warmup_schedule, warmup_steps=int(old.get("warmup_steps", 0)))


def check_compile_options(options: dict | None, mode: str | None) -> None:
    """Inductor options: a mapping of known option names; not together with a compile mode."""
    if options is None:
        return
    if not isinstance(options, Mapping):
        raise ValueError(f"compile_options must be a mapping of inductor options (or null), got {options!r}")
    if options and mode not in (None, "default"):
        raise ValueError(f"compile_options={dict(options)} and compile_mode={mode} were both given; torch.compile "
                         "takes one or the other. Keep compile_mode=default with compile_options, or drop "
                         "compile_options (reduce-overhead = {'triton.cudagraphs': true}).")
    import torch._inductor
    known = set(torch._inductor.list_options())
    unknown = sorted(str(k) for k in options if k not in known)
    if unknown:
        raise ValueError(f"unknown inductor option(s) in compile_options: {', '.join(unknown)}; the names are "
                         "those of torch._inductor.list_options(), e.g. triton.cudagraphs, cpp_wrapper, "
                         "combo_kernels, coordinate_descent_tuning")
