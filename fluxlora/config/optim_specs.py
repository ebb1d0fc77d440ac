"""`--optimizer_args` and `--lr_scheduler_args` (and the flags around them) as typed specs, parsed once.

sd-scripts evaluates each `key=value` item with `ast.literal_eval` and keeps bare words as strings; so do we, but
a malformed item or a key given twice is a `ConfigError` naming the flag. `OptimizerSpec` and `SchedulerSpec`
are what the optimizer and scheduler builders (`fluxlora.training.optim`, `fluxlora.training.schedulers`)
construct from; `parse_train_config` fills them, so a mistake is found with the other flags, before any weight
is read.
"""

from __future__ import annotations

import ast
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fluxlora.errors import ConfigError


def parse_kv_args(items: Sequence[str] | None, flag: str) -> dict[str, object]:
    """Parse ``key=value`` items of a command-line flag; values are Python literals, else kept as strings."""
    parsed: dict[str, object] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise ConfigError(
                f"{flag}: {item!r} is not of the form key=value (e.g. weight_decay=0.01 or betas=0.9,0.99)",
                key=flag,
            )
        if key in parsed:
            raise ConfigError(f"{flag}: {key} is given twice; keep one value", key=flag)
        raw = raw.strip()
        try:
            value: object = ast.literal_eval(raw)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            value = raw  # a bare word such as `decay_type=cosine`
        parsed[key] = value
    return parsed


def parse_optimizer_args(items: Sequence[str] | None) -> dict[str, object]:
    """Parse ``--optimizer_args`` (``k=v`` items, values as Python literals, falling back to the string)."""
    return parse_kv_args(items, "--optimizer_args")


def parse_scheduler_args(items: Sequence[str] | None) -> dict[str, object]:
    """Parse ``--lr_scheduler_args`` like ``--optimizer_args``."""
    return parse_kv_args(items, "--lr_scheduler_args")


@dataclass(frozen=True)
class OptimizerSpec:
    """What `fluxlora.training.optim.build_optimizer` needs: the resolved name, the base LR and the parsed args."""

    optimizer_type: str  # aliases (--use_8bit_adam, --use_lion_optimizer) already resolved
    learning_rate: float
    args: Mapping[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class SchedulerSpec:
    """What `fluxlora.training.schedulers.build_scheduler` needs besides the optimizer and the run length."""

    lr_scheduler: str = "constant"
    lr_warmup_steps: int | float = 0  # a float < 1 is a fraction of the steps
    lr_decay_steps: int | float = 0
    lr_scheduler_num_cycles: int = 1
    lr_scheduler_power: float = 1.0
    lr_scheduler_timescale: int | None = None
    lr_scheduler_min_lr_ratio: float | None = None
    lr_scheduler_type: str = ""
    args: Mapping[str, object] = field(default_factory=dict)
    initial_lr: float = 0.0  # what the adafactor schedule reports before the first step (= --learning_rate)


def optim_specs(values: Mapping[str, Any]) -> tuple[OptimizerSpec, SchedulerSpec]:
    """Both specs from the (derived) flag values; raises ConfigError for a malformed args item."""
    optimizer = OptimizerSpec(values["optimizer_type"], float(values["learning_rate"]),
                              parse_optimizer_args(values["optimizer_args"]))
    scheduler = SchedulerSpec(
        lr_scheduler=values["lr_scheduler"], lr_warmup_steps=values["lr_warmup_steps"],
        lr_decay_steps=values["lr_decay_steps"], lr_scheduler_num_cycles=values["lr_scheduler_num_cycles"],
        lr_scheduler_power=values["lr_scheduler_power"], lr_scheduler_timescale=values["lr_scheduler_timescale"],
        lr_scheduler_min_lr_ratio=values["lr_scheduler_min_lr_ratio"], lr_scheduler_type=values["lr_scheduler_type"],
        args=parse_scheduler_args(values["lr_scheduler_args"]), initial_lr=float(values["learning_rate"]),
    )
    return optimizer, scheduler
