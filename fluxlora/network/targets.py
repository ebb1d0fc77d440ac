"""Which Linear layers get a LoRA, under which kohya name, with which rank (spec §5.1 and §5.3).

Names are `prefix + "_" + dotted module path with "." → "_"`: `lora_unet_` for the DiT (BFL module names, equal to
the checkpoint keys), `lora_te1_` for CLIP-L and `lora_te3_` for T5. CLIP names always carry `text_model_`
(transformers 5 dropped that segment from module names; loaders expect it, interop.md §5).

Rank resolution for one DiT block module (documented semantics, spec §12.24 fixed):
1. `--network_dim`;
2. the first matching family dim (`img_attn_dim`, …, `single_mod_dim`) replaces it; 0 removes the module;
3. `train_blocks` and `train_double_block_indices` / `train_single_block_indices` remove unselected blocks;
4. the **last** matching `network_reg_dims` pattern sets the rank of a module still selected (0 removes it).
Input layers (`in_dims`) and text-encoder modules skip steps 2-3. Every module's alpha is `--network_alpha`.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

from torch import nn

from fluxlora.config.adapter_args import Preset
from fluxlora.config.network_args import IN_DIM_LAYERS, TYPE_DIM_KEYS, NetworkArgs, last_match

PREFIX_UNET = "lora_unet"
PREFIX_CLIP = "lora_te1"
PREFIX_T5 = "lora_te3"
COMPONENT_PREFIXES = {"unet": PREFIX_UNET, "clip_l": PREFIX_CLIP, "t5xxl": PREFIX_T5}

_INPUT_LAYERS: dict[str, tuple[str, ...]] = {
    "img_in": ("img_in",),
    "time_in": ("time_in.in_layer", "time_in.out_layer"),
    "vector_in": ("vector_in.in_layer", "vector_in.out_layer"),
    "guidance_in": ("guidance_in.in_layer", "guidance_in.out_layer"),
    "txt_in": ("txt_in",),
}
# Family of a module path inside a block, tried in sd-scripts' order (TYPE_DIM_KEYS).
_FAMILY_PATTERNS: dict[str, str] = {
    "img_attn_dim": "img_attn.", "txt_attn_dim": "txt_attn.", "img_mlp_dim": "img_mlp.", "txt_mlp_dim": "txt_mlp.",
    "img_mod_dim": "img_mod.", "txt_mod_dim": "txt_mod.", "single_dim": "linear", "single_mod_dim": "modulation.",
}
_CLIP_TARGET = re.compile(r"(?:^|\.)(encoder\.layers\.\d+\.(?:self_attn\.(?:q|k|v|out)_proj|mlp\.fc[12]))$")
_T5_TARGET = re.compile(r"(?:^|\.)(encoder\.block\.\d+\.layer\.\d+\.(?:SelfAttention\.(?:q|k|v|o)|"
                        r"DenseReluDense\.(?:wi|wi_0|wi_1|wo)))$")


def lora_name(prefix: str, dotted: str) -> str:
    return f"{prefix}_{dotted.replace('.', '_')}"


@dataclass(frozen=True)
class Target:
    """A Linear that can carry a LoRA."""

    name: str  # kohya name, e.g. lora_unet_double_blocks_0_img_attn_qkv
    path: str  # dotted path in its model, e.g. double_blocks.0.img_attn.qkv
    module: nn.Linear
    component: str  # unet | clip_l | t5xxl
    kind: str  # double | single | input | te
    block: int | None = None
    family: str | None = None  # type-dim key, or the in_dims layer for inputs

    @property
    def split_dims(self) -> list[int]:
        """Output bands for split_qkv: q,k,v of a double block's qkv; q,k,v,mlp of a single block's linear1."""
        out, width = self.module.out_features, self.module.in_features
        if self.kind == "double" and self.path.endswith("attn.qkv"):
            return [out // 3] * 3
        if self.kind == "single" and self.path.endswith("linear1"):
            return [width] * 3 + [out - 3 * width]
        return []


def _linears(root: nn.Module, base: str) -> Iterator[tuple[str, nn.Linear]]:
    for name, module in root.named_modules():
        if isinstance(module, nn.Linear):
            yield (f"{base}.{name}" if name else base), module


def dit_targets(flux: nn.Module) -> list[Target]:
    """Every Linear of the double and single blocks (304 on FLUX.1) plus the optional input layers."""
    targets: list[Target] = []
    for kind, blocks_attr in (("double", "double_blocks"), ("single", "single_blocks")):
        for index, block in enumerate(getattr(flux, blocks_attr)):
            for path, module in _linears(block, f"{blocks_attr}.{index}"):
                inner = path.split(".", 2)[2]
                keys = TYPE_DIM_KEYS[:6] if kind == "double" else TYPE_DIM_KEYS[6:]
                family = next((k for k in keys if inner.startswith(_FAMILY_PATTERNS[k])), None)
                targets.append(Target(lora_name(PREFIX_UNET, path), path, module, "unet", kind, index, family))
    for layer, paths in _INPUT_LAYERS.items():
        for path in paths:
            module = flux.get_submodule(path) if _has(flux, path) else None
            if isinstance(module, nn.Linear):
                targets.append(Target(lora_name(PREFIX_UNET, path), path, module, "unet", "input", None, layer))
    return targets


def _has(root: nn.Module, path: str) -> bool:
    try:
        root.get_submodule(path)
    except AttributeError:
        return False
    return True


def text_encoder_targets(model: nn.Module, component: str) -> list[Target]:
    """CLIP-L (`lora_te1_text_model_…`, 72 on CLIP-L) or T5 (`lora_te3_encoder_block_…`, 168 on T5-XXL) Linears."""
    pattern, prefix = (_CLIP_TARGET, PREFIX_CLIP) if component == "clip_l" else (_T5_TARGET, PREFIX_T5)
    targets = []
    for name, module in model.named_modules():
        m = pattern.search(name)
        if m and isinstance(module, nn.Linear):
            path = ("text_model." + m.group(1)) if component == "clip_l" else m.group(1)
            targets.append(Target(lora_name(prefix, path), path, module, component, "te"))
    return targets


def block_counts(flux: nn.Module) -> tuple[int, int]:
    return len(getattr(flux, "double_blocks", ())), len(getattr(flux, "single_blocks", ()))


def plan_rank(target: Target, network_dim: int, args: NetworkArgs) -> int:
    """Rank of one target under the rules in the module docstring (0 = no module)."""
    if target.kind == "input":
        if args.in_dims is None:
            return 0
        rank = args.in_dims[IN_DIM_LAYERS.index(target.family)]
        if rank == 0:
            return 0
    else:
        rank = network_dim
        if target.kind in ("double", "single"):
            if target.family is not None and target.family in args.type_dims:
                rank = args.type_dims[target.family]
                if rank == 0:
                    return 0
            if args.train_blocks not in ("all", target.kind):
                return 0
            selection = (args.train_double_block_indices if target.kind == "double"
                         else args.train_single_block_indices)
            if target.block not in selection:
                return 0
    found = last_match(args.network_reg_dims, target.name)
    if found is not None:
        rank = int(found[1].value)
    return rank


def check_block_indices(flux: nn.Module, args: NetworkArgs) -> None:
    """Block indices are checked against this model's real depth (pruned models have fewer than 19/38)."""
    double, single = block_counts(flux)
    args.train_double_block_indices.check(double, "train_double_block_indices")
    args.train_single_block_indices.check(single, "train_single_block_indices")


