"""Learning-rate schedulers by their sd-scripts names (``--lr_scheduler``, ``--lr_scheduler_type``).

The schedule functions are transformers' (and diffusers' ``piecewise_constant``), the ones sd-scripts
calls, so the LR curves match it step for step. Each is a ``LambdaLR`` (a pure function of the step),
resumable through ``state_dict`` / ``load_state_dict``.
"""

from __future__ import annotations

import importlib
import logging
import math

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

from fluxlora.config.optim_specs import OptimizerSpec, SchedulerSpec
from fluxlora.errors import ConfigError
from fluxlora.training.optim import dummy_optimizer, is_schedule_free, required_scheduler

logger = logging.getLogger(__name__)

__all__ = ["SCHEDULERS", "build_scheduler", "check_scheduler", "resolve_steps", "scheduler_from_spec"]

SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "cosine_with_min_lr",
    "warmup_stable_decay",
    "piecewise_constant",
    "adafactor",
)


def resolve_steps(value: int | float | str | None, total: int, flag: str) -> int:
    """A step count given as an int, a fraction < 1 of ``total`` (floored, as sd-scripts), or ``"N%"``."""
    if value is None:
        return 0
    if isinstance(value, str):
        text = value.strip()
        try:
            value = float(text[:-1]) / 100.0 if text.endswith("%") else float(text)
        except ValueError as exc:
            raise ConfigError(f"{flag} {text!r} is not a step count, a fraction or N%", key=flag) from exc
        if text.endswith("%") and value >= 1.0:
            if value > 1.0:
                raise ConfigError(f"{flag} {text} is more than all of the training steps", key=flag)
            return total
    if isinstance(value, bool) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"{flag} must be a non-negative step count or fraction, got {value!r}", key=flag)
    if isinstance(value, float) and value < 1.0:
        return int(value * total)
    if isinstance(value, float) and not value.is_integer():
        raise ConfigError(f"{flag} {value} is neither a whole step count nor a fraction below 1", key=flag)
    return int(value)


def _constant(_step: int) -> float:
    return 1.0


def _no_warmup(name: str, num_warmup_steps: int) -> None:
    if num_warmup_steps:
        raise ConfigError(
            f"--lr_scheduler {name} takes no warmup but --lr_warmup_steps is {num_warmup_steps}; set it to 0 "
            "or use a scheduler with warmup (constant_with_warmup, linear, cosine, ...)",
            key="--lr_warmup_steps",
        )


def _custom_scheduler(
    scheduler_type: str, optimizer: Optimizer, scheduler_args: dict[str, object]
) -> LRScheduler:
    if "." in scheduler_type:
        module_name, _, attr = scheduler_type.rpartition(".")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            raise ConfigError(
                f"--lr_scheduler_type {scheduler_type}: module {module_name} is not installed",
                key="--lr_scheduler_type",
            ) from exc
    else:
        module, attr = torch.optim.lr_scheduler, scheduler_type
    cls = getattr(module, attr, None)
    if not isinstance(cls, type):
        raise ConfigError(
            f"--lr_scheduler_type {scheduler_type!r} is not a scheduler class; give a torch.optim.lr_scheduler "
            "class name (e.g. CosineAnnealingLR) or a class path module.Class",
            key="--lr_scheduler_type",
        )
    return _call(cls, optimizer, scheduler_args, scheduler_type)


def _call(fn, optimizer: Optimizer, kwargs: dict[str, object], name: str) -> LRScheduler:
    try:
        return fn(optimizer, **kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"--lr_scheduler {name} cannot be built with these settings / --lr_scheduler_args: {exc}",
            key="--lr_scheduler_args",
        ) from exc


