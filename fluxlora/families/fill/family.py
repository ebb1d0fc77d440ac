"""FLUX.1 Fill [dev] (in/out-painting): FLUX.1-dev whose `img_in` reads 384 channels per token (noisy latents ‖ the
masked image's latents ‖ the packed mask) and predicts 64.

- Files: detected from the header (`img_in` with 384 input features; diffusers: `x_embedder`), or `--model_type
  fill`; BFL, diffusers and fp8 files as for FLUX.1.
- Data: every training image has a mask in its subset's `conditioning_data_dir` (same stem; white = the region to
  paint, binarised at 50 %), resized, cropped and flipped with the image; the model sees the image with that region
  blanked (BFL `prepare_fill`, diffusers `FluxFillPipeline`). The loss covers the whole image, as the model
  predicts all of it (use `alpha_mask` for a loss mask).
- Sampling: a prompt's `--ci IMAGE --mi MASK` (generate: `--control_image` and `--mask_image`) are required.
- LoRA files: `modelspec.architecture = flux-1-fill-dev/lora`, `ss_base_model_version = flux1`; FLUX.1-dev LoRAs are
  accepted with a warning (their `img_in` part, if any, does not fit).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor, nn

from fluxlora import flow
from fluxlora.data.pairs import MASK, MASKED_LATENTS
from fluxlora.errors import CheckpointError, ConfigError
from fluxlora.families import register
from fluxlora.families.base import Autocast, Conditioning, ModelInfo
from fluxlora.families.fill.inputs import fill_conditioning, fill_input
from fluxlora.families.flux1.family import Flux1, _in_features
from fluxlora.models.checkpoints import ModelKind, SafetensorsHeader, detect_kind
from fluxlora.network.metadata import ArchitectureStrings

logger = logging.getLogger(__name__)

FILL_IN_CHANNELS = 384
ARCHITECTURE = "flux-1-fill-dev"  # a LoRA adds "/lora"
SAMPLE_STEPS = 50


class Fill(Flux1):
    name = "fill"
    model_types = ("fill",)
    control_kind = "mask"

    def claims(self, header: SafetensorsHeader) -> bool:
        kind = detect_kind(header.tensors)
        key = {ModelKind.FLUX: "img_in.weight", ModelKind.FLUX_DIFFUSERS: "x_embedder.weight"}.get(kind)
        return key is not None and _in_features(header, key) == FILL_IN_CHANNELS

    def inspect(self, path: Path, *, flag: str) -> ModelInfo:
        info = super().inspect(path, flag=flag)
        p = info.params
        if p.in_channels != FILL_IN_CHANNELS or p.out_channels != 64 or not p.guidance_embed:
            raise CheckpointError(
                f"{flag} {path}: not a FLUX.1 Fill [dev] file: its img_in reads {p.in_channels} channels (Fill: "
                f"{FILL_IN_CHANNELS}); drop --model_type fill for a FLUX.1 file", path=path, key=flag)
        return replace(info, family=self.name, title="FLUX.1 Fill [dev]")

    def predict(self, model: nn.Module, x_t: Tensor, sigmas: Tensor, cond: Conditioning, *, guidance: float | None,
                mask_text: bool, compute_dtype: torch.dtype, autocast: Autocast) -> Tensor:
        if MASK not in cond or MASKED_LATENTS not in cond:
            raise ConfigError("FLUX.1 Fill needs an image and a mask for every sample: set conditioning_data_dir in "
                              "the dataset, or --ci IMAGE --mi MASK in the prompt", key="conditioning_data_dir")
        batch, _, height, width = x_t.shape
        device = model.img_in.weight.device
        conditioning = fill_conditioning(cond[MASKED_LATENTS].to(device), cond[MASK].to(device))
        img = fill_input(flow.pack_latents(x_t).to(device=device, dtype=compute_dtype), conditioning)
        img_ids = flow.image_ids(batch, height // 2, width // 2, device=device)
        txt = cond["t5_out"].to(device=device, dtype=compute_dtype)
        txt_ids = flow.text_ids(batch, txt.shape[1], device=device)
        guidance_vec = None if guidance is None else torch.full((batch,), float(guidance), device=device)
        mask = cond["t5_mask"].to(device) if mask_text else None
        with autocast():
            pred = model(img, img_ids, txt, txt_ids, sigmas.to(device),
                         cond["clip_pooled"].to(device=device, dtype=compute_dtype), guidance_vec, mask)
        return flow.unpack_latents(pred.float(), height, width)

    def default_sample_steps(self, info: ModelInfo) -> int:
        return SAMPLE_STEPS

    def architecture(self, info: ModelInfo) -> ArchitectureStrings:
        return replace(super().architecture(info), architecture=ARCHITECTURE)

    def check_lora(self, info: ModelInfo, metadata: Mapping[str, str]) -> str | None:
        architecture = metadata.get("modelspec.architecture", "")
        if architecture.startswith("flux-1-dev"):
            logger.warning("this LoRA was trained on FLUX.1-dev (modelspec.architecture %s); applying it to FLUX.1 "
                           "Fill [dev]", architecture)
            return None
        if architecture and not architecture.startswith("flux-1-fill"):
            return (f"this LoRA was trained on {architecture.split('/')[0]} (modelspec.architecture {architecture}) "
                    f"but the base model is {info.title}; use a Fill (or FLUX.1-dev) LoRA")
        return None


FILL = register(Fill())
