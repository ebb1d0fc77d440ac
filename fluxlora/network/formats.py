"""LoRA file formats: sd-scripts (kohya) <-> diffusers / PEFT / ai-toolkit, as pure functions on state dicts.

kohya (what we train and save, spec §5.1): one module per BFL Linear, `lora_unet_<BFL path with _>`,
`lora_te1_<CLIP path>`, `lora_te3_<T5 path>`, each with `.lora_down.weight` [r, in], `.lora_up.weight` [out, r]
and `.alpha` (0-d; the delta is `alpha/r · up @ down`; a missing alpha means alpha = r).

diffusers / ai-toolkit (spec §10.2): diffusers module names (`transformer.transformer_blocks.3.attn.to_q`),
`.lora_A.weight` = down and `.lora_B.weight` = up, no alpha (scale 1). ai-toolkit writes exactly this naming, so
the two share the code. Text encoders: `text_encoder.text_model.encoder.layers.N.self_attn.q_proj` (CLIP-L) and
`text_encoder_2.encoder.block.N.layer.0.SelfAttention.q` (T5). PEFT is the same without the `transformer.`
prefix (what `get_peft_model_state_dict(transformer)` gives); a `base_model.model.` prefix is accepted on input.

Fused BFL modules (double-block qkv, single-block linear1 = q, k, v, mlp) map to several diffusers modules:
- kohya -> diffusers: if the rank divides into the parts and `up` is exactly block-diagonal (sd-scripts'
  `split_qkv` layout) the down is chunked and each part takes its diagonal block; otherwise every part gets the
  full down and its row band of up. This is diffusers' own rule.
- diffusers -> kohya: if the parts' downs are identical, the compact form (that down, ups stacked by rows,
  alpha = rank); otherwise downs concatenated by rows and a block-diagonal up, alpha = total rank (spec §10.2).
  A part that is absent gets zero rows.

The kohya scale `s = alpha/rank` is folded into the weights when leaving kohya: `up·b`, `down·(s/b)` with `b` the
power of two nearest to √|s|. Multiplying by a power of two is exact in floating point, both factors stay of
similar size (unlike sd-scripts' loop, which only rebalances when s < 0.5, §12.34), and s = 1 changes no bit.

Nothing is dropped silently: a key that maps to nothing raises `CheckpointError` listing it, unless the caller
passes `drop_unmapped=True` (then it is logged and dropped).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from fluxlora.errors import CheckpointError
from fluxlora.models.diffusers_keys import DOUBLE_BLOCK_MAP, SINGLE_BLOCK_MAP, SWAPPED_HALVES, TOP_LEVEL_MAP
from fluxlora.network.deltas import LYCORIS_SUFFIXES

logger = logging.getLogger(__name__)

FORMATS = ("kohya", "diffusers", "peft", "ai-toolkit")
KOHYA_PREFIXES = {"lora_unet": "transformer", "lora_te1": "text_encoder", "lora_te3": "text_encoder_2"}
_KOHYA_SUFFIXES = {".lora_down.weight": "down", ".lora_up.weight": "up", ".alpha": "alpha"}
_PEFT_SUFFIXES = {".lora_A.weight": "down", ".lora_B.weight": "up", ".alpha": "alpha"}


def _linear_only(table: Mapping[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
    # Norm scales are not Linear layers; no LoRA ever targets them.
    return {k: v for k, v in table.items() if not k.endswith("_norm")}


_DOUBLE = _linear_only(DOUBLE_BLOCK_MAP)
_SINGLE = _linear_only(SINGLE_BLOCK_MAP)
_TOP = dict(TOP_LEVEL_MAP)


def _alternation(names: Iterable[str]) -> str:
    return "|".join(re.escape(n.replace(".", "_")) for n in sorted(names, key=len, reverse=True))


# kohya module name (after `lora_unet_`) -> BFL module path. Built from the BFL<->diffusers tables, so any block
# index works (all 19 double and 38 single blocks, and pruned or extended models alike).
_UNET_NAME = re.compile(
    rf"^(?:double_blocks_(?P<d>\d+)_(?P<drel>{_alternation(_DOUBLE)})"
    rf"|single_blocks_(?P<s>\d+)_(?P<srel>{_alternation(_SINGLE)})"
    rf"|(?P<top>{_alternation(_TOP)}))$"
)
_UNDERSCORED = {n.replace(".", "_"): n for n in (*_DOUBLE, *_SINGLE, *_TOP)}
_CLIP_NAME = re.compile(r"^text_model_encoder_layers_(\d+)_(self_attn_(?:q|k|v|out)_proj|mlp_fc[12])$")
_T5_NAME = re.compile(r"^encoder_block_(\d+)_(layer_0_SelfAttention_(?:q|k|v|o)|layer_1_DenseReluDense_(?:wi_0|wi_1|wi|wo))$")


def kohya_module_path(name: str) -> tuple[str, str] | None:
    """kohya module name -> (kohya prefix, dotted module path in its model), or None if it names no known Linear."""
    for kp in KOHYA_PREFIXES:
        if name.startswith(kp + "_"):
            rest = name[len(kp) + 1:]
            if kp == "lora_unet" and (m := _UNET_NAME.match(rest)):
                if m["d"] is not None:
                    return kp, f"double_blocks.{m['d']}.{_UNDERSCORED[m['drel']]}"
                if m["s"] is not None:
                    return kp, f"single_blocks.{m['s']}.{_UNDERSCORED[m['srel']]}"
                return kp, _UNDERSCORED[m["top"]]
            if kp == "lora_te1" and (m := _CLIP_NAME.match(rest)):
                part = m[2].replace("self_attn_", "self_attn.").replace("mlp_", "mlp.")
                return kp, f"text_model.encoder.layers.{m[1]}.{part}"
            if kp == "lora_te3" and (m := _T5_NAME.match(rest)):
                part = m[2].replace("_SelfAttention_", ".SelfAttention.").replace("_DenseReluDense_", ".DenseReluDense.")
                return kp, f"encoder.block.{m[1]}.{part.replace('layer_', 'layer.', 1)}"
    return None


def kohya_name(prefix: str, module_path: str) -> str:
    """The kohya name of a module: prefix + '_' + dotted path with dots turned into underscores (spec §5.1)."""
    return f"{prefix}_{module_path.replace('.', '_')}"


@dataclass
class LoraModule:
    """One LoRA pair; `alpha` None means alpha = rank (scale 1)."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None = None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        # sd-scripts treats alpha 0 (and missing) as alpha = rank.
        return 1.0 if not self.alpha else self.alpha / self.rank

    def delta(self) -> torch.Tensor:
        """The weight delta `scale · up @ down` in float32."""
        return self.up.float() @ self.down.float() * self.scale


