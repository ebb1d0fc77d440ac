"""FLUX.2 [dev] and FLUX.2 [klein] 4B / 9B (base and distilled) behind the model-family seam.

- Files: the transformer is claimed from its header (the shared `single_stream_modulation`, BFL or diffusers layout);
  dev / klein 4B / klein 9B from its shapes, klein base vs distilled from `--model_version` (musubi-tuner's spelling),
  else "base" in the file name. One text encoder, `--text_encoder` (Mistral Small 3 for dev, Qwen3 4B / 8B for
  klein: musubi-tuner's flag), checked against the transformer from the headers; the FLUX.2 AE (`--ae`).
- Latents: the AE's normalised 2×2-patched 128-channel latent is kept un-patched, [B, 32, H/8, W/8] (a pure
  permutation: the loss, the noise and every flow-matching step are element-wise, so training is unchanged, and the
  latent cache, loss masks and buckets work at the FLUX.1 scale). `predict` packs it into 128-channel tokens exactly as
  the pipelines patchify and pack, with (t, h, w, l) = (0, row, col, 0) ids; a reference image's tokens follow with
  t = 10 and are cut from the prediction.
- Guidance: dev is guidance-distilled (it takes `--guidance_scale` while training, the prompt's `--g` while
  sampling); klein takes none. klein base is sampled with classifier-free guidance when the prompt asks (`--l 4`).
- Sampling: BFL's empirical time shift (`sampling.schedule`); 50 steps for dev and klein base, 4 for distilled klein;
  the starting noise is drawn in the pipelines' [1, 128, H/16, W/16] layout, so a seed gives their image.
- LoRA files: `modelspec.architecture` flux-2-dev / flux-2-klein-4b / flux-2-klein-9b (+ "/lora"; base and distilled
  share it: a LoRA trained on klein base applies to distilled klein), `ss_base_model_version` flux2; a FLUX.1 LoRA
  is refused before any weight is read.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fluxlora import flow
from fluxlora.errors import CheckpointError, ConfigError
from fluxlora.families import register
from fluxlora.families.base import (
    Autocast,
    BlockLayout,
    Conditioning,
    EncoderFile,
    ModelFamily,
    ModelInfo,
    ModelShape,
    TextEncoders,
    TextOutput,
)
from fluxlora.families.flux1.shape import ae_encode_bytes
from fluxlora.families.flux2 import latents as lat
from fluxlora.families.flux2.encoders import COMPONENT, FLAG, PROMPT_EMBEDS, find_tokenizer
from fluxlora.families.flux2.loading import Flux2Info, inspect_flux2, is_flux2_keys
from fluxlora.families.flux2.params import check_text_encoder_fits
from fluxlora.families.flux2.sampling import SAMPLER_DEFAULTS, schedule
from fluxlora.families.flux2.shape import flux2_shape, text_encode_bytes
from fluxlora.models.checkpoints import ModelKind, SafetensorsHeader
from fluxlora.network.metadata import ArchitectureStrings

logger = logging.getLogger(__name__)

IMPLEMENTATION = "https://github.com/black-forest-labs/flux2"
BASE_MODEL_VERSION = "flux2"  # ss_base_model_version of every FLUX.2 file
MAX_TEXT_LENGTH = 512
REFERENCE_LATENTS = "reference_latents"  # a reference image's latents in the conditioning (the pairs' name)
MODEL_FLAG = "--pretrained_model_name_or_path"
_TITLES = {"dev": "FLUX.2 [dev]", "klein-4b": "FLUX.2 [klein] 4B", "klein-9b": "FLUX.2 [klein] 9B",
           "klein-base-4b": "FLUX.2 [klein] base 4B", "klein-base-9b": "FLUX.2 [klein] base 9B"}


def architecture_of(variant: str) -> str:
    """'dev' | 'klein-4b' | 'klein-9b' | 'custom' of a --model_version spelling (base and distilled share one)."""
    return variant.replace("klein-base-", "klein-")


def model_info(info: Flux2Info) -> ModelInfo:
    """The seam's ModelInfo of a FLUX.2 transformer file (variant = musubi-tuner's --model_version spelling)."""
    p = info.params
    variant = info.model_version
    return ModelInfo(family="flux2", variant=variant, title=_TITLES.get(variant, f"FLUX.2 ({variant})"),
                     layout=info.layout, file_dtype=info.file_dtype, path=info.path, double_blocks=p.depth,
                     single_blocks=p.depth_single_blocks, params=p, files=info.files, num_params=info.num_params,
                     size_bytes=info.size_bytes)


class LatentView(nn.Module):
    """The FLUX.2 AE as training sees it: pixels ↔ normalised latents kept un-patched, [B, 32, H/8, W/8] (module
    docstring). `ae` is `autoencoder.Flux2AutoEncoder`."""

    def __init__(self, ae: nn.Module) -> None:
        super().__init__()
        self.ae = ae

    def encode(self, x: Tensor) -> Tensor:
        return lat.unpatchify(self.ae.encode(x))

    def decode(self, z: Tensor) -> Tensor:
        return self.ae.decode(lat.patchify(z.float()))


class Flux2Family(ModelFamily):
    name = "flux2"
    model_types = ("flux2",)
    encoders = (EncoderFile(COMPONENT, FLAG, ModelKind.LLM),)
    text_outputs = (TextOutput(PROMPT_EMBEDS, "sequence"),)
    ae_kind = ModelKind.AE
    latent_channels = 32

    # ---- files ---------------------------------------------------------------------------------------------------
    def claims(self, header: SafetensorsHeader) -> bool:
        return is_flux2_keys(header.tensors)

    def inspect(self, path: Path, *, flag: str) -> ModelInfo:
        return model_info(inspect_flux2(path, flag=flag))

    def text_length(self, info: ModelInfo, override: int | None) -> int:
        return override if override is not None else MAX_TEXT_LENGTH

    def check_run(self, cfg: Any, info: ModelInfo, headers: Mapping[str, SafetensorsHeader]) -> ModelInfo:
        """--model_version against the file, the text encoder against the transformer (kind and width), the AE
        (FLUX.2's, not FLUX.1's), the tokenizer folder, and the flags without meaning for FLUX.2."""
        from fluxlora.families.flux2.text_encoders import detect_text_encoder

        if cfg.model.model_version is not None:
            info = model_info(inspect_flux2(info.path, model_version=cfg.model.model_version, flag=MODEL_FLAG))
        header = headers.get(COMPONENT)
        if header is not None:
            kind = detect_text_encoder(header.tensors)
            if kind is None:  # an LLM-looking file that is neither (require_kind let it through)
                raise CheckpointError(f"{FLAG} {header.path}: not a Mistral 3 / Qwen3 text encoder; pass the FLUX.2 "
                                      "text encoder file", path=header.path, key=FLAG)
            hidden = next(s[1] for k, s in header.shapes.items() if k.endswith("embed_tokens.weight"))
            check_text_encoder_fits(info.params, kind, hidden, path=header.path, flag=FLAG, title=info.title)
            find_tokenizer(kind, cfg.model.tokenizer_cache_dir, header.path)
        ae = headers.get("ae")
        if ae is not None and "bn.running_mean" not in ae.tensors:
            raise CheckpointError(f"--ae {ae.path}: this is a FLUX.1 autoencoder (16 latent channels, no latent "
                                  "batch-norm statistics); FLUX.2 needs its own AE (FLUX.2 ae.safetensors or ComfyUI's "
                                  "flux2-vae.safetensors)", path=ae.path, key="--ae")
        if cfg.network.network_train_text_encoder_only:
            raise ConfigError("--network_train_text_encoder_only: the FLUX.2 text encoder carries no LoRA, so nothing "
                              "would train; remove the flag", key="--network_train_text_encoder_only")
        if cfg.flow.apply_t5_attn_mask:
            logger.warning("--apply_t5_attn_mask: FLUX.2 takes no text mask (its pipelines attend to the padding "
                           "too); ignored")
        return info

    def check_lora(self, info: ModelInfo, metadata: Mapping[str, str]) -> str | None:
        if metadata.get("ss_base_model_version", "").startswith("flux1"):
            return (f"this LoRA was trained on FLUX.1 (ss_base_model_version {metadata['ss_base_model_version']}) but "
                    f"the base model is {info.title}; FLUX.1 LoRAs do not fit FLUX.2's blocks")
        return super().check_lora(info, metadata)

    # ---- loading -------------------------------------------------------------------------------------------------
    def load_transformer(self, info: ModelInfo, *, dtype: torch.dtype | None, device: torch.device | str) -> nn.Module:
        from fluxlora.families.flux2.loading import load_flux2

        version = info.variant if info.variant in _TITLES else None
        model, _ = load_flux2(info.path, dtype=dtype, device=device, model_version=version)
        return model

    def load_autoencoder(self, path: Path, *, dtype: torch.dtype, device: torch.device | str) -> nn.Module:
        from fluxlora.families.flux2.autoencoder import load_flux2_ae

        return LatentView(load_flux2_ae(path, dtype=dtype, device=device))

    def load_text_encoders(self, files: Mapping[str, Path], *, dtype: torch.dtype | Mapping[str, torch.dtype],
                           keep_fp8: bool, device: torch.device | str, tokenizer_dir: Path | None, max_length: int,
                           mask_padding: bool, autocast: Autocast) -> TextEncoders:
        from fluxlora.families.flux2.encoders import load_encoders

        dtype = dtype[COMPONENT] if isinstance(dtype, Mapping) else dtype
        # an fp8 file keeps its Linear weights in fp8 either way (up-cast per call); other tensors take `dtype`
        return load_encoders(Path(files[COMPONENT]), dtype=dtype, device=device, tokenizer_dir=tokenizer_dir,
                             max_length=max_length, autocast=autocast)

    # ---- one step ------------------------------------------------------------------------------------------------
    def predict(self, model: nn.Module, x_t: Tensor, sigmas: Tensor, cond: Conditioning, *, guidance: float | None,
                mask_text: bool, compute_dtype: torch.dtype, autocast: Autocast) -> Tensor:
        batch, _, height, width = x_t.shape
        device = model.img_in.weight.device
        img = flow.pack_latents(x_t).to(device=device, dtype=compute_dtype)  # = the pipelines' patchify + pack
        img_ids = lat.image_ids(height // 2, width // 2, batch=batch, device=device)
        n = img.shape[1]
        if REFERENCE_LATENTS in cond:
            ref = cond[REFERENCE_LATENTS].to(device)
            tokens, ids = lat.reference_tokens([lat.patchify(ref.float())])
            img = torch.cat([img, tokens.to(compute_dtype)], dim=1)
            img_ids = torch.cat([img_ids, ids], dim=1)
        txt = cond[PROMPT_EMBEDS].to(device=device, dtype=compute_dtype)
        txt_ids = lat.text_ids(txt.shape[1], batch=batch, device=device)
        guidance_vec = None
        if guidance is not None:
            guidance_vec = torch.full((batch,), float(guidance), device=device, dtype=torch.float32)
        with autocast():
            pred = model(img, img_ids, txt, txt_ids, sigmas.to(device=device, dtype=torch.float32), guidance_vec)
        return flow.unpack_latents(pred[:, :n].float(), height, width)

    def training_guidance(self, info: ModelInfo, guidance_scale: float) -> float | None:
        return guidance_scale if info.params.guidance_embed else None

    def blocks(self, model: nn.Module) -> BlockLayout:
        # double blocks: (img, txt, img_mod, txt_mod, pe); single blocks: (x, mod, pe)
        return BlockLayout(double=list(model.double_blocks), single=list(model.single_blocks))

    # ---- sampling ------------------------------------------------------------------------------------------------
    def sample_sigmas(self, info: ModelInfo, steps: int, image_seq_len: int) -> Tensor:
        return schedule(steps, image_seq_len)

    def default_sample_steps(self, info: ModelInfo) -> int:
        return SAMPLER_DEFAULTS.get(info.variant, SAMPLER_DEFAULTS["dev"])[0]

    def initial_noise(self, seed: int, height: int, width: int) -> Tensor:
        """Drawn as the pipelines draw it, [1, 128, H/16, W/16], then un-patched to [1, 32, H/8, W/8]."""
        generator = torch.Generator(device="cpu").manual_seed(int(seed))
        noise = torch.randn(1, 4 * self.latent_channels, height // 16, width // 16, generator=generator,
                            dtype=torch.float32)
        return lat.unpatchify(noise)

    # ---- files written -------------------------------------------------------------------------------------------
    def architecture(self, info: ModelInfo) -> ArchitectureStrings:
        return ArchitectureStrings(f"flux-2-{architecture_of(info.variant)}", IMPLEMENTATION, BASE_MODEL_VERSION)

    # ---- memory --------------------------------------------------------------------------------------------------
    def shape(self, info: ModelInfo) -> ModelShape:
        return flux2_shape(info.params)

    def encode_bytes(self, component: str, tokens: int, dtype_bytes: int) -> int:
        return text_encode_bytes(tokens, dtype_bytes) if component == COMPONENT else 0

    def ae_encode_bytes(self, pixels: int, dtype_bytes: int) -> int:
        return ae_encode_bytes(pixels, dtype_bytes)  # the FLUX.1 encoder's blocks at the same width


FLUX2 = register(Flux2Family())
