"""Optimizers and learning-rate schedules, chosen by musubi-tuner's flags.

Optimizers (``--optimizer_type``, matched without case for the named ones, as musubi):

=====================  ====================================================================================
AdamW (default)        ``torch.optim.AdamW``
AdamW8bit              ``bitsandbytes.optim.AdamW8bit``: imported only when asked; needs a CUDA device
Adafactor              ``transformers.optimization.Adafactor``; musubi's handling: ``relative_step`` defaults
                       to True, and then the learning rate is Adafactor's own (``AdafactorSchedule`` starting
                       from ``--learning_rate``) and no warm-up is allowed
Prodigy                ``prodigyopt.Prodigy`` (optional package)
AdamWScheduleFree      ``schedulefree.AdamWScheduleFree`` (optional; schedule-free optimizers keep a constant
                       schedule and are switched to eval mode around saves, as musubi does)
a bare name            a class of ``torch.optim`` (``SGD``)
``package.Class``      any importable optimizer class, e.g. ``bitsandbytes.optim.PagedAdEMAMix8bit``
=====================  ====================================================================================

``--optimizer_args key=value`` values are Python literals read with ``ast.literal_eval`` (never eval).

Schedules (``--lr_scheduler``): LambdaLR multipliers with transformers' ``get_scheduler`` definitions,
which musubi uses; ``step`` counts optimizer steps, ``W`` warm-up steps, ``T`` training steps:

=======================  ==========================================================================
constant                 1
constant_with_warmup     step / W during warm-up, then 1
linear                   warm-up, then max(0, (T - step) / (T - W))
cosine                   warm-up, then max(0, 0.5 * (1 + cos(pi * progress))), progress = (step - W) / (T - W)
cosine_with_restarts     warm-up, then 0.5 * (1 + cos(pi * ((cycles * progress) % 1))); 0 once progress >= 1
polynomial               warm-up, then ((lr - lr_end) * (1 - progress) ** power + lr_end) / lr, lr_end 1e-7;
                         lr_end / lr after T
=======================  ==========================================================================

(each ``max(1, ...)``-guarded against division by zero, as transformers does).
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch.optim.lr_scheduler import LambdaLR

from wan.train.config import LR_SCHEDULERS, TrainConfigError

POLYNOMIAL_LR_END = 1e-7  # transformers' get_polynomial_decay_schedule_with_warmup default
# Short names for optional packages: name (lower case) -> (module, class, pip package)
KNOWN_OPTIONAL = {
    "prodigy": ("prodigyopt", "Prodigy", "prodigyopt"),
    "adamwschedulefree": ("schedulefree", "AdamWScheduleFree", "schedulefree"),
    "sgdschedulefree": ("schedulefree", "SGDScheduleFree", "schedulefree"),
    "radamschedulefree": ("schedulefree", "RAdamScheduleFree", "schedulefree"),
}


class OptimizerError(TrainConfigError):
    """An optimizer that cannot be built here (missing package, no CUDA, unknown class...)."""


@dataclass
class OptimizerChoice:
    """The built optimizer and what musubi records about it.

    name: ``module.Class`` (the ``ss_optimizer`` metadata); args: ``k=v,...``; schedule_free: the
    optimizer has train()/eval() modes; own_lr_schedule: Adafactor with relative_step (its own lr).
    """

    optimizer: torch.optim.Optimizer
    name: str
    args: str
    schedule_free: bool = False
    own_lr_schedule: float | None = None  # the initial lr of an Adafactor relative-step schedule
    notes: list[str] = field(default_factory=list)

    def train_mode(self) -> None:
        if self.schedule_free:
            self.optimizer.train()

    def eval_mode(self) -> None:
        if self.schedule_free:
            self.optimizer.eval()


def _import_class(module: str, name: str, package: str | None = None) -> type:
    try:
        mod = importlib.import_module(module)
    except ImportError:
        hint = f" (pip install {package})" if package else ""
        raise OptimizerError(f"--optimizer_type: {module}.{name} needs the package {package or module}, which is not "
                             f"installed{hint}") from None
    try:
        return getattr(mod, name)
    except AttributeError:
        raise OptimizerError(f"--optimizer_type: {module} has no {name}") from None


def optimizer_class(optimizer_type: str, device: torch.device | str = "cpu") -> type:
    """The optimizer class ``--optimizer_type`` names (see the module docstring)."""
    wanted = (optimizer_type or "AdamW").strip()
    key = wanted.lower()
    if key == "adamw":
        return torch.optim.AdamW
    if key.endswith("8bit") and "." not in key:
        if key != "adamw8bit":
            return _bnb_class(wanted, device)
        return _bnb_class("AdamW8bit", device)
    if key == "adafactor":
        return _import_class("transformers.optimization", "Adafactor", "transformers")
    if key in KNOWN_OPTIONAL:
        return _import_class(*KNOWN_OPTIONAL[key])
    if "." not in wanted:
        cls = getattr(torch.optim, wanted, None)
        if cls is None:
            raise OptimizerError(f"--optimizer_type: {wanted!r} is not allowed; expected AdamW, AdamW8bit, Adafactor, "
                                 "Prodigy, AdamWScheduleFree, a torch.optim class or package.module.Class")
    else:
        module, _, name = wanted.rpartition(".")
        if module.split(".")[0] == "bitsandbytes":
            return _bnb_class(name, device, module)
        cls = _import_class(module, name)
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise OptimizerError(f"--optimizer_type: {wanted} is not a torch optimizer class")
    return cls


def _bnb_class(name: str, device: torch.device | str, module: str = "bitsandbytes.optim") -> type:
    if torch.device(device).type != "cuda":
        raise OptimizerError(f"--optimizer_type: {name} (bitsandbytes) runs on a CUDA GPU; this run is on "
                             f"{torch.device(device).type}: use AdamW")
    return _import_class(module, name, "bitsandbytes")


def build_optimizer(optimizer_type: str, param_groups: Sequence[dict] | Sequence[torch.nn.Parameter], lr: float,
                    kwargs: dict[str, Any] | None = None, *, lr_scheduler: str = "constant",
                    device: torch.device | str = "cpu") -> OptimizerChoice:
    """The optimizer of ``--optimizer_type`` over ``param_groups`` (each may carry its own ``lr``)."""
    kwargs = dict(kwargs or {})
    cls = optimizer_class(optimizer_type, device)
    notes: list[str] = []
    own_lr = None
    if cls.__name__ == "Adafactor" and cls.__module__.startswith("transformers"):
        kwargs.setdefault("relative_step", True)
        if not kwargs["relative_step"] and kwargs.get("warmup_init", False):
            kwargs["relative_step"] = True  # musubi: warmup_init needs relative_step
            notes.append("Adafactor: relative_step set to True because warmup_init is True")
        if kwargs["relative_step"]:
            own_lr = lr
            notes.append(f"Adafactor with relative_step: its own learning rate schedule, starting from {lr:g}")
            lr = None
            param_groups = [{k: v for k, v in g.items() if k != "lr"} if isinstance(g, dict) else g
                            for g in param_groups]
    try:
        optimizer = cls(param_groups, lr=lr, **kwargs)
    except TypeError as exc:
        raise OptimizerError(f"--optimizer_args: {cls.__name__} does not take these arguments ({exc})") from None
    args_text = ",".join(f"{k}={v}" for k, v in kwargs.items())
    schedule_free = callable(getattr(optimizer, "train", None)) and callable(getattr(optimizer, "eval", None))
    if schedule_free and lr_scheduler != "constant":
        notes.append(f"{cls.__name__} is schedule-free: --lr_scheduler {lr_scheduler} is not used")
    return OptimizerChoice(optimizer, f"{cls.__module__}.{cls.__name__}", args_text, schedule_free, own_lr, notes)


def check_optimizer(optimizer_type: str, kwargs: dict[str, Any], lr_warmup_steps: int | float,
                    device: torch.device | str = "cpu") -> type:
    """The optimizer class, checked before any model loads: importable, usable on ``device``, and no
    warm-up with Adafactor's own relative-step schedule."""
    cls = optimizer_class(optimizer_type, device)
    if cls.__name__ == "Adafactor" and (kwargs.get("relative_step", True) or kwargs.get("warmup_init", False)) \
            and lr_warmup_steps:
        raise TrainConfigError("--lr_warmup_steps: Adafactor with relative_step has its own schedule and takes no "
                               "warm-up (as musubi); give --optimizer_args relative_step=False to use --lr_scheduler")
    return cls


