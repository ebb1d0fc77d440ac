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
from fluxlora.models.flux import Flux, checkpointed_positions
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
    ae: AutoEncoder | None  # on the host (not the device) when latents are cached; None when nothing needs it
    clip: nn.Module | None  # None once their outputs are cached and they are freed (`Residency`)
    t5: nn.Module | None
    tokenizers: FluxTokenizers
    t5_max_length: int
    swapper: BlockSwapper | None = None


@dataclass(frozen=True)
class Residency:
    """Where the frozen text encoders and AE stay once the caches are built (the memory planner reads the same)."""

    drop_text_encoders: bool  # outputs cached and no text-encoder LoRA: freed after caching
    ae_off_device: bool  # latents cached: the AE leaves the device (back only to decode samples)
    keep_ae: bool  # False when latents are cached and nothing samples: the AE is freed


def residency_for(cfg: TrainConfig) -> Residency:
    """The residency rules of a run (sd-scripts: cache with the models on the device, then move them away)."""
    c = cfg.caching
    # A text-encoder LoRA (no --network_train_unet_only) runs CLIP-L every step, so the encoders stay.
    drop_te = c.cache_text_encoder_outputs and cfg.network.network_train_unet_only
    return Residency(drop_text_encoders=drop_te, ae_off_device=c.cache_latents,
                     keep_ae=not c.cache_latents or cfg.sampling.sample_prompts is not None)


LatentEncodeFn = Callable[[torch.Tensor], torch.Tensor]
TextEncodeFn = Callable[[list[str]], dict[str, torch.Tensor]]


def load_models(cfg: TrainConfig, info: FluxInfo, t5_max_length: int, precision: Precision,
                device: torch.device, *, blocks_to_swap: int | None = None,
                with_ae: Callable[[LatentEncodeFn], None] | None = None,
                with_text_encoders: Callable[[TextEncodeFn], None] | None = None) -> Models:
    """Load the AE, CLIP-L, T5, tokenizers and the DiT (strict key checks inside each loader), one phase at a time,
    so that the device holds the caching models or the training models, not both (`residency_for`):

    1. the AE on the device; `with_ae(encode)` fills the latent cache; with latents cached the AE then moves to the
       host (sampling decodes with it) or is freed;
    2. CLIP-L and T5 on the device; `with_text_encoders(encode)` fills the text cache and encodes the sample
       prompts; with outputs cached and no text-encoder LoRA both are then freed;
    3. the DiT, last, so its file is read after the encoders' memory is released (lower host and device peaks).

    `blocks_to_swap` (default: --blocks_to_swap, `auto` resolved from the free device memory) DiT blocks stay in
    host memory and are streamed to the device (`fluxlora.training.memory`); --torch_compile compiles each block.
    """
    if blocks_to_swap is None:
        from fluxlora.training.planner import resolve_blocks_to_swap

        # before anything is loaded: `auto` compares the planner's whole-run estimate with the free memory
        blocks_to_swap = resolve_blocks_to_swap(cfg, info, device)
    from fluxlora.training.planner import resolve_checkpoint_blocks

    checkpoint_blocks = resolve_checkpoint_blocks(cfg, info, device, blocks_to_swap)  # `auto`: before loading too
    m = cfg.model
    residency = residency_for(cfg)
    tokenizers = load_tokenizers(m.tokenizer_cache_dir)

    ae: AutoEncoder | None = freeze(load_ae(m.ae, dtype=precision.ae, device=device))
    if with_ae is not None:
        with_ae(latent_encoder(ae, precision, device))
    if residency.ae_off_device:
        ae = ae.to("cpu") if residency.keep_ae else None
        _release(device)

    clip = freeze(load_clip_l(m.clip_l, dtype=precision.weight, device=device))
    t5 = freeze(load_t5xxl(m.t5xxl, dtype=None if precision.fp8_text_encoders else precision.weight, device=device))
    if with_text_encoders is not None:
        with_text_encoders(text_encoder_of(tokenizers, clip, t5, t5_max_length, cfg.flow.apply_t5_attn_mask,
                                           precision, device))
    if residency.drop_text_encoders:
        clip = t5 = None  # frozen and fully cached: nothing reads them again, so no host copy either
        _release(device)
        logger.info("text encoders freed: their outputs (and the sample prompts') are cached")

    flux, info, swapper = _load_flux(cfg, precision, device, blocks_to_swap, checkpoint_blocks)
    return Models(flux=flux, flux_info=info, ae=ae, clip=clip, t5=t5, tokenizers=tokenizers,
                  t5_max_length=t5_max_length, swapper=swapper)


