"""Fixtures for the inference tests: the tiny checkpoints loaded once, an encode function, diffusers references."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from fluxlora.families.base import ModelInfo
from fluxlora.families.flux1.family import FLUX1, T5_LENGTH
from fluxlora.models.autoencoder import AutoEncoder, load_ae
from fluxlora.models.flux import Flux
from fluxlora.models.flux_loading import load_flux
from fluxlora.models.text_encoders import encode_prompts, load_clip_l, load_t5xxl
from fluxlora.models.tokenizers import FluxTokenizers, load_tokenizers


@dataclass
class TinyModels:
    flux: dict[str, Flux]  # "dev" / "schnell"
    ae: AutoEncoder
    clip: nn.Module
    t5: nn.Module
    tokenizers: FluxTokenizers
    info: dict[str, ModelInfo]  # "dev" / "schnell", as the FLUX.1 family inspects the files

    def encode_fn(self, variant: str, *, apply_t5_attn_mask: bool = False, t5_max_length: int | None = None):
        length = t5_max_length or T5_LENGTH[variant]

        def encode(texts: list[str]) -> dict[str, torch.Tensor]:
            tokens = self.tokenizers.tokenize(list(texts), length)
            return encode_prompts(self.clip, self.t5, tokens, apply_t5_attn_mask=apply_t5_attn_mask)

        return encode


@pytest.fixture(scope="session")
def tiny_models(tiny_ckpts) -> TinyModels:
    """The tiny fp32 models, read-only: tests that change weights load their own copy."""
    flux = {v: load_flux(getattr(tiny_ckpts, f"flux_{v}"), dtype=torch.float32)[0].eval() for v in ("dev", "schnell")}
    return TinyModels(
        flux=flux,
        ae=load_ae(tiny_ckpts.ae, dtype=torch.float32),
        clip=load_clip_l(tiny_ckpts.clip_l, dtype=torch.float32),
        t5=load_t5xxl(tiny_ckpts.t5xxl, dtype=torch.float32),
        tokenizers=load_tokenizers(),
        info={v: FLUX1.inspect(getattr(tiny_ckpts, f"flux_{v}"), flag="--ckpt_path") for v in ("dev", "schnell")},
    )
