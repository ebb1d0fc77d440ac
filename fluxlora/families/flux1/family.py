"""FLUX.1 [dev] and [schnell] (and derivatives in the dev layout, such as FLUX.1 Krea [dev]): the first family.

Text conditioning: CLIP-L's pooled vector (`clip_pooled`, the DiT's `y`) and T5-XXL's hidden states (`t5_out`) with
their mask (`t5_mask`). Latents: the 16-channel BFL AE, packed 2×2 into 64-channel tokens with (0, row, col) ids.
dev is guidance-distilled (it takes the guidance value as an input) and sampled on the resolution-shifted schedule;
schnell takes no guidance and is sampled unshifted (spec §12.28).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from fluxlora import flow
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
from fluxlora.families.flux1.shape import ae_encode_bytes, flux_shape, t5_encode_bytes
from fluxlora.models.checkpoints import ModelKind, SafetensorsHeader, detect_kind, strip_prefix
from fluxlora.network.metadata import ArchitectureStrings

T5_LENGTH = {"dev": 512, "schnell": 256}
SAMPLE_STEPS = {"dev": 50, "schnell": 4}
IMPLEMENTATION = "https://github.com/black-forest-labs/flux"


class FluxTextEncoders(TextEncoders):
    """CLIP-L + T5-XXL with their tokenizers."""

    def __init__(self, clip: nn.Module, t5: nn.Module, tokenizers, *, max_length: int, mask_padding: bool,
                 autocast: Autocast) -> None:
        self.modules = {"clip_l": clip, "t5xxl": t5}
        self.tokenizers, self.max_length, self.mask_padding, self.autocast = tokenizers, max_length, mask_padding, autocast

    def encode(self, captions: list[str], *, grad: Collection[str] = ()) -> Conditioning:
        from fluxlora.models.text_encoders import encode_prompts

        clip, t5 = self.modules["clip_l"], self.modules["t5xxl"]
        if clip is None or t5 is None:
            raise RuntimeError("the text encoders were freed after caching their outputs; nothing may encode now")
        tokens = self.tokenizers.tokenize(list(captions), self.max_length)
        with self.autocast():
            out = encode_prompts(clip, t5, tokens, apply_t5_attn_mask=self.mask_padding,
                                 clip_grad="clip_l" in grad, t5_grad="t5xxl" in grad)
        return {"clip_pooled": out["clip_pooled"].float(), "t5_out": out["t5_out"].float(),
                "t5_mask": out["t5_mask"].bool()}

    def update(self, cond: Conditioning, captions: list[str], grad: Collection[str]) -> Conditioning:
        """sd-scripts' partial caching: cached T5 states, CLIP-L recomputed through its LoRA."""
        if "t5xxl" in grad:
            return self.encode(captions, grad=grad)
        if "clip_l" not in grad:
            return cond
        clip = self.modules["clip_l"]
        ids = self.tokenizers.tokenize(list(captions), self.max_length).clip_ids
        with self.autocast():
            pooled = clip(input_ids=ids.to(next(clip.parameters()).device)).pooler_output.float()
        return {**cond, "clip_pooled": pooled}