def _release(device: torch.device) -> None:
    """Give freed model memory back now, so the next phase (and `mem_get_info`) sees it."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _load_flux(cfg: TrainConfig, precision: Precision, device: torch.device,
               blocks_to_swap: int, checkpoint_blocks: int | None = None) -> tuple[Flux, FluxInfo, BlockSwapper | None]:
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
    flux.checkpointed = checkpointed_positions(info.params.depth, info.params.depth_single_blocks, checkpoint_blocks,
                                               swapper.swapped_positions if swapper else ())
    if cfg.memory.torch_compile:
        from fluxlora.training.compile import compile_blocks

        compile_blocks(flux, backend=cfg.memory.dynamo_backend, mode=cfg.memory.dynamo_mode,
                       fullgraph=cfg.memory.dynamo_fullgraph, dynamic=cfg.memory.dynamo_dynamic)
    return flux, info, swapper


def text_encoder(models: Models, apply_t5_attn_mask: bool, precision: Precision, device: torch.device,
                 *, clip_grad: bool = False, t5_grad: bool = False) -> TextEncodeFn:
    """captions -> {clip_pooled, t5_out, t5_mask} with the run's tokenizers, lengths and autocast."""
    return text_encoder_of(models.tokenizers, models.clip, models.t5, models.t5_max_length, apply_t5_attn_mask,
                           precision, device, clip_grad=clip_grad, t5_grad=t5_grad)


def text_encoder_of(tokenizers: FluxTokenizers, clip: nn.Module | None, t5: nn.Module | None, t5_max_length: int,
                    apply_t5_attn_mask: bool, precision: Precision, device: torch.device,
                    *, clip_grad: bool = False, t5_grad: bool = False) -> TextEncodeFn:
    """`text_encoder` for models not (yet) gathered in a `Models`."""
    if clip is None or t5 is None:
        raise RuntimeError("the text encoders were freed after caching their outputs; nothing may encode now")
    autocast = precision.autocast(device)

    def encode(captions: list[str]) -> dict[str, torch.Tensor]:
        tokens = tokenizers.tokenize(list(captions), t5_max_length)
        with autocast():
            out = encode_prompts(clip, t5, tokens, apply_t5_attn_mask=apply_t5_attn_mask,
                                 clip_grad=clip_grad, t5_grad=t5_grad)
        return {"clip_pooled": out["clip_pooled"].float(), "t5_out": out["t5_out"].float(),
                "t5_mask": out["t5_mask"]}

    return encode


def conditioning_of(batch_text: dict[str, torch.Tensor]) -> Conditioning:
    return Conditioning(batch_text["clip_pooled"], batch_text["t5_out"], batch_text["t5_mask"].bool())


def latent_encoder(ae: AutoEncoder, precision: Precision, device: torch.device) -> LatentEncodeFn:
    """pixels [B,3,H,W] in [-1,1] -> latents [B,16,H/8,W/8] float32 (the posterior mean, spec §12.8 decision)."""

    @torch.no_grad()
    def encode(pixels: torch.Tensor) -> torch.Tensor:
        latents = ae.encode(pixels.to(device=device, dtype=precision.ae)).float()
        return latents  # non-finite values stay visible: the cache refuses them, the NaN guard skips the step

    return encode
