"""Optimizers by their sd-scripts names (``--optimizer_type``), their arguments, and schedule-free modes.

Names are case-insensitive as in sd-scripts (spec §1.4); anything else is a class path ``module.Class``
(a bare class name is looked up in ``torch.optim``). Optional packages are imported only when chosen.
Learning-rate schedulers live in :mod:`fluxlora.training.schedulers`.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import torch

from fluxlora.config.optim_specs import parse_kv_args, parse_optimizer_args
from fluxlora.errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = [
    "OPTIMIZERS",
    "build_optimizer",
    "check_optimizer",
    "dummy_optimizer",
    "eval_mode",
    "is_schedule_free",
    "optimizer_eval_mode",
    "optimizer_train_mode",
    "parse_kv_args",
    "parse_optimizer_args",
    "required_scheduler",
    "resolve_optimizer_name",
]


class _Spec(NamedTuple):
    module: str
    attr: str
    pip: str


_BNB = "bitsandbytes.optim"
# sd-scripts name (lower case) -> where the class lives and which pip package provides it.
OPTIMIZERS: dict[str, _Spec] = {
    "adamw": _Spec("torch.optim", "AdamW", "torch"),
    "adamw8bit": _Spec(_BNB, "AdamW8bit", "bitsandbytes"),
    "pagedadamw": _Spec(_BNB, "PagedAdamW", "bitsandbytes"),
    "pagedadamw8bit": _Spec(_BNB, "PagedAdamW8bit", "bitsandbytes"),
    "pagedadamw32bit": _Spec(_BNB, "PagedAdamW32bit", "bitsandbytes"),
    "ademamix8bit": _Spec(_BNB, "AdEMAMix8bit", "bitsandbytes"),
    "pagedademamix8bit": _Spec(_BNB, "PagedAdEMAMix8bit", "bitsandbytes"),
    "lion": _Spec("lion_pytorch", "Lion", "lion-pytorch"),
    "lion8bit": _Spec(_BNB, "Lion8bit", "bitsandbytes"),
    "pagedlion8bit": _Spec(_BNB, "PagedLion8bit", "bitsandbytes"),
    "sgdnesterov": _Spec("torch.optim", "SGD", "torch"),
    "sgdnesterov8bit": _Spec(_BNB, "SGD8bit", "bitsandbytes"),
    "dadaptation": _Spec("dadaptation.experimental", "DAdaptAdamPreprint", "dadaptation"),
    "dadaptadampreprint": _Spec("dadaptation.experimental", "DAdaptAdamPreprint", "dadaptation"),
    "dadaptadagrad": _Spec("dadaptation", "DAdaptAdaGrad", "dadaptation"),
    "dadaptadam": _Spec("dadaptation", "DAdaptAdam", "dadaptation"),
    "dadaptadan": _Spec("dadaptation", "DAdaptAdan", "dadaptation"),
    "dadaptadanip": _Spec("dadaptation.experimental", "DAdaptAdanIP", "dadaptation"),
    "dadaptlion": _Spec("dadaptation", "DAdaptLion", "dadaptation"),
    "dadaptsgd": _Spec("dadaptation", "DAdaptSGD", "dadaptation"),
    "prodigy": _Spec("prodigyopt", "Prodigy", "prodigyopt"),
    "adafactor": _Spec("transformers.optimization", "Adafactor", "transformers"),
    "radamschedulefree": _Spec("schedulefree", "RAdamScheduleFree", "schedulefree"),
    "adamwschedulefree": _Spec("schedulefree", "AdamWScheduleFree", "schedulefree"),
    "sgdschedulefree": _Spec("schedulefree", "SGDScheduleFree", "schedulefree"),
}
_DISPLAY_NAMES = (
    "AdamW, AdamW8bit, PagedAdamW, PagedAdamW8bit, PagedAdamW32bit, AdEMAMix8bit, PagedAdEMAMix8bit, Lion, Lion8bit, "
    "PagedLion8bit, SGDNesterov, SGDNesterov8bit, DAdaptation, DAdaptAdamPreprint, DAdaptAdaGrad, DAdaptAdam, "
    "DAdaptAdan, DAdaptAdanIP, DAdaptLion, DAdaptSGD, Prodigy, Adafactor, RAdamScheduleFree, AdamWScheduleFree, "
    "SGDScheduleFree, a torch.optim class name, or a class path such as pytorch_optimizer.CAME"
)
# Top-level modules whose pip package name differs from the module name.
_PIP_NAMES = {
    "lion_pytorch": "lion-pytorch",
    "pytorch_optimizer": "pytorch-optimizer",
    "prodigyopt": "prodigyopt",
}


# --------------------------------------------------------------------------------------------- names/args


def resolve_optimizer_name(optimizer_type: str | None, use_8bit_adam: bool, use_lion_optimizer: bool) -> str:
    """The effective ``--optimizer_type``: the legacy ``--use_8bit_adam`` / ``--use_lion_optimizer`` flags
    map to AdamW8bit / Lion; combining them with each other or with ``--optimizer_type`` is an error."""
    chosen = (optimizer_type or "").strip()
    if use_8bit_adam and use_lion_optimizer:
        raise ConfigError(
            "--use_8bit_adam and --use_lion_optimizer are both set; keep one, or use --optimizer_type instead",
            key="--use_8bit_adam",
        )
    legacy = "--use_8bit_adam" if use_8bit_adam else "--use_lion_optimizer" if use_lion_optimizer else None
    if legacy and chosen:
        raise ConfigError(
            f"{legacy} cannot be combined with --optimizer_type {chosen}; drop {legacy} (it is a legacy alias)",
            key=legacy,
        )
    if use_8bit_adam:
        return "AdamW8bit"
    if use_lion_optimizer:
        return "Lion"
    return chosen or "AdamW"


# ------------------------------------------------------------------------------------------------- build


def _import_class(module_name: str, attr: str, pip: str | None, what: str) -> type:
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        package = pip or _PIP_NAMES.get(
            module_name.split(".")[0], module_name.split(".")[0].replace("_", "-")
        )
        raise ConfigError(
            f"{what} needs the Python package {package!r}, which is not installed; run `pip install {package}`",
            key="--optimizer_type",
        ) from exc
    cls = getattr(module, attr, None)
    if not isinstance(cls, type):
        raise ConfigError(
            f"{what}: {module_name} has no class {attr}; valid names: {_DISPLAY_NAMES}",
            key="--optimizer_type",
        )
    return cls


def _optimizer_class(optimizer_type: str) -> tuple[str, type]:
    """(lower-case sd-scripts key or '' for a class path, the optimizer class)."""
    key = optimizer_type.lower()
    spec = OPTIMIZERS.get(key)
    if spec is not None:
        return key, _import_class(spec.module, spec.attr, spec.pip, f"--optimizer_type {optimizer_type}")
    if "." in optimizer_type:
        module_name, _, attr = optimizer_type.rpartition(".")
        return "", _import_class(module_name, attr, None, f"--optimizer_type {optimizer_type}")
    cls = getattr(torch.optim, optimizer_type, None)
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise ConfigError(
            f"--optimizer_type {optimizer_type!r} is unknown; valid names: {_DISPLAY_NAMES}",
            key="--optimizer_type",
        )
    return "", cls


def _first_lr(param_groups: list[dict], learning_rate: float) -> tuple[float, int]:
    lrs = [group.get("lr", learning_rate) for group in param_groups] or [learning_rate]
    return lrs[0], len(set(lrs))


def _prepare_kwargs(
    key: str, param_groups: list[dict], learning_rate: float, kwargs: dict[str, Any]
) -> float | None:
    """Apply sd-scripts' per-optimizer defaults and warnings; returns the lr to construct with."""
    if key in ("sgdnesterov", "sgdnesterov8bit"):
        if kwargs.get("nesterov", True) is not True:
            raise ConfigError(f"--optimizer_type {key} is Nesterov SGD; drop nesterov from --optimizer_args")
        kwargs["nesterov"] = True
        if "momentum" not in kwargs:
            logger.info("SGD with Nesterov needs momentum; using momentum=0.9")
            kwargs["momentum"] = 0.9
    elif key.startswith("dadapt") or key == "prodigy":
        first, count = _first_lr(param_groups, learning_rate)
        if first <= 0.1:
            logger.warning("learning rate %s is low for D-Adaptation/Prodigy, which expect about 1.0", first)
        if count > 1:
            logger.warning(
                "D-Adaptation/Prodigy honour only the first parameter group's learning rate (%s)", first
            )
    elif key == "adafactor":
        kwargs.setdefault("relative_step", True)  # sd-scripts' default, unlike transformers'
        if not kwargs["relative_step"] and kwargs.get("warmup_init", False):
            logger.info("Adafactor warmup_init=True needs relative_step=True; setting relative_step=True")
            kwargs["relative_step"] = True
        if kwargs["relative_step"]:
            # Adafactor computes its own step size; per-group LRs and --learning_rate are not used.
            if any(group.pop("lr", None) is not None for group in param_groups):
                logger.warning("Adafactor with relative_step=True ignores the per-group learning rates")
            logger.info("Adafactor relative_step=True: the adafactor LR scheduler is used")
            return None
    return learning_rate