def all_targets(
    flux: nn.Module | None,
    text_encoders: Sequence[nn.Module | None],
    *,
    train_unet: bool,
    train_text_encoder: bool,
    train_t5xxl: bool,
) -> list[Target]:
    """Candidate targets of the enabled components, text encoders first (sd-scripts' module order)."""
    targets: list[Target] = []
    encoders = list(text_encoders) + [None, None]
    if train_text_encoder:
        if encoders[0] is not None:
            targets += text_encoder_targets(encoders[0], "clip_l")
        if train_t5xxl and encoders[1] is not None:
            targets += text_encoder_targets(encoders[1], "t5xxl")
    if train_unet and flux is not None:
        targets += dit_targets(flux)
    return targets


def _matches(pattern: str, name: str, use_fnmatch: bool) -> bool:
    if use_fnmatch:
        return fnmatch.fnmatch(name, pattern)
    return pattern == name or re.match(pattern, name) is not None


def select_by_preset(targets: Sequence[Target], roots: Mapping[str, nn.Module | None], preset: Preset) -> list[Target]:
    """LyCORIS' preset rules over the family's candidate targets (per component root model, e.g. `{"unet": flux,
    "clip_l": clip}`): a target is kept when one of its ancestors (or itself) has a class named in the preset's
    `*_target_module` list, or its module path matches a `*_target_name` pattern (regex from the start, or fnmatch),
    and its path matches no `exclude_name` pattern. Paths are the model's own and the kohya form (`text_model.…`
    for CLIP). T5 targets (LyCORIS has none) are kept as they are: `train_t5xxl` chose them."""
    kept = []
    index = {c: ({id(m): n for n, m in r.named_modules()}, dict(r.named_modules())) for c, r in roots.items() if r is not None}
    for target in targets:
        if target.component == "t5xxl" or target.component not in index:
            kept.append(target)
            continue
        ids, modules = index[target.component]
        path = ids.get(id(target.module), target.path)
        unet = target.component == "unet"
        classes = preset.unet_target_module if unet else preset.text_encoder_target_module
        names = preset.unet_target_name if unet else preset.text_encoder_target_name
        parts = path.split(".")
        chain = ["", *(".".join(parts[: i + 1]) for i in range(len(parts)))]
        by_class = any(type(modules[p]).__name__ in classes for p in chain if p in modules)
        by_name = any(_matches(pat, p, preset.use_fnmatch) for pat in names for p in {path, target.path})
        excluded = any(_matches(pat, p, preset.use_fnmatch) for pat in preset.exclude_name for p in {path, target.path})
        if (by_class or by_name) and not excluded:
            kept.append(target)
    return kept