class Flux1(ModelFamily):
    name = "flux1"
    model_types = ("flux",)
    encoders = (EncoderFile("clip_l", "--clip_l", ModelKind.CLIP_L), EncoderFile("t5xxl", "--t5xxl", ModelKind.T5XXL))
    text_outputs = (TextOutput("clip_pooled", "vector"), TextOutput("t5_out", "sequence"), TextOutput("t5_mask", "mask"))
    ae_kind = ModelKind.AE
    latent_channels = 16

    # ---- files ---------------------------------------------------------------------------------------------------
    def claims(self, header: SafetensorsHeader) -> bool:
        kind = detect_kind(header.tensors)
        if kind == ModelKind.FLUX:
            keys = set(strip_prefix(header.tensors).values())
            return "vector_in.in_layer.weight" in keys and _in_features(header, "img_in.weight") in (None, 64)
        if kind == ModelKind.FLUX_DIFFUSERS:
            return ("time_text_embed.text_embedder.linear_1.weight" in header.tensors
                    and _in_features(header, "x_embedder.weight") in (None, 64))
        return False

    def inspect(self, path: Path, *, flag: str) -> ModelInfo:
        from fluxlora.models.flux_loading import inspect_flux

        info = inspect_flux(path, flag=flag)
        p = info.params
        return ModelInfo(family=self.name, variant=info.variant, title=f"FLUX.1-{info.variant}", layout=info.layout,
                         file_dtype=info.file_dtype, path=info.path, double_blocks=p.depth,
                         single_blocks=p.depth_single_blocks, params=p, files=info.files, num_params=info.num_params,
                         size_bytes=info.size_bytes)

    def text_length(self, info: ModelInfo, override: int | None) -> int:
        """T5 tokens: `--t5xxl_max_token_length` if given, else 512 for dev and 256 for schnell."""
        from fluxlora.models.tokenizers import check_max_length

        return T5_LENGTH[info.variant] if override is None else check_max_length(override)

    def check_lora(self, info: ModelInfo, metadata: Mapping[str, str]) -> str | None:
        architecture = metadata.get("modelspec.architecture", "")
        trained_on = next((v for v in ("schnell", "dev") if architecture.startswith(f"flux-1-{v}")), None)
        if trained_on is not None and trained_on != info.variant:
            return (f"this LoRA was trained on FLUX.1-{trained_on} (modelspec.architecture {architecture}) but the base "
                    f"model is {info.title}; use a base model of the same variant (dev and schnell LoRAs do not carry "
                    "over)")
        if trained_on is None:
            return super().check_lora(info, metadata)
        return None

    # ---- loading -------------------------------------------------------------------------------------------------
    def load_transformer(self, info: ModelInfo, *, dtype: torch.dtype | None, device: torch.device | str) -> nn.Module:
        from fluxlora.models.flux_loading import load_flux

        flux, _ = load_flux(info.path, dtype=dtype, device=device)
        return flux

    def load_autoencoder(self, path: Path, *, dtype: torch.dtype, device: torch.device | str) -> nn.Module:
        from fluxlora.models.autoencoder import load_ae

        return load_ae(path, dtype=dtype, device=device)

    def load_text_encoders(self, files: Mapping[str, Path], *, dtype: torch.dtype | Mapping[str, torch.dtype],
                           keep_fp8: bool, device: torch.device | str, tokenizer_dir: Path | None, max_length: int,
                           mask_padding: bool, autocast: Autocast) -> TextEncoders:
        from fluxlora.models.text_encoders import load_clip_l, load_t5xxl
        from fluxlora.models.tokenizers import load_tokenizers

        dtypes = dtype if isinstance(dtype, Mapping) else {"clip_l": dtype, "t5xxl": dtype}
        clip = load_clip_l(files["clip_l"], dtype=dtypes["clip_l"], device=device)
        t5 = load_t5xxl(files["t5xxl"], dtype=None if keep_fp8 else dtypes["t5xxl"], device=device)
        return FluxTextEncoders(clip, t5, load_tokenizers(tokenizer_dir), max_length=max_length,
                                mask_padding=mask_padding, autocast=autocast)

    # ---- one step ------------------------------------------------------------------------------------------------
    def predict(self, model: nn.Module, x_t: Tensor, sigmas: Tensor, cond: Conditioning, *, guidance: float | None,
                mask_text: bool, compute_dtype: torch.dtype, autocast: Autocast) -> Tensor:
        batch, _, height, width = x_t.shape
        device = next(model.parameters()).device
        img = flow.pack_latents(x_t).to(device=device, dtype=compute_dtype)
        img_ids = flow.image_ids(batch, height // 2, width // 2, device=device)
        txt = cond["t5_out"].to(device=device, dtype=compute_dtype)
        txt_ids = flow.text_ids(batch, txt.shape[1], device=device)
        guidance_vec = None
        if guidance is not None:
            guidance_vec = torch.full((batch,), float(guidance), device=device, dtype=torch.float32)
        mask = cond["t5_mask"].to(device) if mask_text else None
        with autocast():
            pred = model(img, img_ids, txt, txt_ids, sigmas.to(device),
                         cond["clip_pooled"].to(device=device, dtype=compute_dtype), guidance_vec, mask)
        return flow.unpack_latents(pred.float(), height, width)

    def trim_text(self, cond: Conditioning) -> Conditioning:
        mask = cond["t5_mask"]
        longest = max(int(mask.sum(dim=1).max().item()) if mask.numel() else 0, 1)
        if longest >= cond["t5_out"].shape[1]:
            return cond
        return {**cond, "t5_out": cond["t5_out"][:, :longest], "t5_mask": mask[:, :longest]}

    def training_guidance(self, info: ModelInfo, guidance_scale: float) -> float | None:
        return guidance_scale if info.params.guidance_embed else None

    def blocks(self, model: nn.Module) -> BlockLayout:
        return BlockLayout(double=list(model.double_blocks), single=list(model.single_blocks))

    # ---- sampling ------------------------------------------------------------------------------------------------
    def sample_sigmas(self, info: ModelInfo, steps: int, image_seq_len: int) -> Tensor:
        return flow.flux_schedule(steps, image_seq_len, shift=info.params.guidance_embed)

    def default_sample_steps(self, info: ModelInfo) -> int:
        return SAMPLE_STEPS[info.variant]

    # ---- files written -------------------------------------------------------------------------------------------
    def architecture(self, info: ModelInfo) -> ArchitectureStrings:
        return self.architecture_of_variant(info.variant)

    @staticmethod
    def architecture_of_variant(variant: str) -> ArchitectureStrings:
        """FLUX.1-dev / -schnell as files name them (`flux-1-dev`, ss_base_model_version `flux1`)."""
        if variant not in T5_LENGTH:
            raise ValueError(f"FLUX.1 variant must be one of {sorted(T5_LENGTH)}, got {variant!r}")
        return ArchitectureStrings(f"flux-1-{variant}", IMPLEMENTATION, "flux1")

    # ---- memory --------------------------------------------------------------------------------------------------
    def shape(self, info: ModelInfo) -> ModelShape:
        return flux_shape(info.params)

    def encode_bytes(self, component: str, tokens: int, dtype_bytes: int) -> int:
        return t5_encode_bytes(tokens, dtype_bytes) if component == "t5xxl" else 0

    def ae_encode_bytes(self, pixels: int, dtype_bytes: int) -> int:
        return ae_encode_bytes(pixels, dtype_bytes)


def _in_features(header: SafetensorsHeader, key: str) -> int | None:
    names = {v: k for k, v in strip_prefix(header.tensors).items()}
    entry = header.tensors.get(names.get(key, key))
    return entry.shape[1] if entry is not None and len(entry.shape) == 2 else None


FLUX1 = register(Flux1())