def detect_lora_format(keys: Iterable[str], metadata: Mapping[str, str] | None = None) -> str:
    """'kohya' (`lora_unet_`/`lora_te*_`), 'diffusers' (`transformer.`-prefixed `lora_A`/`lora_B`), 'peft'
    (unprefixed diffusers module names) or 'ai-toolkit' (diffusers naming whose metadata names ai-toolkit).

    Raises CheckpointError when the keys are not a LoRA in any of these forms.
    """
    keys = list(keys)
    if any(k.endswith((".lora_down.weight", ".lora_up.weight")) or k.rpartition(".")[2] in LYCORIS_SUFFIXES
           for k in keys):
        return "kohya"  # LyCORIS modules (LoKr, LoHa, full, DoRA) use the kohya names too
    lora_ab = [k for k in keys if k.endswith((".lora_A.weight", ".lora_B.weight"))]
    if lora_ab:
        if any(not k.startswith(("transformer.", "text_encoder.", "text_encoder_2.")) for k in lora_ab):
            return "peft"
        if metadata and any("ai-toolkit" in str(v).lower() for v in metadata.values()):
            return "ai-toolkit"
        return "diffusers"
    first = keys[0] if keys else "(no keys)"
    raise CheckpointError(
        f"not a LoRA file: no '.lora_down.weight'/'.lora_up.weight' (sd-scripts) or '.lora_A.weight'/'.lora_B.weight' "
        f"(diffusers/PEFT) keys, first key {first!r}; pass a LoRA file",
        key=first,
    )


def _group(sd: Mapping[str, torch.Tensor], suffixes: Mapping[str, str]) -> tuple[dict[str, dict[str, torch.Tensor]], list[str]]:
    modules: dict[str, dict[str, torch.Tensor]] = {}
    unmapped: list[str] = []
    for key, tensor in sd.items():
        for suffix, role in suffixes.items():
            if key.endswith(suffix):
                modules.setdefault(key[: -len(suffix)], {})[role] = tensor
                break
        else:
            unmapped.append(key)
    return modules, unmapped