def build_scheduler(
    name: str,
    optimizer: Optimizer,
    *,
    num_training_steps: int,
    num_warmup_steps: int | float | str | None = 0,
    num_decay_steps: int | float | str | None = 0,
    num_cycles: int = 1,
    power: float = 1.0,
    timescale: int | None = None,
    min_lr_ratio: float | None = None,
    scheduler_type: str = "",
    scheduler_args: dict[str, object] | None = None,
    initial_lr: float = 0.0,
) -> LRScheduler:
    """Create the LR scheduler for ``--lr_scheduler name`` (or ``--lr_scheduler_type``), as sd-scripts does.

    ``num_training_steps`` counts optimizer steps and the scheduler is stepped once per optimizer step.
    sd-scripts multiplies the length by the number of processes (Accelerate steps its scheduler once per
    process); we do not, so a multi-GPU run gets the schedule it asked for. ``num_warmup_steps`` and
    ``num_decay_steps`` may be fractions (< 1) of the total. ``num_cycles`` is halved for cosine_with_min_lr and
    warmup_stable_decay, as in sd-scripts. ``initial_lr`` is what the adafactor schedule reports before the
    first step. Schedule-free optimizers take only ``constant`` (their warmup is ``--optimizer_args
    warmup_steps=N``).
    """
    from transformers import optimization as tfo  # heavy import: only when a scheduler is built

    kwargs = dict(scheduler_args or {})
    warmup = resolve_steps(num_warmup_steps, num_training_steps, "--lr_warmup_steps")
    decay = resolve_steps(num_decay_steps, num_training_steps, "--lr_decay_steps")

    if is_schedule_free(optimizer):
        if name != "constant" or warmup or scheduler_type:
            raise ConfigError(
                f"{type(optimizer).__name__} is schedule-free and takes no LR schedule; use --lr_scheduler constant "
                "without --lr_warmup_steps (warm up with --optimizer_args warmup_steps=N)",
                key="--lr_scheduler",
            )
        return LambdaLR(optimizer, _constant)
    if scheduler_type:
        _no_warmup(scheduler_type, warmup)
        return _custom_scheduler(scheduler_type, optimizer, kwargs)

    forced = required_scheduler(optimizer)
    if forced == "adafactor" and name not in ("constant", "adafactor") and not name.startswith("adafactor:"):
        raise ConfigError(
            f"Adafactor with relative_step=True sets its own learning rate, so --lr_scheduler {name} cannot apply; "
            "add --optimizer_args relative_step=False scale_parameter=False warmup_init=False to use it",
            key="--lr_scheduler",
        )
    if forced == "adafactor" or name == "adafactor" or name.startswith("adafactor:"):
        if type(optimizer).__name__ != "Adafactor":
            raise ConfigError(
                "--lr_scheduler adafactor needs --optimizer_type Adafactor", key="--lr_scheduler"
            )
        _no_warmup("adafactor", warmup)
        if name != "adafactor" and not name.startswith("adafactor:"):
            logger.info(
                "Adafactor with relative_step=True: using the adafactor scheduler instead of %s", name
            )
        if name.startswith("adafactor:"):
            initial_lr = float(name.split(":", 1)[1])
        return tfo.AdafactorSchedule(optimizer, initial_lr)

    if name == "constant":
        _no_warmup(name, warmup)
        return _call(tfo.get_constant_schedule, optimizer, kwargs, name)
    if name == "piecewise_constant":
        _no_warmup(name, warmup)
        if "step_rules" not in kwargs:
            raise ConfigError(
                "--lr_scheduler piecewise_constant needs --lr_scheduler_args step_rules='1:10,0.1:20,0.01' "
                "(multiplier:until_step pairs, then the final multiplier)",
                key="--lr_scheduler_args",
            )
        from diffusers.optimization import get_piecewise_constant_schedule

        return _call(get_piecewise_constant_schedule, optimizer, kwargs, name)

    common = {"num_warmup_steps": warmup}
    if name == "constant_with_warmup":
        return _call(tfo.get_constant_schedule_with_warmup, optimizer, {**common, **kwargs}, name)
    if name == "inverse_sqrt":
        return _call(
            tfo.get_inverse_sqrt_schedule, optimizer, {**common, "timescale": timescale, **kwargs}, name
        )

    common["num_training_steps"] = num_training_steps
    if warmup > num_training_steps:
        raise ConfigError(
            f"--lr_warmup_steps {warmup} exceeds the {num_training_steps} training steps",
            key="--lr_warmup_steps",
        )
    if name in ("linear", "cosine"):
        fn = tfo.get_linear_schedule_with_warmup if name == "linear" else tfo.get_cosine_schedule_with_warmup
        return _call(fn, optimizer, {**common, **kwargs}, name)
    if name == "cosine_with_restarts":
        fn = tfo.get_cosine_with_hard_restarts_schedule_with_warmup
        return _call(fn, optimizer, {**common, "num_cycles": num_cycles, **kwargs}, name)
    if name == "polynomial":
        fn = tfo.get_polynomial_decay_schedule_with_warmup
        return _call(fn, optimizer, {**common, "power": power, **kwargs}, name)
    if name == "cosine_with_min_lr":
        if min_lr_ratio is None and "min_lr" not in kwargs and "min_lr_rate" not in kwargs:
            raise ConfigError(
                "--lr_scheduler cosine_with_min_lr needs --lr_scheduler_min_lr_ratio (e.g. 0.1)",
                key="--lr_scheduler_min_lr_ratio",
            )
        extra = {"num_cycles": num_cycles / 2}
        if min_lr_ratio is not None:
            extra["min_lr_rate"] = min_lr_ratio
        fn = tfo.get_cosine_with_min_lr_schedule_with_warmup
        return _call(fn, optimizer, {**common, **extra, **kwargs}, name)
    if name == "warmup_stable_decay":
        stable = num_training_steps - warmup - decay
        if stable < 0:
            raise ConfigError(
                f"--lr_warmup_steps {warmup} + --lr_decay_steps {decay} exceed the {num_training_steps} training steps",
                key="--lr_decay_steps",
            )
        extra = {
            "num_warmup_steps": warmup,
            "num_stable_steps": stable,
            "num_decay_steps": decay,
            "num_cycles": num_cycles / 2,
            "min_lr_ratio": min_lr_ratio if min_lr_ratio is not None else 0.0,
        }
        return _call(tfo.get_wsd_schedule, optimizer, {**extra, **kwargs}, name)
    raise ConfigError(
        f"--lr_scheduler {name!r} is unknown; valid: {', '.join(SCHEDULERS)} (or --lr_scheduler_type for a class)",
        key="--lr_scheduler",
    )


