"""Loading the frozen models of a run, one phase at a time, as the plan says (after preflight read every header).

1. the AE on the device; `with_ae(encode)` fills the latent cache; with latents cached the AE then moves to the host
   (sampling decodes with it) or is freed;
2. the family's text encoders on the device; `with_text_encoders(encoders)` fills the text cache and encodes the
   sample prompts; with outputs cached and no text-encoder LoRA they are then freed;
3. the transformer, last, so its file is read after the encoders' memory is released (lower host and device peaks),
   with its training policy around it: fp8 storage, block swap, checkpointing (`training.blocks`), compile.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from fluxlora.families.base import BlockLayout, TextEncoders
from fluxlora.models.fp8 import store_linears_in_fp8
from fluxlora.training.blocks import apply_block_policy
from fluxlora.training.memory import BlockSwapper, place_model
from fluxlora.training.plan import RunPlan
from fluxlora.training.precision import Precision

logger = logging.getLogger(__name__)

LatentEncodeFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Models:
    """The frozen models of a run, where the plan's residency left them."""

    transformer: nn.Module
    layout: BlockLayout
    ae: nn.Module | None  # on the host when latents are cached; None when nothing needs it
    text: TextEncoders  # its modules are None once their outputs are cached and they are freed
    swapper: BlockSwapper | None = None


def freeze(module: nn.Module) -> nn.Module:
    """Frozen models never train: eval mode (no T5 dropout — spec §12.6) and no gradients."""
    module.eval()
    module.requires_grad_(False)
    return module


def latent_encoder(ae: nn.Module, precision: Precision, device: torch.device) -> LatentEncodeFn:
    """pixels [B,3,H,W] in [-1,1] -> latents float32 (the posterior mean, spec §12.8 decision)."""

    @torch.no_grad()
    def encode(pixels: torch.Tensor) -> torch.Tensor:
        # non-finite values stay visible: the cache refuses them, the NaN guard skips the step
        return ae.encode(pixels.to(device=device, dtype=precision.ae)).float()

    return encode


def load_models(plan: RunPlan, device: torch.device, *, with_ae: Callable[[LatentEncodeFn], None] | None = None,
                with_text_encoders: Callable[[TextEncoders], None] | None = None) -> Models:
    """Load the AE, the text encoders and the transformer in the plan's phases (module docstring)."""
    cfg, family, precision, residency = plan.cfg, plan.family, plan.precision, plan.residency

    ae: nn.Module | None = freeze(family.load_autoencoder(cfg.model.ae, dtype=precision.ae, device=device))
    if with_ae is not None:
        with_ae(latent_encoder(ae, precision, device))
    if residency.ae_off_device:
        ae = ae.to("cpu") if residency.keep_ae else None
        _release(device)

    text = family.load_text_encoders(
        plan.encoder_files, dtype=precision.weight, keep_fp8=precision.fp8_text_encoders, device=device,
        tokenizer_dir=cfg.model.tokenizer_cache_dir, max_length=plan.text_length,
        mask_padding=cfg.flow.apply_t5_attn_mask, autocast=precision.autocast(device))
    for module in text.modules.values():
        if module is not None:
            freeze(module)
    if with_text_encoders is not None:
        with_text_encoders(text)
    if residency.drop_text_encoders:
        text.free()  # frozen and fully cached: nothing reads them again, so no host copy either
        _release(device)
        logger.info("text encoders freed: their outputs (and the sample prompts') are cached")

    transformer, layout, swapper = load_transformer(plan, device)
    return Models(transformer=transformer, layout=layout, ae=ae, text=text, swapper=swapper)


def load_transformer(plan: RunPlan, device: torch.device) -> tuple[nn.Module, BlockLayout, BlockSwapper | None]:
    """The transformer in its storage dtype, placed (with block swap), wrapped in the plan's training policy."""
    cfg, precision = plan.cfg, plan.precision
    model = freeze(plan.family.load_transformer(plan.model, dtype=precision.weight, device="cpu"))
    if precision.fp8:
        n = store_linears_in_fp8(model, scaled=cfg.precision.fp8_scaled, keep=plan.family.fp8_keep)
        logger.info("--fp8_base: %d transformer Linear weights stored as float8_e4m3fn%s", n,
                    " with per-row scales (--fp8_scaled)" if cfg.precision.fp8_scaled else "")
    layout = plan.family.blocks(model)
    swapper = place_model(model, layout, device, plan.blocks_to_swap)
    if cfg.memory.torch_compile:
        from fluxlora.training.compile import compile_blocks

        compile_blocks(layout, backend=cfg.memory.dynamo_backend, mode=cfg.memory.dynamo_mode,
                       fullgraph=cfg.memory.dynamo_fullgraph, dynamic=cfg.memory.dynamo_dynamic)
    if plan.checkpointed != frozenset():
        apply_block_policy(layout, checkpointed=plan.checkpointed, offload=cfg.memory.cpu_offload_checkpointing,
                           device=device)
    return model, layout, swapper


def _release(device: torch.device) -> None:
    """Give freed model memory back now, so the next phase (and `mem_get_info`) sees it."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
