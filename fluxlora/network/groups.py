"""Optimizer parameter groups of a LoRA network (spec §5.4), with readable names for the `lr/<name>` logs.

Per component — CLIP-L (`text_encoder_lr[0]`), T5 (`text_encoder_lr[1]`), DiT (`unet_lr`, else `learning_rate`):
the `network_reg_lrs` groups first (in pattern order; a module belongs to the **last** pattern that matches its
name, the documented semantics), then the default group, and with LoRA+ a "plus" twin of each holding the
`lora_up` weights at `lr × ratio`. Groups whose learning rate is 0 or None are left out (their parameters are
frozen so they are not trained by accident).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import nn

from fluxlora.config.network_args import NetworkArgs, last_match
from fluxlora.errors import ConfigError

logger = logging.getLogger(__name__)

_COMPONENT_LABELS = {"clip_l": "textencoder clip_l", "t5xxl": "textencoder t5xxl", "unet": "unet"}


@dataclass
class ParamGroups:
    """`groups` go to the optimizer as they are; `names[i]` describes `groups[i]` (log as `lr/<name>`)."""

    groups: list[dict] = field(default_factory=list)
    names: list[str] = field(default_factory=list)


def text_encoder_lrs(text_encoder_lr: float | Sequence[float] | None, learning_rate: float | None) -> tuple[float | None, float | None]:
    """`--text_encoder_lr`: none → learning_rate for both; one value → CLIP-L and T5; two → [CLIP-L, T5]."""
    if text_encoder_lr is None:
        values: list[float] = []
    elif isinstance(text_encoder_lr, (int, float)):
        values = [float(text_encoder_lr)]
    else:
        values = [float(v) for v in text_encoder_lr]
    if len(values) == 0:
        return learning_rate, learning_rate
    if len(values) == 1:
        return values[0], values[0]
    if len(values) == 2:
        return values[0], values[1]
    raise ConfigError(f"--text_encoder_lr takes one value (both encoders) or two (CLIP-L, T5), got {len(values)}",
                      key="text_encoder_lr")


def build_param_groups(
    loras: Sequence[nn.Module],
    args: NetworkArgs,
    *,
    learning_rate: float | None,
    unet_lr: float | None = None,
    text_encoder_lr: float | Sequence[float] | None = None,
) -> ParamGroups:
    """Parameter groups for `loras` (LoRAModules with `.component` and `.lora_name`), see the module docstring."""
    clip_lr, t5_lr = text_encoder_lrs(text_encoder_lr, learning_rate)
    component_lr = {"clip_l": clip_lr, "t5xxl": t5_lr, "unet": unet_lr if unet_lr is not None else learning_rate}
    result = ParamGroups()
    for component in ("clip_l", "t5xxl", "unet"):
        members = [m for m in loras if m.component == component]
        if not members:
            continue
        ratio = args.unet_plus_ratio if component == "unet" else args.text_encoder_plus_ratio
        base_lr = component_lr[component]
        label = _COMPONENT_LABELS[component]
        # bucket -1 is the default group; bucket i the i-th reg-LR pattern.
        buckets: dict[int, tuple[list, list]] = {}
        for module in members:
            found = last_match(args.network_reg_lrs, module.lora_name)
            index = found[0] if found else -1
            plain, plus = buckets.setdefault(index, ([], []))
            for name, param in module.named_parameters():
                (plus if ratio is not None and name.startswith("lora_up") else plain).append(param)
        for index in sorted(buckets, key=lambda i: (i < 0, i)):
            lr = base_lr if index < 0 else args.network_reg_lrs[index].value
            name = label if index < 0 else f"{label} reg_lr {index} ({args.network_reg_lrs[index].text})"
            for params, group_lr, suffix in ((buckets[index][0], lr, ""),
                                             (buckets[index][1], None if lr is None or ratio is None else lr * ratio, " plus")):
                if not params:
                    continue
                if not group_lr:
                    logger.info("parameter group %r has learning rate %s: left out of the optimizer (frozen)",
                                name + suffix, group_lr)
                    for p in params:
                        p.requires_grad_(False)
                    continue
                result.groups.append({"params": params, "lr": float(group_lr)})
                result.names.append(name + suffix)
    return result
