"""`fluxlora inspect` lines for FLUX.2 files (transformer, text encoder, AE), from headers only."""

from __future__ import annotations

from pathlib import Path

from fluxlora.families.flux2.loading import inspect_flux2, is_flux2_keys
from fluxlora.families.flux2.text_encoders import detect_text_encoder, inspect_text_encoder
from fluxlora.models.checkpoints import read_header

_TE_NAMES = {"mistral3": "Mistral Small 3 (FLUX.2 [dev] text encoder)", "qwen3": "Qwen3 (FLUX.2 [klein] text encoder)"}


def is_flux2_file(path: str | Path) -> bool:
    """A FLUX.2 transformer (file or diffusers folder), text encoder or AE, judged from the header."""
    path = Path(path)
    if path.is_dir():
        return any(is_flux2_keys(read_header(f).tensors) for f in sorted(path.glob("**/*.safetensors"))[:1])
    keys = read_header(path).tensors
    return is_flux2_keys(keys) or detect_text_encoder(keys) is not None or "bn.running_mean" in keys


def describe_flux2(path: str | Path) -> list[str]:
    """Kind-specific lines: architecture, base/distilled, layout and shape for a transformer; kind, width and layers
    for a text encoder; latent channels for the AE."""
    path = Path(path)
    keys = {} if path.is_dir() else read_header(path).tensors
    if path.is_dir() or is_flux2_keys(keys):
        info = inspect_flux2(path, flag=None)
        p = info.params
        return [f"{path}", f"  kind:       flux2 (a FLUX.2 transformer, {info.layout} layout)",
                f"  variant:    {info.model_version}{' (base: the header cannot tell; from the file name)' if info.base else ''}",
                f"  model:      width {p.hidden_size}, {p.num_heads} heads of {p.head_dim}, {p.depth} double + "
                f"{p.depth_single_blocks} single blocks, MLP {p.mlp_hidden_dim}, text width {p.context_in_dim}, "
                f"guidance {'yes' if p.guidance_embed else 'no'}",
                f"  dtype:      {info.file_dtype}", f"  parameters: {info.num_params:,}",
                f"  size:       {info.size_bytes / 1e9:.2f} GB"]
    if detect_text_encoder(keys) is not None:
        kind, hidden, layers = inspect_text_encoder(path, flag="inspect")
        return [f"{path}", f"  kind:       {_TE_NAMES[kind]}", f"  model:      width {hidden}, {layers} layers"]
    header = read_header(path)
    return [f"{path}", "  kind:       flux2-ae (the FLUX.2 autoencoder)",
            f"  latent:     {header.shapes['bn.running_mean'][0]} channels after 2×2 patching",
            f"  parameters: {header.num_params:,}"]
