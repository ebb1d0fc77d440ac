"""Loading what a run needs: the frozen models in their training dtypes, the tokenizers and the LoRA network.

Heavy work happens here, after preflight has read every header, the dataset and the output folder.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from fluxlora.config.train_config import TrainConfig
from fluxlora.models.autoencoder import AutoEncoder, load_ae
from fluxlora.models.flux import Flux
from fluxlora.models.flux_loading import FluxInfo, load_flux
from fluxlora.models.fp8 import store_linears_in_fp8
from fluxlora.models.text_encoders import encode_prompts, load_clip_l, load_t5xxl
from fluxlora.models.tokenizers import FluxTokenizers, load_tokenizers
from fluxlora.training.memory import BlockSwapper, place_flux
from fluxlora.training.step import Conditioning

logger = logging.getLogger(__name__)

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Precision:
    """dtypes of a run: frozen weights, autocast compute, LoRA parameters, autoencoder."""

    weight: torch.dtype  # storage dtype of the frozen DiT and text encoders
    compute: torch.dtype  # dtype the DiT computes in (autocast when mixed precision)
    lora: torch.dtype
    ae: torch.dtype
    mixed: bool
    fp8: bool
    fp8_text_encoders: bool

    def autocast(self, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
        if not self.mixed:
            return contextlib.nullcontext
        return lambda: torch.autocast(device_type=device.type, dtype=self.compute)


def precision_for(cfg: TrainConfig) -> Precision:
    """The dtypes implied by --mixed_precision, --full_bf16/--full_fp16, --fp8_base(_unet) and --no_half_vae."""
    p = cfg.precision
    compute = DTYPES[p.mixed_precision]
    lora = compute if (p.full_bf16 or p.full_fp16) else torch.float32
    ae = torch.float32 if p.no_half_vae else compute
    return Precision(weight=compute, compute=compute, lora=lora, ae=ae, mixed=p.mixed_precision != "no",
                     fp8=p.fp8_base, fp8_text_encoders=p.fp8_base and not p.fp8_base_unet)


def freeze(module: nn.Module) -> nn.Module:
    """Frozen models never train: eval mode (no T5 dropout — spec §12.6) and no gradients."""
    module.eval()
    module.requires_grad_(False)
    return module


@dataclass
class Models:
    flux: Flux
    flux_info: FluxInfo
    ae: AutoEncoder | None
    clip: nn.Module | None
    t5: nn.Module | None
    tokenizers: FluxTokenizers
    t5_max_length: int
    swapper: BlockSwapper | None = None


def load_models(cfg: TrainConfig, info: FluxInfo, t5_max_length: int, precision: Precision,
                device: torch.device, *, need_text_encoders: bool = True, need_ae: bool = True,
                blocks_to_swap: int | None = None) -> Models:
    """Load the DiT, AE, CLIP-L, T5 and tokenizers (strict key checks inside each loader).

    `blocks_to_swap` (default: --blocks_to_swap, `auto` resolved from the free device memory) DiT blocks stay in
    host memory and are streamed to the device (`fluxlora.training.memory`); --torch_compile compiles each block.
    """
    if blocks_to_swap is None:
        from fluxlora.training.planner import resolve_blocks_to_swap

        blocks_to_swap = resolve_blocks_to_swap(cfg, info, device)
    m = cfg.model
    flux, info = load_flux(m.pretrained_model_name_or_path, dtype=precision.weight, device="cpu")
    freeze(flux)
    if precision.fp8:
        n = store_linears_in_fp8(flux, scaled=cfg.precision.fp8_scaled)
        logger.info("--fp8_base: %d transformer Linear weights stored as float8_e4m3fn%s", n,
                    " with per-row scales (--fp8_scaled)" if cfg.precision.fp8_scaled else "")
    flux.gradient_checkpointing = cfg.memory.gradient_checkpointing
    flux.cpu_offload_checkpointing = cfg.memory.cpu_offload_checkpointing
    swapper = place_flux(flux, device, blocks_to_swap)
    flux.requires_checkpointing = swapper is not None
    if cfg.memory.torch_compile:
        from fluxlora.training.compile import compile_blocks

        compile_blocks(flux, backend=cfg.memory.dynamo_backend, mode=cfg.memory.dynamo_mode,
                       fullgraph=cfg.memory.dynamo_fullgraph, dynamic=cfg.memory.dynamo_dynamic)
    ae = freeze(load_ae(m.ae, dtype=precision.ae, device=device)) if need_ae else None
    clip = t5 = None
    if need_text_encoders:
        clip = freeze(load_clip_l(m.clip_l, dtype=precision.weight, device=device))
        t5 = freeze(load_t5xxl(m.t5xxl, dtype=None if precision.fp8_text_encoders else precision.weight, device=device))
    tokenizers = load_tokenizers(m.tokenizer_cache_dir)
    return Models(flux=flux, flux_info=info, ae=ae, clip=clip, t5=t5, tokenizers=tokenizers,
                  t5_max_length=t5_max_length, swapper=swapper)


def text_encoder(models: Models, apply_t5_attn_mask: bool, precision: Precision, device: torch.device,
                 *, clip_grad: bool = False, t5_grad: bool = False) -> Callable[[list[str]], dict[str, torch.Tensor]]:
    """captions -> {clip_pooled, t5_out, t5_mask} with the run's tokenizers, lengths and autocast."""
    autocast = precision.autocast(device)

    def encode(captions: list[str]) -> dict[str, torch.Tensor]:
        tokens = models.tokenizers.tokenize(list(captions), models.t5_max_length)
        with autocast():
            out = encode_prompts(models.clip, models.t5, tokens, apply_t5_attn_mask=apply_t5_attn_mask,
                                 clip_grad=clip_grad, t5_grad=t5_grad)
        return {"clip_pooled": out["clip_pooled"].float(), "t5_out": out["t5_out"].float(),
                "t5_mask": out["t5_mask"]}

    return encode


def conditioning_of(batch_text: dict[str, torch.Tensor]) -> Conditioning:
    return Conditioning(batch_text["clip_pooled"], batch_text["t5_out"], batch_text["t5_mask"].bool())


def latent_encoder(ae: AutoEncoder, precision: Precision, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """pixels [B,3,H,W] in [-1,1] -> latents [B,16,H/8,W/8] float32 (the posterior mean, spec §12.8 decision)."""

    @torch.no_grad()
    def encode(pixels: torch.Tensor) -> torch.Tensor:
        latents = ae.encode(pixels.to(device=device, dtype=precision.ae)).float()
        return latents  # non-finite values stay visible: the cache refuses them, the NaN guard skips the step

    return encode
