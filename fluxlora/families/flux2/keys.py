"""BFL ↔ diffusers (`Flux2Transformer2DModel`) key maps for the FLUX.2 transformer.

As diffusers' `convert_flux2_transformer_checkpoint_to_diffusers`: only the double blocks' fused q/k/v are split
(equal thirds); the single block's fused `linear1` stays one module (`attn.to_qkv_mlp_proj`) in both layouts;
`final_layer.adaLN_modulation.1` is (shift, scale) in BFL and (scale, shift) in diffusers; QK-norm `scale` is
`weight`. Every name is explicit, so an unknown key is an error naming it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from fluxlora.errors import CheckpointError

# BFL module (relative to its block) -> diffusers modules whose rows it concatenates, in order.
DOUBLE_BLOCK_MAP: dict[str, tuple[str, ...]] = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn.proj": ("attn.to_out.0",),
    "txt_attn.proj": ("attn.to_add_out",),
    "img_attn.norm.query_norm": ("attn.norm_q",),
    "img_attn.norm.key_norm": ("attn.norm_k",),
    "txt_attn.norm.query_norm": ("attn.norm_added_q",),
    "txt_attn.norm.key_norm": ("attn.norm_added_k",),
    "img_mlp.0": ("ff.linear_in",),
    "img_mlp.2": ("ff.linear_out",),
    "txt_mlp.0": ("ff_context.linear_in",),
    "txt_mlp.2": ("ff_context.linear_out",),
}
SINGLE_BLOCK_MAP: dict[str, tuple[str, ...]] = {
    "linear1": ("attn.to_qkv_mlp_proj",),
    "linear2": ("attn.to_out",),
    "norm.query_norm": ("attn.norm_q",),
    "norm.key_norm": ("attn.norm_k",),
}
TOP_LEVEL_MAP: dict[str, tuple[str, ...]] = {
    "img_in": ("x_embedder",),
    "txt_in": ("context_embedder",),
    "time_in.in_layer": ("time_guidance_embed.timestep_embedder.linear_1",),
    "time_in.out_layer": ("time_guidance_embed.timestep_embedder.linear_2",),
    "guidance_in.in_layer": ("time_guidance_embed.guidance_embedder.linear_1",),
    "guidance_in.out_layer": ("time_guidance_embed.guidance_embedder.linear_2",),
    "double_stream_modulation_img.lin": ("double_stream_modulation_img.linear",),
    "double_stream_modulation_txt.lin": ("double_stream_modulation_txt.linear",),
    "single_stream_modulation.lin": ("single_stream_modulation.linear",),
    "final_layer.linear": ("proj_out",),
    "final_layer.adaLN_modulation.1": ("norm_out.linear",),
}
SWAPPED_HALVES = "final_layer.adaLN_modulation.1"

_BLOCK = re.compile(r"^(double_blocks|single_blocks)\.(\d+)\.(.+)$")
_DIFF_BLOCK = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$")
_TO_DIFF = {"double_blocks": "transformer_blocks", "single_blocks": "single_transformer_blocks"}
_TO_BFL = {v: k for k, v in _TO_DIFF.items()}
_MAPS = {"double_blocks": DOUBLE_BLOCK_MAP, "single_blocks": SINGLE_BLOCK_MAP}
_REVERSE = {kind: {d: (b, i, len(ds)) for b, ds in table.items() for i, d in enumerate(ds)}
            for kind, table in _MAPS.items()}
_REVERSE_TOP = {ds[0]: (b, 0, 1) for b, ds in TOP_LEVEL_MAP.items()}


def diffusers_modules(bfl_module: str) -> tuple[str, ...] | None:
    """The diffusers module names one BFL module's rows go to (in row order), or None if it is not a FLUX.2 module."""
    if m := _BLOCK.match(bfl_module):
        kind, index, rel = m.groups()
        targets = _MAPS[kind].get(rel)
        return None if targets is None else tuple(f"{_TO_DIFF[kind]}.{index}.{t}" for t in targets)
    return TOP_LEVEL_MAP.get(bfl_module)


def bfl_to_diffusers(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """BFL-layout FLUX.2 weights → diffusers keys (also on meta tensors). Unknown keys raise CheckpointError."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        module, _, param = key.rpartition(".")
        targets = diffusers_modules(module)
        if param not in ("weight", "scale") or targets is None:
            raise CheckpointError(f"{key!r} is not a FLUX.2 transformer key", key=key)
        if module == SWAPPED_HALVES:
            half = tensor.shape[0] // 2
            tensor = torch.cat([tensor[half:], tensor[:half]], dim=0)
        for target, part in zip(targets, tensor.chunk(len(targets), dim=0), strict=True):
            out[f"{target}.weight"] = part
    return out


def _bfl_name(d_key: str) -> tuple[str, int, int]:
    d_module, _, param = d_key.rpartition(".")
    if param == "weight":
        if m := _DIFF_BLOCK.match(d_module):
            kind, index, rel = m.groups()
            bfl_kind = _TO_BFL[kind]
            if rel in _REVERSE[bfl_kind]:
                module, pos, n = _REVERSE[bfl_kind][rel]
                return f"{bfl_kind}.{index}.{module}", pos, n
        elif d_module in _REVERSE_TOP:
            return _REVERSE_TOP[d_module]
    raise CheckpointError(f"{d_key!r} is not a diffusers FLUX.2 transformer key", key=d_key)


def diffusers_to_bfl(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers `Flux2Transformer2DModel` weights → BFL keys; the exact inverse of `bfl_to_diffusers`."""
    parts: dict[str, dict[int, torch.Tensor]] = {}
    counts: dict[str, int] = {}
    for d_key, tensor in state_dict.items():
        module, pos, n = _bfl_name(d_key)
        param = "scale" if module.endswith(("query_norm", "key_norm")) else "weight"
        parts.setdefault(f"{module}.{param}", {})[pos] = tensor
        counts[f"{module}.{param}"] = n
    out: dict[str, torch.Tensor] = {}
    for key, got in parts.items():
        if len(got) != counts[key]:
            missing = [d for i, d in enumerate(diffusers_modules(key.rpartition(".")[0]) or ()) if i not in got]
            raise CheckpointError(f"diffusers FLUX.2 weights: {missing[0]}.weight is missing, needed for {key!r}",
                                  key=key)
        tensor = torch.cat([got[i] for i in range(counts[key])], dim=0)
        if key.startswith(SWAPPED_HALVES + "."):
            half = tensor.shape[0] // 2
            tensor = torch.cat([tensor[half:], tensor[:half]], dim=0)
        out[key] = tensor
    return out
