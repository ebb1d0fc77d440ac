"""Chroma (lodestones; sd-scripts `--model_type chroma`): FLUX.1-schnell blocks modulated by one approximator, text
from T5-XXL only (no CLIP-L), no guidance input.

- Text: T5 always runs with its attention mask, and the transformer attends to the real tokens plus one padding
  token, as Chroma was trained (sd-scripts requires `--apply_t5_attn_mask` for it; here it is implied).
- Guidance: Chroma takes none (its approximator's guidance input is 0, sd-scripts' docs say `--guidance_scale 0.0`);
  `--guidance_scale` and a prompt's `--g` do not reach the model. Sampling uses true CFG (`--l 4 --n "…"`).
- Sampling: the resolution-shifted schedule of FLUX.1-dev (sd-scripts and diffusers' ChromaPipeline), 50 steps by
  default as sd-scripts' inference script.
- LoRA files: `modelspec.architecture = chroma/lora`, `ss_base_model_version = chroma` (sd-scripts).
- `--fp8_base` stores the blocks in fp8 and keeps the approximator (3 % of the weights) in the weight dtype.
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
from fluxlora.families.chroma.conditioning import ATTENDED_PADDING, chroma_text_mask
from fluxlora.models.checkpoints import ModelKind, SafetensorsHeader, detect_kind
from fluxlora.network.metadata import ArchitectureStrings

T5_LENGTH = 512  # sd-scripts: 512 for dev and chroma
SAMPLE_STEPS = 50
ARCHITECTURE = "chroma"  # a LoRA says chroma/lora (sd-scripts)
IMPLEMENTATION = "https://huggingface.co/lodestones/Chroma"


class ChromaTextEncoders(TextEncoders):
    """T5-XXL with its tokenizer, always masked."""

    def __init__(self, t5: nn.Module, tokenizer, *, max_length: int, autocast: Autocast) -> None:
        self.modules = {"t5xxl": t5}
        self.tokenizer, self.max_length, self.autocast = tokenizer, max_length, autocast

    def encode(self, captions: list[str], *, grad: Collection[str] = ()) -> Conditioning:
        t5 = self.modules["t5xxl"]
        if t5 is None:
            raise RuntimeError("the text encoder was freed after caching its outputs; nothing may encode now")
        tokens = self.tokenizer(list(captions), max_length=self.max_length, padding="max_length", truncation=True,
                                return_tensors="pt")
        device = next(t5.parameters()).device
        mask = tokens["attention_mask"].to(device)
        with self.autocast(), torch.set_grad_enabled("t5xxl" in grad):
            out = t5(input_ids=tokens["input_ids"].to(device), attention_mask=mask).last_hidden_state
        return {"t5_out": out.float(), "t5_mask": mask.bool()}


class Chroma(ModelFamily):
    name = "chroma"
    model_types = ("chroma",)
    encoders = (EncoderFile("t5xxl", "--t5xxl", ModelKind.T5XXL),)
    text_outputs = (TextOutput("t5_out", "sequence"), TextOutput("t5_mask", "mask"))
    ae_kind = ModelKind.AE
    latent_channels = 16
    # the approximator feeds every modulation vector, so its fp8 rounding reaches every block; it is 3 % of the
    # weights: --fp8_base keeps it in the weight dtype (as ComfyUI's fp8 Chroma files do)
    fp8_keep = ("distilled_guidance_layer",)

    # ---- files ---------------------------------------------------------------------------------------------------
    def claims(self, header: SafetensorsHeader) -> bool:
        return detect_kind(header.tensors) in (ModelKind.CHROMA, ModelKind.CHROMA_DIFFUSERS)

    def inspect(self, path: Path, *, flag: str) -> ModelInfo:
        from fluxlora.families.chroma.loading import inspect_chroma

        info = inspect_chroma(path, flag=flag)
        p = info.params
        return ModelInfo(family=self.name, variant="chroma", title="Chroma", layout=info.layout,
                         file_dtype=info.file_dtype, path=info.path, double_blocks=p.depth,
                         single_blocks=p.depth_single_blocks, params=p, files=info.files, num_params=info.num_params,
                         size_bytes=info.size_bytes)

    def text_length(self, info: ModelInfo, override: int | None) -> int:
        return override if override is not None else T5_LENGTH

    # ---- loading -------------------------------------------------------------------------------------------------
    def load_transformer(self, info: ModelInfo, *, dtype: torch.dtype | None, device: torch.device | str) -> nn.Module:
        from fluxlora.families.chroma.loading import load_chroma

        model, _ = load_chroma(info.path, dtype=dtype, device=device)
        return model

    def load_autoencoder(self, path: Path, *, dtype: torch.dtype, device: torch.device | str) -> nn.Module:
        from fluxlora.models.autoencoder import load_ae

        return load_ae(path, dtype=dtype, device=device)

    def load_text_encoders(self, files: Mapping[str, Path], *, dtype: torch.dtype | Mapping[str, torch.dtype],
                           keep_fp8: bool, device: torch.device | str, tokenizer_dir: Path | None, max_length: int,
                           mask_padding: bool, autocast: Autocast) -> TextEncoders:
        from fluxlora.models.text_encoders import load_t5xxl
        from fluxlora.models.tokenizers import load_tokenizers

        t5_dtype = dtype["t5xxl"] if isinstance(dtype, Mapping) else dtype
        t5 = load_t5xxl(files["t5xxl"], dtype=None if keep_fp8 else t5_dtype, device=device)
        return ChromaTextEncoders(t5, load_tokenizers(tokenizer_dir).t5, max_length=max_length, autocast=autocast)

    # ---- one step ------------------------------------------------------------------------------------------------
    def predict(self, model: nn.Module, x_t: Tensor, sigmas: Tensor, cond: Conditioning, *, guidance: float | None,
                mask_text: bool, compute_dtype: torch.dtype, autocast: Autocast) -> Tensor:
        batch, _, height, width = x_t.shape
        device = model.img_in.weight.device
        img = flow.pack_latents(x_t).to(device=device, dtype=compute_dtype)
        img_ids = flow.image_ids(batch, height // 2, width // 2, device=device)
        txt = cond["t5_out"].to(device=device, dtype=compute_dtype)
        txt_ids = flow.text_ids(batch, txt.shape[1], device=device)
        mask = chroma_text_mask(cond["t5_mask"].to(device))  # always: Chroma is trained masked
        guidance_vec = None if guidance is None else torch.full((batch,), float(guidance), device=device)
        with autocast():
            pred = model(img, img_ids, txt, txt_ids, sigmas.to(device), guidance_vec, mask)
        return flow.unpack_latents(pred.float(), height, width)

    def trim_text(self, cond: Conditioning) -> Conditioning:
        """Drop padding no sample attends to: beyond the longest prompt plus its one attended padding token."""
        mask = cond["t5_mask"]
        longest = int(mask.sum(dim=1).max().item()) + ATTENDED_PADDING if mask.numel() else 1
        if longest >= cond["t5_out"].shape[1]:
            return cond
        return {**cond, "t5_out": cond["t5_out"][:, :longest], "t5_mask": mask[:, :longest]}

    def training_guidance(self, info: ModelInfo, guidance_scale: float) -> float | None:
        return None  # the approximator's guidance input stays 0, whatever --guidance_scale says

    def blocks(self, model: nn.Module) -> BlockLayout:
        return BlockLayout(double=list(model.double_blocks), single=list(model.single_blocks))

    # ---- sampling ------------------------------------------------------------------------------------------------
    def sample_sigmas(self, info: ModelInfo, steps: int, image_seq_len: int) -> Tensor:
        return flow.flux_schedule(steps, image_seq_len, shift=True)

    def default_sample_steps(self, info: ModelInfo) -> int:
        return SAMPLE_STEPS

    def sampling_guidance(self, info: ModelInfo, guidance: float) -> float | None:
        return None

    # ---- files written -------------------------------------------------------------------------------------------
    def architecture(self, info: ModelInfo) -> ArchitectureStrings:
        return ArchitectureStrings(ARCHITECTURE, IMPLEMENTATION, "chroma")

    def check_lora(self, info: ModelInfo, metadata: Mapping[str, str]) -> str | None:
        architecture = metadata.get("modelspec.architecture", "")
        base = metadata.get("ss_base_model_version", "")
        if (architecture and not architecture.startswith("chroma")) or (base and base != "chroma"):
            return (f"this LoRA was trained on {architecture.split('/')[0] or base} (modelspec.architecture "
                    f"{architecture or '-'}, ss_base_model_version {base or '-'}) but the base model is Chroma; use "
                    "a LoRA trained on Chroma (FLUX.1 LoRAs target modulation layers Chroma does not have)")
        return None

    # ---- memory --------------------------------------------------------------------------------------------------
    def shape(self, info: ModelInfo) -> ModelShape:
        from fluxlora.families.chroma.shape import chroma_shape

        return chroma_shape(info.params)

    def encode_bytes(self, component: str, tokens: int, dtype_bytes: int) -> int:
        from fluxlora.families.flux1.shape import t5_encode_bytes

        return t5_encode_bytes(tokens, dtype_bytes)

    def ae_encode_bytes(self, pixels: int, dtype_bytes: int) -> int:
        from fluxlora.families.flux1.shape import ae_encode_bytes

        return ae_encode_bytes(pixels, dtype_bytes)


CHROMA = register(Chroma())