def _to_module(name: str, parts: Mapping[str, torch.Tensor]) -> LoraModule:
    if "down" not in parts or "up" not in parts:
        missing = "down" if "down" not in parts else "up"
        raise CheckpointError(f"LoRA module {name!r} has no {missing} weight; the file is incomplete — re-export it",
                              key=name)
    down, up = parts["down"], parts["up"]
    if down.dim() != 2 or up.dim() != 2 or up.shape[1] != down.shape[0]:
        raise CheckpointError(f"LoRA module {name!r}: up {list(up.shape)} and down {list(down.shape)} do not form a "
                              "rank-r pair (conv or LyCORIS modules are not supported)", key=name)
    alpha = parts.get("alpha")
    return LoraModule(down, up, None if alpha is None else float(alpha.float().item()))


def _report_unmapped(unmapped: list[str], drop_unmapped: bool, what: str) -> None:
    if not unmapped:
        return
    listing = ", ".join(repr(k) for k in sorted(unmapped)[:5]) + (" ..." if len(unmapped) > 5 else "")
    if not drop_unmapped:
        raise CheckpointError(
            f"{len(unmapped)} {what} key(s) map to no FLUX / CLIP-L / T5 module: {listing}; "
            "pass --drop_unmapped to convert without them", key=sorted(unmapped)[0])
    logger.warning("dropping %d %s key(s) that map to no module: %s", len(unmapped), what, listing)


def read_kohya(sd: Mapping[str, torch.Tensor], *, drop_unmapped: bool = False) -> dict[str, LoraModule]:
    """kohya state dict -> {module name: LoraModule}; names must be known FLUX/CLIP-L/T5 Linear modules."""
    groups, unmapped = _group(sd, _KOHYA_SUFFIXES)
    modules: dict[str, LoraModule] = {}
    for name, parts in groups.items():
        if kohya_module_path(name) is None:
            unmapped += [f"{name}{s}" for s, role in _KOHYA_SUFFIXES.items() if role in parts]
            continue
        modules[name] = _to_module(name, parts)
    _report_unmapped(unmapped, drop_unmapped, "sd-scripts LoRA")
    return modules


def write_kohya(modules: Mapping[str, LoraModule], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """{name: LoraModule} -> kohya state dict; every module gets an `.alpha` (rank when None, never 0)."""
    out: dict[str, torch.Tensor] = {}
    for name, m in modules.items():
        dt = dtype or m.down.dtype
        out[f"{name}.lora_down.weight"] = m.down.to(dt).contiguous()
        out[f"{name}.lora_up.weight"] = m.up.to(dt).contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(m.alpha or m.rank), dtype=dt)
    return out


def split_scale(scale: float) -> tuple[float, float]:
    """(down factor, up factor) with product `scale`; the up factor is the power of two nearest √|scale|."""
    if scale == 0 or not math.isfinite(scale):
        return scale, 1.0
    up = 2.0 ** round(math.log2(abs(scale)) / 2)
    return scale / up, up


def _swap_halves(up: torch.Tensor) -> torch.Tensor:
    half = up.shape[0] // 2
    return torch.cat([up[half:], up[:half]], dim=0)


