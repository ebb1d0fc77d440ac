"""`flux_merge_lora.py`: merge LoRAs into FLUX / CLIP-L / T5 checkpoints, or into one LoRA (spec §10.3).

Into a model: `W += ratio · (up @ down) · alpha/rank` per module, in `--precision` on `--working_device`, LoRAs
applied in the order given.
LyCORIS modules (LoKr, LoHa, full, DoRA; fluxlora.network.deltas) add the change they define: W += ratio · ΔW,
b += ratio · diff_b, and DoRA W += ratio · (DoRA(W, ΔW) − W) on the weight merged so far. Fixes of spec §12.32:
- the output keeps each tensor's dtype from the base file unless `--save_precision` is given (sd-scripts wrote fp32);
- `model.diffusion_model.`-prefixed bases work and keep their prefix; `--save_to name.safetensors` works;
- diffusers / ai-toolkit / PEFT LoRAs are converted with the generic key map (every block index; detected from
  the keys, `--diffusers` is accepted but not needed); their text-encoder parts merge too;
- a LoRA module that matches no weight of a model it targets is an error listing the modules (a LoRA for another
  model is a mistake), unless `--ignore_unmatched` (ours) turns it into a warning; modules for a text encoder
  whose base was not given are skipped with one warning naming the flag to add;
- merged tensors are cast to their output dtype one by one and the file is streamed to disk, so peak memory is
  about one copy of the model (`--mem_eff_load_save` is accepted and changes nothing).

LoRA + LoRA (no base model): ratios are linear (`ratio` scales the module's delta; sd-scripts applied
`ratio·|ratio|`). Each LoRA's factors are scaled by `√|c|` (the sign going to down) with
`c = ratio·(α_i/r_i)/(α_base/r_base)`, "base" being the first file with the module, whose alpha the result
keeps. Without `--concat` up and down are summed (sd-scripts' semantics: exact for one LoRA, an approximation of
the sum of deltas for more; same ranks required); with `--concat` they are concatenated along the rank and alpha
is scaled with the rank (`α_base·rank_total/r_base`), so the result is exactly `Σ ratio_i·α_i/r_i·up_i@down_i`.
`--shuffle` permutes the rank order with a fixed seed (the delta does not change). Output metadata:
`ss_network_module=networks.lora_flux`, `ss_merged_from` and `modelspec.merged_from` name the inputs.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from fluxlora.errors import CheckpointError, ConfigError, FluxLoraError
from fluxlora.families import resolve_family
from fluxlora.files import atomic_write
from fluxlora.models.checkpoints import (
    DTYPES,
    ModelKind,
    SafetensorsHeader,
    load_tensors,
    read_header,
    require_kind,
    strip_prefix,
)
from fluxlora.network.deltas import (
    ALGO_NAMES,
    algorithm,
    delta_shape,
    group_modules,
    is_lycoris,
    module_delta,
)
from fluxlora.network.formats import (
    KOHYA_PREFIXES,
    LoraModule,
    detect_lora_format,
    kohya_module_path,
    read_kohya,
    to_kohya,
    write_kohya,
)
from fluxlora.network.metadata import ArchitectureStrings, build_metadata, model_metadata
from fluxlora.network.saving import save_lora

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MergeOptions:
    """The flags of `flux_merge_lora.py` (sd-scripts names), typed."""

    models: tuple[Path, ...]
    ratios: tuple[float, ...]  # one per model
    save_to: Path | None = None
    flux_model: Path | None = None
    clip_l: Path | None = None
    t5xxl: Path | None = None
    clip_l_save_to: Path | None = None
    t5xxl_save_to: Path | None = None
    precision: str = "float"
    save_precision: str | None = None
    loading_device: str = "cpu"
    working_device: str = "cpu"
    no_metadata: bool = False
    concat: bool = False
    shuffle: bool = False
    ignore_unmatched: bool = False
    model_type: str | None = None  # the family of --flux_model (None: from its header; Kontext needs it)

    @property
    def into_models(self) -> bool:
        """True when the LoRAs are merged into base model files (else into one LoRA)."""
        return any(p is not None for p in (self.flux_model, self.clip_l, self.t5xxl))

_DTYPES = {
    "float": torch.float32, "fp32": torch.float32, "float32": torch.float32,
    "fp16": torch.float16, "float16": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp8": torch.float8_e4m3fn, "fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2,
}
_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
SHUFFLE_SEED = 0


def parse_precision(value: str | None, flag: str, *, allow_fp8: bool = True) -> torch.dtype | None:
    """sd-scripts precision names (float/fp32, fp16, bf16, fp8, fp8_e4m3fn, fp8_e5m2) -> dtype; None stays None."""
    if value is None:
        return None
    dtype = _DTYPES.get(value.lower())
    if dtype is None or (not allow_fp8 and dtype in _FP8):
        names = [n for n, d in _DTYPES.items() if allow_fp8 or d not in _FP8]
        raise ConfigError(f"{flag} {value!r} is not a precision; use one of {', '.join(names)}", key=flag)
    return dtype


def architecture_of_loras(metadatas: list[Mapping[str, str]], paths: list[Path] | None = None
                          ) -> ArchitectureStrings:
    """The base model the merged LoRAs share, as their files name it (FLUX.1-dev, sd-scripts' assumption, when none
    does); LoRAs of different base models (Chroma and FLUX.1, Kontext and Fill...) are refused: their sum fits
    neither. FLUX.1 dev and schnell LoRAs together give dev, as before."""
    named = [ArchitectureStrings.of_lora(meta) for meta in metadatas]
    found = {a for a in named if a is not None}
    if len({a.architecture for a in found} - {"flux-1-dev", "flux-1-schnell"}) + bool(
            {a.architecture for a in found} & {"flux-1-dev", "flux-1-schnell"}) > 1:
        names = ", ".join(f"{(paths or [Path('?')] * len(named))[i].name} ({a.architecture if a else 'unnamed'})"
                          for i, a in enumerate(named))
        raise CheckpointError(f"--models: LoRAs of different base models ({names}); merge LoRAs of one model "
                              "family (their modelspec.architecture must agree)", key="--models")
    if len(found) == 1:
        return found.pop()
    from fluxlora.families.flux1.family import FLUX1

    return FLUX1.architecture_of_variant("dev")


@dataclass
class LycorisModule:
    """A LoKr / LoHa / full / DoRA module of a file: its tensors by suffix (maths in fluxlora.network.deltas)."""

    parts: dict[str, torch.Tensor]

    @property
    def shape(self) -> tuple[int, int]:
        return delta_shape(self.parts)


Module = LoraModule | LycorisModule


def load_lora(path: str | Path, flag: str = "--models", *, hidden_size: int | None = None,
              ignore_unmatched: bool = False) -> tuple[dict[str, Module], dict[str, str]]:
    """Read a LoRA file in any supported format as kohya modules (pickles are refused), plus its metadata.
    LyCORIS modules (LoKr, LoHa, full, DoRA) come as `LycorisModule`s.

    Keys that name no FLUX / CLIP-L / T5 Linear are an error, or dropped with a warning when `ignore_unmatched`.
    """
    header = read_header(path, flag=flag)
    try:
        fmt = detect_lora_format(header.tensors, header.metadata)
        tensors = load_tensors(header)
        lycoris: dict[str, Module] = {}
        if fmt == "kohya":
            groups = group_modules(tensors)
            names = [n for n, parts in groups.items() if is_lycoris(parts)]
            unknown = [n for n in names if kohya_module_path(n) is None]
            if unknown and not ignore_unmatched:
                raise CheckpointError(f"{len(unknown)} LyCORIS module(s) map to no FLUX / CLIP-L / T5 module, first "
                                      f"{unknown[:3]}; pass --ignore_unmatched to merge the rest", key=unknown[0])
            lycoris = {n: LycorisModule(groups[n]) for n in names if n not in unknown}
            tensors = {k: v for k, v in tensors.items() if k.partition(".")[0] not in names}
        sd = to_kohya(tensors, fmt, hidden_size=hidden_size, drop_unmapped=ignore_unmatched) if tensors else {}
        return {**read_kohya(sd), **lycoris}, header.metadata
    except FluxLoraError as err:
        # formats.py names the convert flag; here the same switch is --ignore_unmatched
        message = str(err).replace("--drop_unmapped to convert", "--ignore_unmatched to merge")
        raise CheckpointError(f"{flag} {header.path}: {message}", path=header.path, key=err.key) from None


def _title(path: Path, metadata: Mapping[str, str]) -> str:
    return metadata.get("modelspec.title") or path.stem


def _base_key_map(keys: Mapping[str, tuple[int, ...]], lora_prefix: str) -> tuple[dict[str, str], dict[str, str]]:
    """(kohya module name -> file key of its 2-D weight, file key -> model key) for one base file."""
    rename = strip_prefix(keys)
    names = {}
    for file_key, model_key in rename.items():
        if model_key.endswith(".weight") and len(keys[file_key]) == 2:
            names[f"{lora_prefix}_{model_key[:-len('.weight')].replace('.', '_')}"] = file_key
    return names, rename


_BASES = (  # (lora prefix, model flag, save flag, kinds)
    ("lora_unet", "--flux_model", "--save_to", (ModelKind.FLUX, ModelKind.CHROMA)),
    ("lora_te1", "--clip_l", "--clip_l_save_to", (ModelKind.CLIP_L,)),
    ("lora_te3", "--t5xxl", "--t5xxl_save_to", (ModelKind.T5XXL,)),
)


def merge_into_models(args: MergeOptions) -> None:
    """Merge the LoRAs into the given FLUX.1 / CLIP-L / T5 files, each written to its `*save_to` path."""
    merge_dtype = parse_precision(args.precision, "--precision", allow_fp8=False)
    save_dtype = parse_precision(args.save_precision, "--save_precision")
    loras = [(Path(p), r, *load_lora(p, ignore_unmatched=args.ignore_unmatched))
             for p, r in zip(args.models, args.ratios, strict=True)]
    bases = {}
    for prefix, flag, save_flag, kinds in _BASES:
        path = getattr(args, flag[2:])
        if path is None:
            continue
        if getattr(args, save_flag[2:]) is None:
            raise ConfigError(f"{flag} is given but {save_flag} is not; say where to write the merged model", key=save_flag)
        header = read_header(path, flag=flag)
        require_kind(header, kinds, flag=flag)
        names, _ = _base_key_map(header.shapes, prefix)
        bases[prefix] = (header, names, flag, save_flag)
    family = architecture = None
    if "lora_unet" in bases:  # the transformer's model family: its LoRAs only, its name in the output
        family, info = resolve_family(Path(args.flux_model), args.model_type, flag="--flux_model")
        architecture = family.architecture(info)
        for path, _, _, meta in loras:
            refusal = family.check_lora(info, meta)
            if refusal is not None:
                raise CheckpointError(f"--models {path}: {refusal}", path=path, key="--models")

    # Validate everything before touching a weight: unmatched modules and shape mismatches are reported up front.
    plan: dict[str, list[tuple[str, LoraModule, float]]] = {p: [] for p in bases}
    unmatched: list[str] = []
    skipped: dict[str, int] = {}
    for path, ratio, modules, _ in loras:
        for name, module in modules.items():
            prefix = next(p for p in KOHYA_PREFIXES if name.startswith(p + "_"))
            if prefix not in bases:
                skipped[prefix] = skipped.get(prefix, 0) + 1
                continue
            header, names, flag, _ = bases[prefix]
            key = names.get(name)
            if key is None:
                unmatched.append(f"{name} ({path.name})")
                continue
            out_f, in_f = header.shapes[key]
            shape = module.shape if isinstance(module, LycorisModule) else (module.up.shape[0], module.down.shape[1])
            if tuple(shape) != (out_f, in_f):
                raise CheckpointError(
                    f"--models {path}: module {name} is {shape[0]}x{shape[1]} but {flag} "
                    f"{header.path} key {key!r} is {out_f}x{in_f}; the LoRA was trained for another model",
                    path=path, key=key)
            plan[prefix].append((key, module, ratio))
            if isinstance(module, LycorisModule) and "diff_b" in module.parts:
                bias_key = key[: -len(".weight")] + ".bias"
                if bias_key not in header.shapes:
                    raise CheckpointError(f"--models {path}: module {name} changes a bias but {flag} {header.path} "
                                          f"has no {bias_key!r}", path=path, key=bias_key)
                plan[prefix].append((bias_key, module, ratio))
    for prefix, count in skipped.items():
        flag = next(f for p, f, _, _ in _BASES if p == prefix)
        logger.warning("%d LoRA module(s) for %s are not merged because %s was not given", count, prefix, flag)
    if unmatched:
        listing = ", ".join(unmatched[:5]) + (" ..." if len(unmatched) > 5 else "")
        message = f"{len(unmatched)} LoRA module(s) match no weight of the given models: {listing}"
        if not args.ignore_unmatched:
            raise CheckpointError(message + "; is the LoRA for this model? (--ignore_unmatched merges the rest)",
                                  key=unmatched[0])
        logger.warning("%s; skipped (--ignore_unmatched)", message)

    merged_from = ", ".join(_title(p, meta) for p, _, _, meta in loras)
    if architecture is None:  # no transformer merged: the LoRAs name the text encoders' model
        architecture = architecture_of_loras([meta for *_, meta in loras], [p for p, *_ in loras])
    for prefix, (header, _, _flag, save_flag) in bases.items():
        tensors = _merge_file(header, plan[prefix], merge_dtype or torch.float32, save_dtype, args.working_device,
                              args.loading_device)
        metadata: dict[str, str] = {}
        if not args.no_metadata:
            metadata = model_metadata(architecture, title="Merged model",
                                      merged_from=merged_from, with_modelspec=prefix == "lora_unet")
        out = Path(getattr(args, save_flag[2:]))
        save_streaming(out, tensors, metadata)
        logger.info("merged %d module(s) into %s -> %s", len(plan[prefix]), header.path, out)


def _merge_file(header: SafetensorsHeader, plan: list[tuple[str, Module, float]], merge_dtype: torch.dtype,
                save_dtype: torch.dtype | None, working_device: str, loading_device: str) -> dict[str, torch.Tensor]:
    """The base file's tensors with every planned delta added, each cast to its output dtype as soon as it is done
    (so a 12B model never has a second full-size copy in the merge precision)."""
    by_key: dict[str, list[tuple[Module, float]]] = {}
    for key, module, ratio in plan:
        by_key.setdefault(key, []).append((module, ratio))
    tensors = load_tensors(header, device=loading_device)
    for key, tensor in tensors.items():
        dtype = save_dtype if (save_dtype is not None and tensor.is_floating_point()) else tensor.dtype
        if key in by_key:
            weight = tensor.to(working_device, merge_dtype)
            for module, ratio in by_key[key]:
                if isinstance(module, LycorisModule):
                    parts = {k: v.to(working_device) for k, v in module.parts.items()}
                    delta, bias = module_delta(parts, weight, ratio)  # DoRA reads the weight merged so far
                    weight = weight + (bias if key.endswith(".bias") else delta).to(merge_dtype)
                    continue
                up = module.up.to(working_device, merge_dtype)
                down = module.down.to(working_device, merge_dtype)
                weight = weight + ratio * (up @ down) * module.scale
            tensor = weight
        tensors[key] = tensor.to("cpu", dtype)
    return tensors


_ST_DTYPES = {dtype: name for name, dtype in DTYPES.items()}


def save_streaming(path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
    """Write a safetensors file tensor by tensor (atomically), without building the whole file in memory first.

    `safetensors.torch.save` serialises everything into one bytes object, which doubles the peak memory of a
    23 GB merge; the format (8-byte header length, JSON header, raw little-endian data) is simple to stream.
    """
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": _ST_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as the official writer does
    with atomic_write(path) as handle:
        handle.write(len(raw).to_bytes(8, "little"))
        handle.write(raw)
        for tensor in tensors.values():
            handle.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def merge_loras(args: MergeOptions) -> None:
    """LoRA + LoRA merge into one kohya LoRA (see the module docstring for the exact semantics)."""
    save_dtype = parse_precision(args.save_precision, "--save_precision")
    merge_dtype = parse_precision(args.precision, "--precision", allow_fp8=False) or torch.float32
    loras = [(Path(p), r, *load_lora(p)) for p, r in zip(args.models, args.ratios, strict=True)]
    for path, _, modules, _ in loras:
        lycoris = [n for n, m in modules.items() if isinstance(m, LycorisModule)]
        if lycoris:
            kinds = "/".join(sorted({ALGO_NAMES[algorithm(modules[n].parts)] for n in lycoris}))
            raise ConfigError(f"--models {path}: {len(lycoris)} module(s) are {kinds} (LyCORIS), e.g. {lycoris[0]}; "
                              "they cannot be summed into one LoRA file — merge them into the model instead "
                              "(--flux_model/--clip_l/--t5xxl with --save_to)", key="--models")
    contributions: dict[str, list[tuple[LoraModule, float]]] = {}
    for _, ratio, modules, _ in loras:
        for name, module in modules.items():
            contributions.setdefault(name, []).append((module, ratio))
    generator = torch.Generator().manual_seed(SHUFFLE_SEED)
    result: dict[str, LoraModule] = {}
    for name, items in contributions.items():
        base = items[0][0]
        alpha_base = base.alpha or base.rank
        downs, ups = [], []
        for module, ratio in items:
            c = ratio * module.scale / base.scale
            f = math.sqrt(abs(c))
            downs.append(module.down.to(merge_dtype) * (f if c >= 0 else -f))
            ups.append(module.up.to(merge_dtype) * f)
        if args.concat:
            down, up = torch.cat(downs, dim=0), torch.cat(ups, dim=1)
            alpha = alpha_base * down.shape[0] / base.rank
        else:
            ranks = {d.shape[0] for d in downs}
            if len(ranks) > 1:
                raise CheckpointError(f"module {name} has ranks {sorted(ranks)} in the inputs; summing needs equal "
                                      "ranks — use --concat", key=name)
            down, up, alpha = torch.stack(downs).sum(0), torch.stack(ups).sum(0), alpha_base
        if args.shuffle:
            perm = torch.randperm(down.shape[0], generator=generator)
            down, up = down[perm], up[:, perm]
        result[name] = LoraModule(down, up, float(alpha))
    tensors = write_kohya(result, save_dtype or merge_dtype)
    ranks = {m.rank for m in result.values()}
    alphas = {m.alpha for m in result.values()}
    merged_from = ", ".join(_title(p, meta) for p, _, _, meta in loras)
    assert args.save_to is not None
    info = {"network_dim": str(ranks.pop()) if len(ranks) == 1 else "Dynamic",
            "network_alpha": str(alphas.pop()) if len(alphas) == 1 else "Dynamic", "merged_from": merged_from,
            "metadata_title": args.save_to.stem, "metadata_merged_from": merged_from}
    metadata = build_metadata(info, architecture_of_loras([meta for *_, meta in loras], [p for p, *_ in loras]),
                              detail="bare" if args.no_metadata else "minimal")
    save_lora(args.save_to, tensors, metadata)  # adds sshs_model_hash / sshs_legacy_hash
    logger.info("merged %d LoRA(s), %d module(s) -> %s", len(loras), len(result), args.save_to)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flux_merge_lora.py", description=__doc__.split("\n")[0])
    p.add_argument("--save_precision", default=None, help="output precision: float, fp16, bf16, fp8_e4m3fn, fp8_e5m2 "
                   "(default: each tensor keeps the base file's dtype; LoRA merges: --precision)")
    p.add_argument("--precision", default="float", help="merge precision: float, fp16, bf16 (default float)")
    p.add_argument("--flux_model", default=None, help="FLUX.1-family transformer (.safetensors, BFL layout, prefix "
                   "allowed): FLUX.1, Chroma, Kontext, Fill")
    p.add_argument("--model_type", default=None, help="(fluxlora) the family of --flux_model when its header does not "
                   "tell (kontext); default: detected")
    p.add_argument("--clip_l", default=None, help="CLIP-L text encoder (.safetensors)")
    p.add_argument("--t5xxl", default=None, help="T5-XXL text encoder (.safetensors)")
    p.add_argument("--mem_eff_load_save", action="store_true", help="accepted; loading is memory-mapped anyway")
    p.add_argument("--loading_device", default="cpu", help="device to load the base model on (default cpu)")
    p.add_argument("--working_device", default="cpu", help="device to merge on (default cpu)")
    p.add_argument("--save_to", default=None, help="output file (merged FLUX model, or the merged LoRA)")
    p.add_argument("--clip_l_save_to", default=None, help="output file for the merged CLIP-L")
    p.add_argument("--t5xxl_save_to", default=None, help="output file for the merged T5-XXL")
    p.add_argument("--models", type=str, nargs="*", default=[], help="LoRA files to merge (.safetensors)")
    p.add_argument("--ratios", type=float, nargs="*", default=None, help="one ratio per LoRA (default 1.0 each)")
    p.add_argument("--no_metadata", action="store_true", help="write no ModelSpec / merged_from metadata")
    p.add_argument("--concat", action="store_true", help="LoRA merge: concatenate ranks (exact sum of deltas)")
    p.add_argument("--shuffle", action="store_true", help="LoRA merge: permute the rank order")
    p.add_argument("--diffusers", action="store_true",
                   help="the LoRAs use diffusers naming (accepted; the format is detected from the keys)")
    p.add_argument("--ignore_unmatched", action="store_true",
                   help="(fluxlora) warn instead of failing when a LoRA module matches no weight of the model")
    return p


def parse_merge_args(argv: list[str]) -> MergeOptions:
    """The command line as `MergeOptions`, with the flag combinations checked."""
    args = build_parser().parse_args(argv)
    if not args.models:
        raise ConfigError("--models is empty; give the LoRA file(s) to merge", key="--models")
    ratios = args.ratios if args.ratios is not None else [1.0] * len(args.models)
    if len(ratios) != len(args.models):
        raise ConfigError(f"--ratios has {len(ratios)} value(s) but --models has {len(args.models)} file(s); "
                          "give one ratio per model", key="--ratios")
    paths = {name: None if getattr(args, name) is None else Path(getattr(args, name))
             for name in ("save_to", "flux_model", "clip_l", "t5xxl", "clip_l_save_to", "t5xxl_save_to")}
    options = MergeOptions(
        models=tuple(Path(p) for p in args.models), ratios=tuple(float(r) for r in ratios), **paths,
        precision=args.precision, save_precision=args.save_precision, loading_device=args.loading_device,
        working_device=args.working_device, no_metadata=args.no_metadata, concat=args.concat, shuffle=args.shuffle,
        ignore_unmatched=args.ignore_unmatched, model_type=args.model_type)
    if not options.into_models and options.save_to is None:
        raise ConfigError("--save_to is required; say where to write the merged LoRA", key="--save_to")
    return options


def merge(options: MergeOptions) -> None:
    """Merge into model files or into one LoRA, as the options say."""
    if options.into_models:
        merge_into_models(options)
    else:
        merge_loras(options)


def main(argv: list[str]) -> int:
    merge(parse_merge_args(argv))
    return 0