def scheduler_from_spec(spec: SchedulerSpec, optimizer: Optimizer, *, num_training_steps: int) -> LRScheduler:
    """`build_scheduler` from the typed `--lr_scheduler*` settings; an optimizer that sets its own step size
    (Adafactor with relative_step) gets the scheduler it requires."""
    return build_scheduler(
        required_scheduler(optimizer) or spec.lr_scheduler, optimizer, num_training_steps=num_training_steps,
        num_warmup_steps=spec.lr_warmup_steps, num_decay_steps=spec.lr_decay_steps,
        num_cycles=spec.lr_scheduler_num_cycles, power=spec.lr_scheduler_power, timescale=spec.lr_scheduler_timescale,
        min_lr_ratio=spec.lr_scheduler_min_lr_ratio, scheduler_type=spec.lr_scheduler_type,
        scheduler_args=dict(spec.args), initial_lr=spec.initial_lr,
    )


def check_scheduler(spec: SchedulerSpec, optimizer: OptimizerSpec, *, num_training_steps: int) -> None:
    """Build the scheduler over a dummy parameter: an unknown `--lr_scheduler`, `--lr_scheduler_args` the schedule
    refuses, a warm-up longer than the run or a missing min-LR ratio fail before any weight is loaded."""
    dummy = dummy_optimizer(optimizer.optimizer_type, learning_rate=optimizer.learning_rate,
                            optimizer_args=optimizer.args)
    scheduler_from_spec(spec, dummy, num_training_steps=num_training_steps)
