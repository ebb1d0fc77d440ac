"""FLUX.1 Kontext [dev] (`--model_type kontext`): the FLUX.1-dev transformer editing a reference image.

- Files: the FLUX.1-dev layout, so nothing in a header tells Kontext from dev: the family is chosen with
  `--model_type kontext` (training, `fluxlora generate`, merge/extract); a dev-layout file is checked like dev.
- Data: every training image has a reference image in its subset's `conditioning_data_dir` (same stem); the model
  sees the reference's latent tokens after the noisy ones, their position ids' first axis 1, and the loss is on the
  noisy tokens only (BFL `prepare_kontext`, diffusers `FluxKontextPipeline`, musubi-tuner). The reference gets the
  image's bucket, crop and flip.
- Sampling: a prompt's `--ci PATH` (generate: `--control_image`) is the reference, resized and centre-cropped to
  the image size; without one Kontext generates from the text alone.
- Memory: twice the image tokens of FLUX.1-dev at the same resolution.
- LoRA files: `modelspec.architecture = flux-1-kontext-dev/lora`, `ss_base_model_version = flux1`; FLUX.1-dev LoRAs
  are accepted with a warning (they are commonly used on Kontext).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor, nn

from fluxlora import flow
from fluxlora.data.pairs import REFERENCE_LATENTS
from fluxlora.errors import CheckpointError
from fluxlora.families import register
from fluxlora.families.base import Autocast, Conditioning, ModelInfo, ModelShape
from fluxlora.families.flux1.family import Flux1
from fluxlora.families.kontext.tokens import noisy_part, with_reference
from fluxlora.models.checkpoints import SafetensorsHeader
from fluxlora.network.metadata import ArchitectureStrings

logger = logging.getLogger(__name__)

ARCHITECTURE = "flux-1-kontext-dev"  # a LoRA adds "/lora"
SAMPLE_STEPS = 28  # diffusers' FluxKontextPipeline default


class Kontext(Flux1):
    name = "kontext"
    model_types = ("kontext",)
    control_kind = "reference"

    def claims(self, header: SafetensorsHeader) -> bool:
        return False  # the dev layout: chosen with --model_type kontext

    def inspect(self, path: Path, *, flag: str) -> ModelInfo:
        info = super().inspect(path, flag=flag)
        p = info.params
        if not p.guidance_embed or p.in_channels != 64 or p.out_channels != 64:
            raise CheckpointError(
                f"{flag} {path}: --model_type kontext needs a FLUX.1 Kontext [dev] file (the FLUX.1-dev layout); this "
                f"file is {info.title} with {p.in_channels} input channels", path=path, key=flag)
        return replace(info, family=self.name, title="FLUX.1 Kontext [dev]")

    def predict(self, model: nn.Module, x_t: Tensor, sigmas: Tensor, cond: Conditioning, *, guidance: float | None,
                mask_text: bool, compute_dtype: torch.dtype, autocast: Autocast) -> Tensor:
        batch, _, height, width = x_t.shape
        device = model.img_in.weight.device
        img = flow.pack_latents(x_t).to(device=device, dtype=compute_dtype)
        img_ids = flow.image_ids(batch, height // 2, width // 2, device=device)
        if REFERENCE_LATENTS in cond:
            img, img_ids = with_reference(img, img_ids, cond[REFERENCE_LATENTS].to(device))
        txt = cond["t5_out"].to(device=device, dtype=compute_dtype)
        txt_ids = flow.text_ids(batch, txt.shape[1], device=device)
        guidance_vec = None if guidance is None else torch.full((batch,), float(guidance), device=device)
        mask = cond["t5_mask"].to(device) if mask_text else None
        with autocast():
            pred = model(img, img_ids, txt, txt_ids, sigmas.to(device),
                         cond["clip_pooled"].to(device=device, dtype=compute_dtype), guidance_vec, mask)
        return flow.unpack_latents(noisy_part(pred, (height // 2) * (width // 2)).float(), height, width)

    def default_sample_steps(self, info: ModelInfo) -> int:
        return SAMPLE_STEPS

    def architecture(self, info: ModelInfo) -> ArchitectureStrings:
        return replace(super().architecture(info), architecture=ARCHITECTURE)

    def check_lora(self, info: ModelInfo, metadata: Mapping[str, str]) -> str | None:
        architecture = metadata.get("modelspec.architecture", "")
        if architecture.startswith("flux-1-dev"):
            logger.warning("this LoRA was trained on FLUX.1-dev (modelspec.architecture %s); applying it to FLUX.1 "
                           "Kontext [dev]", architecture)
            return None
        if architecture and not architecture.startswith("flux-1-kontext"):
            return (f"this LoRA was trained on {architecture.split('/')[0]} (modelspec.architecture {architecture}) "
                    f"but the base model is {info.title}; use a Kontext (or FLUX.1-dev) LoRA")
        return None

    def shape(self, info: ModelInfo) -> ModelShape:
        return replace(super().shape(info), image_token_factor=2)  # the reference's tokens ride along


KONTEXT = register(Kontext())