def _construct(optimizer_type: str, param_groups: list[dict], learning_rate: float,
               optimizer_args: Mapping[str, object] | None) -> tuple[torch.optim.Optimizer, type, dict[str, object]]:
    key, cls = _optimizer_class(resolve_optimizer_name(optimizer_type, False, False))
    groups = [dict(group) for group in param_groups]
    kwargs = dict(optimizer_args or {})
    lr = _prepare_kwargs(key, groups, learning_rate, kwargs)
    try:
        return cls(groups, lr=lr, **kwargs), cls, kwargs
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"--optimizer_args {kwargs} do not suit {cls.__module__}.{cls.__name__}: {exc}; fix or remove them",
            key="--optimizer_args",
        ) from exc


def dummy_optimizer(optimizer_type: str, *, learning_rate: float,
                    optimizer_args: Mapping[str, object] | None) -> torch.optim.Optimizer:
    """The optimizer over one dummy parameter (for checks that need an optimizer object, e.g. the scheduler's)."""
    optimizer, _, _ = _construct(optimizer_type, [{"params": [torch.zeros(1, requires_grad=True)]}], learning_rate,
                                 dict(optimizer_args or {}))
    return optimizer


def check_optimizer(optimizer_type: str, *, learning_rate: float,
                    optimizer_args: Mapping[str, object] | None) -> None:
    """Build the optimizer over one dummy parameter: an unknown name, a missing package or arguments the class
    refuses fail here, in the preflight, instead of after the models are loaded."""
    dummy_optimizer(optimizer_type, learning_rate=learning_rate, optimizer_args=optimizer_args)


