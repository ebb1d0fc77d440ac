"""BFL ↔ diffusers (`FluxTransformer2DModel`) key maps for the FLUX transformer (spec §3.2, interop.md §5).

BFL fuses q/k/v (and, in single blocks, the MLP input) into one Linear; diffusers keeps them apart.
Split sizes come from the weights: q/k/v are equal thirds, and a single block's `linear1` is
(h, h, h, rows − 3h) with the width h read from `img_in.weight`, never a hard-coded 3072.
`final_layer.adaLN_modulation.1` is (shift, scale) in BFL and (scale, shift) in diffusers.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from fluxlora.errors import CheckpointError

# BFL module (relative to its block) -> diffusers modules whose rows it concatenates, in order.
DOUBLE_BLOCK_MAP: dict[str, tuple[str, ...]] = {
    "img_mod.lin": ("norm1.linear",),
    "txt_mod.lin": ("norm1_context.linear",),
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn.proj": ("attn.to_out.0",),
    "txt_attn.proj": ("attn.to_add_out",),
    "img_attn.norm.query_norm": ("attn.norm_q",),
    "img_attn.norm.key_norm": ("attn.norm_k",),
    "txt_attn.norm.query_norm": ("attn.norm_added_q",),
    "txt_attn.norm.key_norm": ("attn.norm_added_k",),
    "img_mlp.0": ("ff.net.0.proj",),
    "img_mlp.2": ("ff.net.2",),
    "txt_mlp.0": ("ff_context.net.0.proj",),
    "txt_mlp.2": ("ff_context.net.2",),
}
SINGLE_BLOCK_MAP: dict[str, tuple[str, ...]] = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
    "modulation.lin": ("norm.linear",),
    "norm.query_norm": ("attn.norm_q",),
    "norm.key_norm": ("attn.norm_k",),
}
TOP_LEVEL_MAP: dict[str, tuple[str, ...]] = {
    "img_in": ("x_embedder",),
    "txt_in": ("context_embedder",),
    "time_in.in_layer": ("time_text_embed.timestep_embedder.linear_1",),
    "time_in.out_layer": ("time_text_embed.timestep_embedder.linear_2",),
    "vector_in.in_layer": ("time_text_embed.text_embedder.linear_1",),
    "vector_in.out_layer": ("time_text_embed.text_embedder.linear_2",),
    "guidance_in.in_layer": ("time_text_embed.guidance_embedder.linear_1",),
    "guidance_in.out_layer": ("time_text_embed.guidance_embedder.linear_2",),
    "final_layer.linear": ("proj_out",),
    "final_layer.adaLN_modulation.1": ("norm_out.linear",),
}
# Fused BFL modules and the diffusers modules they split into (for the LoRA key maps).
DIFFUSERS_SPLITS: dict[str, tuple[str, ...]] = {
    "double_blocks.*.img_attn.qkv": DOUBLE_BLOCK_MAP["img_attn.qkv"],
    "double_blocks.*.txt_attn.qkv": DOUBLE_BLOCK_MAP["txt_attn.qkv"],
    "single_blocks.*.linear1": SINGLE_BLOCK_MAP["linear1"],
}
SWAPPED_HALVES = "final_layer.adaLN_modulation.1"

_BLOCK = re.compile(r"^(double_blocks|single_blocks)\.(\d+)\.(.+)$")
_DIFF_BLOCK = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$")
_BLOCK_NAMES = {"double_blocks": "transformer_blocks", "single_blocks": "single_transformer_blocks"}
_BLOCK_MAPS = {"double_blocks": DOUBLE_BLOCK_MAP, "single_blocks": SINGLE_BLOCK_MAP}


def _diffusers_modules(bfl_module: str) -> tuple[str, ...] | None:
    """Diffusers module names for one BFL module name, or None when it is not part of the transformer."""
    if m := _BLOCK.match(bfl_module):
        kind, index, rel = m.groups()
        targets = _BLOCK_MAPS[kind].get(rel)
        return None if targets is None else tuple(f"{_BLOCK_NAMES[kind]}.{index}.{t}" for t in targets)
    return TOP_LEVEL_MAP.get(bfl_module)


def diffusers_module_targets(bfl_module_name: str, hidden_size: int, mlp_hidden_dim: int | None = None,
                             ) -> list[tuple[str, slice]]:
    """Where the rows of a BFL Linear/norm go in diffusers: [(diffusers_module, BFL row slice)], in diffusers order.

    A diffusers module's weight is the concatenation of the BFL rows of its entries. qkv → three slices of
    `hidden_size`; single-block `linear1` → q, k, v, proj_mlp (`mlp_hidden_dim`, default 4·hidden);
    `final_layer.adaLN_modulation.1` → one module whose two halves are swapped. Unknown names raise KeyError.
    """
    targets = _diffusers_modules(bfl_module_name)
    if targets is None:
        raise KeyError(f"{bfl_module_name!r} is not a FLUX transformer module")
    h = hidden_size
    if bfl_module_name == SWAPPED_HALVES:
        return [(targets[0], slice(h, 2 * h)), (targets[0], slice(0, h))]
    if len(targets) == 1:
        return [(targets[0], slice(None))]
    sizes = [h, h, h] if len(targets) == 3 else [h, h, h, mlp_hidden_dim or 4 * h]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [(t, slice(s, s + n)) for t, s, n in zip(targets, starts, sizes, strict=True)]


def _split_param(key: str) -> tuple[str, str]:
    module, _, param = key.rpartition(".")
    return module, param


def bfl_to_diffusers(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """BFL-layout transformer weights → diffusers `FluxTransformer2DModel` keys (width from `img_in.weight`).

    Works on meta tensors too (for shape-only planning). Unknown keys raise CheckpointError naming the key.
    """
    if "img_in.weight" not in state_dict:
        raise CheckpointError("BFL FLUX state dict has no 'img_in.weight'; cannot tell the width", key="img_in.weight")
    hidden = state_dict["img_in.weight"].shape[0]
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        module, param = _split_param(key)
        if param not in ("weight", "bias", "scale") or _diffusers_modules(module) is None:
            raise CheckpointError(f"{key!r} is not a FLUX transformer key", key=key)
        d_param = "weight" if param == "scale" else param
        mlp_hidden = tensor.shape[0] - 3 * hidden if module.endswith("linear1") else None
        groups: dict[str, list[torch.Tensor]] = {}
        for d_module, rows in diffusers_module_targets(module, hidden, mlp_hidden):
            groups.setdefault(d_module, []).append(tensor[rows])
        for d_module, parts in groups.items():
            out[f"{d_module}.{d_param}"] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
    return out


def _reverse_index() -> tuple[dict[str, tuple[str, int, int]], dict[str, tuple[str, int, int]]]:
    """diffusers relative module -> (BFL relative module, position, number of parts), per block kind."""
    index = {}
    for kind, table in _BLOCK_MAPS.items():
        index[kind] = {d: (b, i, len(ds)) for b, ds in table.items() for i, d in enumerate(ds)}
    return index["double_blocks"], index["single_blocks"]


_REV_DOUBLE, _REV_SINGLE = _reverse_index()
_REV_TOP = {ds[0]: (b, 0, 1) for b, ds in TOP_LEVEL_MAP.items()}


def _bfl_name(d_key: str) -> tuple[str, int, int, str]:
    """diffusers key -> (BFL module, part position, number of parts, diffusers param); raises on unknown keys."""
    d_module, param = _split_param(d_key)
    if param not in ("weight", "bias"):
        raise CheckpointError(f"{d_key!r} is not a diffusers FLUX transformer key", key=d_key)
    if m := _DIFF_BLOCK.match(d_module):
        kind, index, rel = m.groups()
        table = _REV_DOUBLE if kind == "transformer_blocks" else _REV_SINGLE
        bfl_kind = "double_blocks" if kind == "transformer_blocks" else "single_blocks"
        if rel in table:
            b, pos, n = table[rel]
            return f"{bfl_kind}.{index}.{b}", pos, n, param
    elif d_module in _REV_TOP:
        b, pos, n = _REV_TOP[d_module]
        return b, pos, n, param
    raise CheckpointError(f"{d_key!r} is not a diffusers FLUX transformer key", key=d_key)


def diffusers_to_bfl(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers `FluxTransformer2DModel` weights → BFL keys; exact inverse of `bfl_to_diffusers`.

    Fused modules are concatenated in q, k, v(, mlp) order; a missing part or an unknown key raises
    CheckpointError naming it. Works on meta tensors too.
    """
    parts: dict[str, dict[int, torch.Tensor]] = {}
    counts: dict[str, int] = {}
    for d_key, tensor in state_dict.items():
        module, pos, n, param = _bfl_name(d_key)
        is_norm = module.endswith(("query_norm", "key_norm"))
        key = f"{module}.{'scale' if is_norm else param}"
        parts.setdefault(key, {})[pos] = tensor
        counts[key] = n
    out: dict[str, torch.Tensor] = {}
    for key, got in parts.items():
        n = counts[key]
        if len(got) != n:
            module = key.rpartition(".")[0]
            missing = [d for i, d in enumerate(_diffusers_modules(module) or ()) if i not in got]
            raise CheckpointError(f"diffusers FLUX weights: {missing[0]!r} ({key.rpartition('.')[2]}) is missing, "
                                  f"needed for {key!r}", key=key)
        tensors = [got[i] for i in range(n)]
        tensor = tensors[0] if n == 1 else torch.cat(tensors, dim=0)
        if key.startswith(SWAPPED_HALVES + "."):
            half = tensor.shape[0] // 2
            tensor = torch.cat([tensor[half:], tensor[:half]], dim=0)
        out[key] = tensor
    return out
