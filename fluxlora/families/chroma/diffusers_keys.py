"""BFL ↔ diffusers (`ChromaTransformer2DModel`) key map for the Chroma transformer.

The blocks map as FLUX.1's (`fluxlora.models.diffusers_keys`) without their modulation linears; q/k/v and a single
block's `linear1` are split by rows (equal thirds of the width read from `img_in.weight`, the MLP the rest). The
approximator keeps its name; its MLPs' `in_layer`/`out_layer` are diffusers' `linear_1`/`linear_2` and RMSNorm
`scale` is `weight` (diffusers' own single-file converter, `convert_chroma_transformer_checkpoint_to_diffusers`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from fluxlora.errors import CheckpointError
from fluxlora.models.diffusers_keys import DOUBLE_BLOCK_MAP, SINGLE_BLOCK_MAP

_MODULATIONS = ("img_mod.lin", "txt_mod.lin", "modulation.lin")
BLOCK_MAPS: dict[str, tuple[str, dict[str, tuple[str, ...]]]] = {
    "double_blocks": ("transformer_blocks", {k: v for k, v in DOUBLE_BLOCK_MAP.items() if k not in _MODULATIONS}),
    "single_blocks": ("single_transformer_blocks", {k: v for k, v in SINGLE_BLOCK_MAP.items() if k not in _MODULATIONS}),
}
TOP_LEVEL_MAP: dict[str, str] = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "final_layer.linear": "proj_out",
    "distilled_guidance_layer.in_proj": "distilled_guidance_layer.in_proj",
    "distilled_guidance_layer.out_proj": "distilled_guidance_layer.out_proj",
}
APPROXIMATOR_LAYER_MAP = {"in_layer": "linear_1", "out_layer": "linear_2"}

_BLOCK = re.compile(r"^(double_blocks|single_blocks)\.(\d+)\.(.+)$")
_DIFF_BLOCK = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$")
_APPROX_LAYER = re.compile(r"^distilled_guidance_layer\.layers\.(\d+)\.(\w+)$")
_APPROX_NORM = re.compile(r"^distilled_guidance_layer\.norms\.(\d+)$")
_NORM_SUFFIXES = ("query_norm", "key_norm")


def diffusers_modules(bfl_module: str) -> tuple[str, ...] | None:
    """The diffusers modules whose rows a BFL module concatenates (in order), or None if it is no Chroma module."""
    if m := _BLOCK.match(bfl_module):
        kind, index, rel = m.groups()
        d_kind, table = BLOCK_MAPS[kind]
        targets = table.get(rel)
        return None if targets is None else tuple(f"{d_kind}.{index}.{t}" for t in targets)
    if m := _APPROX_LAYER.match(bfl_module):
        index, part = m.groups()
        return (f"distilled_guidance_layer.layers.{index}.{APPROXIMATOR_LAYER_MAP[part]}",) \
            if part in APPROXIMATOR_LAYER_MAP else None
    if _APPROX_NORM.match(bfl_module):
        return (bfl_module,)
    return (TOP_LEVEL_MAP[bfl_module],) if bfl_module in TOP_LEVEL_MAP else None


def _is_norm(bfl_module: str) -> bool:
    return bfl_module.endswith(_NORM_SUFFIXES) or bool(_APPROX_NORM.match(bfl_module))


def _row_sizes(n_parts: int, rows: int, hidden: int) -> list[int]:
    return [rows] if n_parts == 1 else [hidden] * 3 + ([rows - 3 * hidden] if n_parts == 4 else [])


def bfl_to_diffusers(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """BFL-layout Chroma weights → `ChromaTransformer2DModel` keys (works on meta tensors). Unknown keys raise."""
    if "img_in.weight" not in state_dict:
        raise CheckpointError("Chroma state dict has no 'img_in.weight'; cannot tell the width", key="img_in.weight")
    hidden = state_dict["img_in.weight"].shape[0]
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        module, _, param = key.rpartition(".")
        targets = diffusers_modules(module) if param in ("weight", "bias", "scale") else None
        if targets is None:
            raise CheckpointError(f"{key!r} is not a Chroma transformer key", key=key)
        d_param = "weight" if param == "scale" else param
        parts = torch.split(tensor, _row_sizes(len(targets), tensor.shape[0], hidden), dim=0)
        for target, part in zip(targets, parts, strict=True):
            out[f"{target}.{d_param}"] = part
    return out


def _reverse() -> dict[str, tuple[str, str, int, int]]:
    """diffusers relative block module -> (block kind, BFL relative module, part position, parts)."""
    index = {}
    for kind, (d_kind, table) in BLOCK_MAPS.items():
        for bfl, targets in table.items():
            for pos, target in enumerate(targets):
                index[f"{d_kind}/{target}"] = (kind, bfl, pos, len(targets))
    return index


_REVERSE_BLOCKS = _reverse()
_REVERSE_TOP = {d: b for b, d in TOP_LEVEL_MAP.items()}
_REVERSE_APPROX = {d: b for b, d in APPROXIMATOR_LAYER_MAP.items()}


def _bfl_module(d_module: str) -> tuple[str, int, int] | None:
    """diffusers module -> (BFL module, part position, number of parts), or None when unknown."""
    if m := _DIFF_BLOCK.match(d_module):
        d_kind, index, rel = m.groups()
        if (found := _REVERSE_BLOCKS.get(f"{d_kind}/{rel}")) is not None:
            kind, bfl, pos, n = found
            return f"{kind}.{index}.{bfl}", pos, n
        return None
    if m := _APPROX_LAYER.match(d_module):
        part = _REVERSE_APPROX.get(m.group(2))
        return (f"distilled_guidance_layer.layers.{m.group(1)}.{part}", 0, 1) if part else None
    if _APPROX_NORM.match(d_module):
        return d_module, 0, 1
    return (_REVERSE_TOP[d_module], 0, 1) if d_module in _REVERSE_TOP else None


def diffusers_to_bfl(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`ChromaTransformer2DModel` weights → BFL keys; the exact inverse of `bfl_to_diffusers` (meta tensors too).

    Split modules are concatenated in q, k, v(, mlp) order; a missing part or an unknown key raises naming it.
    """
    parts: dict[str, dict[int, torch.Tensor]] = {}
    counts: dict[str, int] = {}
    for d_key, tensor in state_dict.items():
        d_module, _, param = d_key.rpartition(".")
        found = _bfl_module(d_module) if param in ("weight", "bias") else None
        if found is None:
            raise CheckpointError(f"{d_key!r} is not a diffusers Chroma transformer key", key=d_key)
        module, pos, n = found
        key = f"{module}.{'scale' if _is_norm(module) else param}"
        parts.setdefault(key, {})[pos] = tensor
        counts[key] = n
    out: dict[str, torch.Tensor] = {}
    for key, got in parts.items():
        if len(got) != counts[key]:
            module = key.rpartition(".")[0]
            missing = [d for i, d in enumerate(diffusers_modules(module) or ()) if i not in got]
            raise CheckpointError(f"diffusers Chroma weights: {missing[0]!r} is missing, needed for {key!r}", key=key)
        out[key] = got[0] if counts[key] == 1 else torch.cat([got[i] for i in range(counts[key])], dim=0)
    return out