def build_optimizer(
    optimizer_type: str,
    param_groups: list[dict],
    *,
    learning_rate: float,
    optimizer_args: Mapping[str, object] | None = None,
) -> tuple[torch.optim.Optimizer, str]:
    """Create the optimizer named by ``--optimizer_type`` over ``param_groups`` (not modified).

    Returns the optimizer and its description as written to ``ss_optimizer`` (``module.Class(k=v,...)``).
    Schedule-free optimizers come back in train mode; Adafactor with ``relative_step`` (default True, as in
    sd-scripts) needs the ``adafactor`` scheduler, which :func:`required_scheduler` reports.
    """
    optimizer, cls, kwargs = _construct(optimizer_type, param_groups, learning_rate, optimizer_args)
    optimizer_train_mode(optimizer)
    args_text = ",".join(f"{k}={v}" for k, v in kwargs.items())
    description = f"{cls.__module__}.{cls.__name__}" + (f"({args_text})" if args_text else "")
    logger.info("optimizer: %s", description)
    return optimizer, description


def required_scheduler(optimizer: torch.optim.Optimizer) -> str | None:
    """``"adafactor"`` when the optimizer sets its own step size (Adafactor, relative_step=True), else None."""
    if type(optimizer).__name__ == "Adafactor" and optimizer.defaults.get("relative_step"):
        return "adafactor"
    return None


# ---------------------------------------------------------------------------------- schedule-free modes


def is_schedule_free(optimizer: object) -> bool:
    """True for optimizers with separate train/eval parameter modes (schedulefree, pytorch_optimizer's SF)."""
    return callable(getattr(optimizer, "train", None)) and callable(getattr(optimizer, "eval", None))


def optimizer_train_mode(optimizer: object) -> None:
    """Put a schedule-free optimizer's parameters in training mode; a no-op for other optimizers."""
    if is_schedule_free(optimizer):
        optimizer.train()  # type: ignore[attr-defined]


def optimizer_eval_mode(optimizer: object) -> None:
    """Put a schedule-free optimizer's parameters in evaluation mode; a no-op for other optimizers."""
    if is_schedule_free(optimizer):
        optimizer.eval()  # type: ignore[attr-defined]


@contextlib.contextmanager
def eval_mode(optimizer: object) -> Iterator[None]:
    """Evaluation-mode parameters inside the block (validation, sampling, saving); the previous mode after it."""
    groups = getattr(optimizer, "param_groups", None) or [{}]
    was_training = bool(groups[0].get("train_mode", True))
    optimizer_eval_mode(optimizer)
    try:
        yield
    finally:
        if was_training:
            optimizer_train_mode(optimizer)
