"""The dtypes of a run, decided once from --mixed_precision, --full_bf16/--full_fp16, --fp8_base(_unet) and
--no_half_vae."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fluxlora.config.train_config import TrainConfig

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Precision:
    """dtypes of a run: frozen weights, autocast compute, LoRA parameters, autoencoder."""

    weight: torch.dtype  # storage dtype of the frozen transformer and text encoders
    compute: torch.dtype  # dtype the transformer computes in (autocast when mixed precision)
    lora: torch.dtype
    ae: torch.dtype
    mixed: bool
    fp8: bool
    fp8_text_encoders: bool

    def autocast(self, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
        if not self.mixed:
            return contextlib.nullcontext
        return lambda: torch.autocast(device_type=device.type, dtype=self.compute)

    def bytes(self, which: str) -> int:
        """Bytes per element of the `weight`, `compute`, `lora` or `ae` dtype."""
        return torch.empty((), dtype=getattr(self, which)).element_size()


def precision_for(cfg: TrainConfig) -> Precision:
    p = cfg.precision
    compute = DTYPES[p.mixed_precision]
    lora = compute if (p.full_bf16 or p.full_fp16) else torch.float32
    ae = torch.float32 if p.no_half_vae else compute
    return Precision(weight=compute, compute=compute, lora=lora, ae=ae, mixed=p.mixed_precision != "no",
                     fp8=p.fp8_base, fp8_text_encoders=p.fp8_base and not p.fp8_base_unet)