def _fused_sizes(bfl_path: str, module: LoraModule, n_parts: int, hidden_size: int | None) -> list[int]:
    out_features = module.up.shape[0]
    if n_parts == 3:
        if out_features % 3:
            raise CheckpointError(f"{bfl_path}: qkv LoRA up has {out_features} rows, not divisible by 3", key=bfl_path)
        return [out_features // 3] * 3
    # single-block linear1: its input width is the hidden size; the rest of its rows are the MLP input.
    h = int(module.down.shape[1])
    if hidden_size is not None and hidden_size != h:
        raise CheckpointError(f"{bfl_path}: LoRA down has {h} inputs but --hidden_size is {hidden_size}", key=bfl_path)
    if out_features <= 3 * h:
        raise CheckpointError(f"{bfl_path}: linear1 LoRA up has {out_features} rows, expected more than 3×{h}",
                              key=bfl_path)
    return [h, h, h, out_features - 3 * h]


def _split_fused(module: LoraModule, sizes: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Fused (already scale-folded) pair -> one (down, up) pair per part, diffusers' sparse rule."""
    down, up, n = module.down, module.up, len(sizes)
    starts = [sum(sizes[:i]) for i in range(n)]
    if module.rank % n == 0:
        r = module.rank // n
        sparse = all(
            not up[s:s + size, k * r:(k + 1) * r].any()
            for j, (s, size) in enumerate(zip(starts, sizes, strict=True)) for k in range(n) if k != j
        )
        if sparse:
            return [(down[j * r:(j + 1) * r], up[s:s + size, j * r:(j + 1) * r])
                    for j, (s, size) in enumerate(zip(starts, sizes, strict=True))]
    # Separate copies: safetensors refuses to save tensors that share memory.
    return [(down.clone(), up[s:s + size]) for s, size in zip(starts, sizes, strict=True)]


def _diffusers_targets(bfl_path: str) -> tuple[str, ...] | None:
    if m := re.match(r"^(double|single)_blocks\.(\d+)\.(.+)$", bfl_path):
        kind, index, rel = m.groups()
        table, block = (_DOUBLE, "transformer_blocks") if kind == "double" else (_SINGLE, "single_transformer_blocks")
        return tuple(f"{block}.{index}.{t}" for t in table[rel]) if rel in table else None
    return _TOP.get(bfl_path)


def kohya_to_diffusers(
    sd: Mapping[str, torch.Tensor],
    hidden_size: int | None = None,
    *,
    dst: str = "diffusers",
    drop_unmapped: bool = False,
) -> dict[str, torch.Tensor]:
    """kohya LoRA -> diffusers / ai-toolkit (`transformer.` prefix) or PEFT (no prefix) keys, scale folded in.

    `hidden_size` is only a check: the width is read from each linear1 down (its input features).
    """
    if dst not in ("diffusers", "ai-toolkit", "peft"):
        raise ValueError(f"unknown destination format {dst!r}")
    t_prefix = "" if dst == "peft" else "transformer."
    out: dict[str, torch.Tensor] = {}
    for name, module in read_kohya(sd, drop_unmapped=drop_unmapped).items():
        kp, path = kohya_module_path(name)  # type: ignore[misc]  # read_kohya kept only mappable names
        f_down, f_up = split_scale(module.scale)
        dtype = module.down.dtype
        folded = LoraModule((module.down.float() * f_down).to(dtype), (module.up.float() * f_up).to(dtype))
        if kp != "lora_unet":
            te = "text_encoder." if kp == "lora_te1" else "text_encoder_2."
            pairs = [(te + path, folded.down, folded.up)]
        else:
            targets = _diffusers_targets(path)
            assert targets is not None
            if len(targets) == 1:
                up = _swap_halves(folded.up) if path == SWAPPED_HALVES else folded.up
                pairs = [(t_prefix + targets[0], folded.down, up)]
            else:
                sizes = _fused_sizes(path, module, len(targets), hidden_size)
                pairs = [(t_prefix + t, d, u) for t, (d, u) in zip(targets, _split_fused(folded, sizes), strict=True)]
        for target, down, up in pairs:
            out[f"{target}.lora_A.weight"] = down.contiguous()
            out[f"{target}.lora_B.weight"] = up.contiguous()
    return out


def _bfl_from_diffusers(d_path: str) -> tuple[str, int, int] | None:
    """diffusers transformer module -> (BFL module, part index, number of parts)."""
    if m := re.match(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$", d_path):
        kind, index, rel = m.groups()
        table, block = (_DOUBLE, "double_blocks") if kind == "transformer_blocks" else (_SINGLE, "single_blocks")
        for bfl_rel, targets in table.items():
            if rel in targets:
                return f"{block}.{index}.{bfl_rel}", targets.index(rel), len(targets)
        return None
    for bfl, targets in _TOP.items():
        if d_path == targets[0]:
            return bfl, 0, 1
    return None


def _kohya_from_diffusers_name(name: str) -> tuple[str, int, int] | None:
    """diffusers/PEFT module name -> (kohya module name, part index, number of parts)."""
    if name.startswith("text_encoder_2."):
        k = kohya_name("lora_te3", name[len("text_encoder_2."):])
    elif name.startswith("text_encoder."):
        path = name[len("text_encoder."):]
        # transformers 5 dropped `text_model.` from CLIP module names; the kohya name always has it.
        k = kohya_name("lora_te1", path if path.startswith("text_model.") else "text_model." + path)
    else:
        for prefix in ("transformer.", "base_model.model."):
            if name.startswith(prefix):
                name = name[len(prefix):]
                break
        found = _bfl_from_diffusers(name)
        if found is None:
            return None
        return kohya_name("lora_unet", found[0]), found[1], found[2]
    return (k, 0, 1) if kohya_module_path(k) is not None else None


def diffusers_to_kohya(
    sd: Mapping[str, torch.Tensor],
    *,
    hidden_size: int | None = None,
    drop_unmapped: bool = False,
) -> dict[str, torch.Tensor]:
    """diffusers / PEFT / ai-toolkit LoRA -> kohya state dict (fused modules rebuilt, spec §10.2).

    An optional `<module>.alpha` key is honoured (scale alpha/rank folded into that part's up).
    `hidden_size` is needed only for a linear1 whose `proj_mlp` part is absent (MLP width = 4·hidden, FLUX's ratio).
    """
    groups, unmapped = _group(sd, _PEFT_SUFFIXES)
    fused: dict[str, dict[int, LoraModule]] = {}
    n_parts: dict[str, int] = {}
    for name, parts in groups.items():
        found = _kohya_from_diffusers_name(name)
        if found is None:
            unmapped += [f"{name}{s}" for s, role in _PEFT_SUFFIXES.items() if role in parts]
            continue
        k_name, index, n = found
        fused.setdefault(k_name, {})[index] = _to_module(name, parts)
        n_parts[k_name] = n
    _report_unmapped(unmapped, drop_unmapped, "diffusers/PEFT LoRA")
    out: dict[str, LoraModule] = {}
    for k_name, parts in fused.items():
        n = n_parts[k_name]
        if n == 1:
            m = parts[0]
            up = m.up.float() * m.scale if m.scale != 1.0 else m.up
            up = up.to(m.up.dtype)
            if k_name.endswith("final_layer_adaLN_modulation_1"):
                up = _swap_halves(up)
            out[k_name] = LoraModule(m.down, up, float(m.rank))
            continue
        out[k_name] = _fuse(k_name, parts, n, hidden_size)
    return write_kohya(out)


def _fuse(k_name: str, parts: Mapping[int, LoraModule], n: int, hidden_size: int | None) -> LoraModule:
    """Rebuild a fused kohya module from its diffusers parts (compact when the downs are identical)."""
    some = next(iter(parts.values()))
    dtype, in_features = some.down.dtype, some.down.shape[1]
    for i, m in parts.items():
        if m.down.shape[1] != in_features:
            raise CheckpointError(f"{k_name}: part {i} has {m.down.shape[1]} inputs, part 0 {in_features}", key=k_name)
    h = in_features if n == 4 else next(m.up.shape[0] for m in parts.values())
    sizes = [h] * 3 + ([parts[3].up.shape[0] if 3 in parts else 4 * (hidden_size or h)] if n == 4 else [])
    ups = {i: (m.up.float() * m.scale).to(dtype) if m.scale != 1.0 else m.up for i, m in parts.items()}
    downs = [parts[i].down for i in sorted(parts)]
    if all(d.shape == downs[0].shape and torch.equal(d, downs[0]) for d in downs):
        rank = downs[0].shape[0]
        up = torch.cat([ups[i] if i in ups else torch.zeros(sizes[i], rank, dtype=dtype) for i in range(n)], dim=0)
        return LoraModule(downs[0], up, float(rank))
    rank = sum(d.shape[0] for d in downs)
    up = torch.zeros(sum(sizes), rank, dtype=dtype)
    row, col = 0, 0
    for i in range(n):
        if i in parts:
            r = parts[i].rank
            up[row:row + sizes[i], col:col + r] = ups[i]
            col += r
        row += sizes[i]
    return LoraModule(torch.cat(downs, dim=0), up, float(rank))


def to_kohya(sd: Mapping[str, torch.Tensor], fmt: str, *, hidden_size: int | None = None,
             drop_unmapped: bool = False) -> dict[str, torch.Tensor]:
    """Any supported format -> kohya (a kohya input is validated and gets explicit alphas)."""
    if fmt == "kohya":
        return write_kohya(read_kohya(sd, drop_unmapped=drop_unmapped))
    return diffusers_to_kohya(sd, hidden_size=hidden_size, drop_unmapped=drop_unmapped)


def from_kohya(sd: Mapping[str, torch.Tensor], fmt: str, *, hidden_size: int | None = None,
               drop_unmapped: bool = False) -> dict[str, torch.Tensor]:
    """kohya -> any supported format."""
    if fmt == "kohya":
        return write_kohya(read_kohya(sd, drop_unmapped=drop_unmapped))
    return kohya_to_diffusers(sd, hidden_size, dst=fmt, drop_unmapped=drop_unmapped)


def effective_deltas(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{kohya module name: scale · up @ down} in float32, for checks and tests."""
    return {name: m.delta() for name, m in read_kohya(sd).items()}