# ----------------------------------------------------------------------------- schedules


def warmup_steps(lr_warmup_steps: int | float, num_training_steps: int) -> int:
    """Warm-up steps: an int as given, a float below 1 as a fraction of the training steps (musubi:
    ``int(fraction * steps)``)."""
    if isinstance(lr_warmup_steps, float) and lr_warmup_steps < 1:
        return int(lr_warmup_steps * num_training_steps)
    return int(lr_warmup_steps)


def lr_lambda(name: str, *, num_warmup_steps: int, num_training_steps: int, num_cycles: float = 1,
              power: float = 1.0, lr_init: float = 1.0) -> Callable[[int], float]:
    """The multiplier of the base lr after ``step`` optimizer steps (the module docstring's formulas)."""
    w, t = num_warmup_steps, num_training_steps

    def warm(step: int) -> float:
        return float(step) / float(max(1, w))

    def progress(step: int) -> float:
        return float(step - w) / float(max(1, t - w))

    if name == "constant":
        return lambda step: 1.0
    if name == "constant_with_warmup":
        return lambda step: warm(step) if step < w else 1.0
    if name == "linear":
        return lambda step: warm(step) if step < w else max(0.0, float(t - step) / float(max(1, t - w)))
    if name == "cosine":  # transformers' default num_cycles 0.5: one half cosine, as musubi passes none
        return lambda step: warm(step) if step < w else max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress(step))))

    if name == "cosine_with_restarts":
        def restarts(step: int) -> float:
            if step < w:
                return warm(step)
            p = progress(step)
            if p >= 1.0:
                return 0.0
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((float(num_cycles) * p) % 1.0))))
        return restarts
    if name == "polynomial":
        if not lr_init > POLYNOMIAL_LR_END:
            raise TrainConfigError(f"--learning_rate: {lr_init} is not allowed with --lr_scheduler polynomial; "
                                   f"it must exceed the end lr {POLYNOMIAL_LR_END}")

        def polynomial(step: int) -> float:
            if step < w:
                return warm(step)
            if step > t:
                return POLYNOMIAL_LR_END / lr_init
            remaining = 1 - (step - w) / (t - w)
            return ((lr_init - POLYNOMIAL_LR_END) * remaining ** power + POLYNOMIAL_LR_END) / lr_init
        return polynomial
    raise TrainConfigError(f"--lr_scheduler: {name!r} is not allowed; expected one of {', '.join(LR_SCHEDULERS)}")


def build_scheduler(choice: OptimizerChoice, name: str, *, num_training_steps: int, lr_warmup_steps: int | float = 0,
                    num_cycles: int = 1, power: float = 1.0):
    """The LR scheduler (stepped once per optimizer step). Schedule-free optimizers get a constant one;
    Adafactor with relative_step gets transformers' ``AdafactorSchedule`` (no warm-up allowed, as musubi)."""
    warm = warmup_steps(lr_warmup_steps, num_training_steps)
    if choice.own_lr_schedule is not None:
        if warm:
            raise TrainConfigError("--lr_warmup_steps: Adafactor with relative_step has its own schedule and takes "
                                   "no warm-up (as musubi); give --optimizer_args relative_step=False to use "
                                   "--lr_scheduler")
        from transformers.optimization import AdafactorSchedule
        return AdafactorSchedule(choice.optimizer, choice.own_lr_schedule)
    if choice.schedule_free:
        name = "constant"
    lr_init = choice.optimizer.defaults.get("lr") or 1.0
    fn = lr_lambda(name, num_warmup_steps=warm, num_training_steps=num_training_steps, num_cycles=num_cycles,
                   power=power, lr_init=lr_init)
    return LambdaLR(choice.optimizer, fn)
