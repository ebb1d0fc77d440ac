"""A test-only second model family, to show the family seam is real: the trainer, caches, planner, sampler and saving
run it through the same code as FLUX.1, and nothing outside this file knows it exists.

What differs from FLUX.1: one text encoder (T5 only, `--t5xxl`; no `--clip_l`), a text conditioning without CLIP's
pooled vector (the transformer's `y` is the masked mean of the T5 states, computed in `predict`), no guidance input,
its own σ schedule (plain, 3 steps by default), and its own LoRA metadata (`toy/lora`, `ss_base_model_version toy`).
The transformer file has the FLUX layout (the tiny schnell file with `vec_in_dim` = T5 width) and is chosen with
`--model_type toy`.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from fluxlora import flow
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
from fluxlora.families.flux1.shape import flux_shape
from fluxlora.models.checkpoints import ModelKind, SafetensorsHeader
from fluxlora.network.metadata import ArchitectureStrings


class ToyText(TextEncoders):
    def __init__(self, t5: nn.Module, tokenizer, max_length: int, mask_padding: bool, autocast: Autocast) -> None:
        self.modules = {"t5xxl": t5}
        self.tokenizer, self.max_length, self.mask_padding, self.autocast = tokenizer, max_length, mask_padding, autocast

    def encode(self, captions: list[str], *, grad: Collection[str] = ()) -> Conditioning:
        t5 = self.modules["t5xxl"]
        if t5 is None:
            raise RuntimeError("the T5 encoder was freed")
        tokens = self.tokenizer(list(captions), max_length=self.max_length, padding="max_length", truncation=True,
                                return_tensors="pt")
        device = next(t5.parameters()).device
        mask = tokens["attention_mask"].to(device)
        with torch.set_grad_enabled("t5xxl" in grad), self.autocast():
            out = t5(input_ids=tokens["input_ids"].to(device),
                     attention_mask=mask if self.mask_padding else None).last_hidden_state
        return {"t5_out": out.float(), "t5_mask": mask.bool()}


class Toy(ModelFamily):
    name = "toy"
    model_types = ("toy",)
    encoders = (EncoderFile("t5xxl", "--t5xxl", ModelKind.T5XXL),)
    text_outputs = (TextOutput("t5_out", "sequence"), TextOutput("t5_mask", "mask"))

    def claims(self, header: SafetensorsHeader) -> bool:
        return False  # chosen by --model_type toy only

    def inspect(self, path: Path, *, flag: str) -> ModelInfo:
        from fluxlora.models.flux_loading import inspect_flux

        info = inspect_flux(path, flag=flag)
        p = info.params
        return ModelInfo(family=self.name, variant="base", title="Toy", layout=info.layout,
                         file_dtype=info.file_dtype, path=info.path, double_blocks=p.depth,
                         single_blocks=p.depth_single_blocks, params=p, files=info.files,
                         num_params=info.num_params, size_bytes=info.size_bytes)

    def text_length(self, info: ModelInfo, override: int | None) -> int:
        return override or 32

    def load_transformer(self, info: ModelInfo, *, dtype, device) -> nn.Module:
        from fluxlora.models.flux_loading import load_flux

        return load_flux(info.path, dtype=dtype, device=device)[0]

    def load_autoencoder(self, path: Path, *, dtype, device) -> nn.Module:
        from fluxlora.models.autoencoder import load_ae

        return load_ae(path, dtype=dtype, device=device)

    def load_text_encoders(self, files: Mapping[str, Path], *, dtype, keep_fp8: bool, device, tokenizer_dir,
                           max_length: int, mask_padding: bool, autocast: Autocast) -> TextEncoders:
        from fluxlora.models.text_encoders import load_t5xxl
        from fluxlora.models.tokenizers import load_tokenizers

        dtype = dtype["t5xxl"] if isinstance(dtype, Mapping) else dtype
        t5 = load_t5xxl(files["t5xxl"], dtype=None if keep_fp8 else dtype, device=device)
        return ToyText(t5, load_tokenizers(tokenizer_dir).t5, max_length, mask_padding, autocast)

    def predict(self, model: nn.Module, x_t: Tensor, sigmas: Tensor, cond: Conditioning, *, guidance, mask_text,
                compute_dtype, autocast) -> Tensor:
        batch, _, height, width = x_t.shape
        device = next(model.parameters()).device
        txt = cond["t5_out"].to(device=device, dtype=compute_dtype)
        mask = cond["t5_mask"].to(device)
        weights = mask.to(txt.dtype)[..., None]
        pooled = (txt * weights).sum(1) / weights.sum(1).clamp_min(1)  # the toy's `y`: mean of the real tokens
        with autocast():
            pred = model(flow.pack_latents(x_t).to(device=device, dtype=compute_dtype),
                         flow.image_ids(batch, height // 2, width // 2, device=device), txt,
                         flow.text_ids(batch, txt.shape[1], device=device), sigmas.to(device), pooled, None,
                         mask if mask_text else None)
        return flow.unpack_latents(pred.float(), height, width)

    def training_guidance(self, info: ModelInfo, guidance_scale: float) -> float | None:
        return None

    def blocks(self, model: nn.Module) -> BlockLayout:
        return BlockLayout(double=list(model.double_blocks), single=list(model.single_blocks))

    def sample_sigmas(self, info: ModelInfo, steps: int, image_seq_len: int) -> Tensor:
        return flow.flux_schedule(steps, image_seq_len, shift=False)

    def default_sample_steps(self, info: ModelInfo) -> int:
        return 3

    def architecture(self, info: ModelInfo) -> ArchitectureStrings:
        return ArchitectureStrings("toy", "tests/families/toy_family.py", "toy")

    def shape(self, info: ModelInfo) -> ModelShape:
        return flux_shape(info.params)


TOY = Toy()
