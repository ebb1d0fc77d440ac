"""`convert_flux_lora.py`: convert LoRA files between sd-scripts, diffusers, PEFT and ai-toolkit (spec §10.2).

Unlike sd-scripts (§12.34) every direction works, text-encoder and input-layer LoRAs are kept, and a key that maps
to nothing is an error unless `--drop_unmapped`. The conversion goes through the sd-scripts form; the maths of
each step is in `fluxlora.network.formats`. The width of single-block `linear1` is read from the LoRA itself
(its down's input features), so tiny and full-size files convert alike; `--hidden_size` only cross-checks it
(or sizes an absent `proj_mlp` part). Metadata is copied unchanged; tensors keep their dtype.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path

from fluxlora.errors import CheckpointError, ConfigError, FluxLoraError
from fluxlora.files import save_safetensors
from fluxlora.models.checkpoints import load_tensors, read_header
from fluxlora.network.deltas import ALGO_NAMES, algorithm, group_modules, is_lycoris
from fluxlora.network.formats import detect_lora_format, from_kohya, to_kohya

logger = logging.getLogger(__name__)

# CLI name -> formats.py name. ai-toolkit and diffusers share one naming; PEFT drops the `transformer.` prefix.
FORMAT_NAMES = {"sd-scripts": "kohya", "diffusers": "diffusers", "ai-toolkit": "ai-toolkit", "peft": "peft"}
_DIFFUSERS_LIKE = ("diffusers", "ai-toolkit", "peft")
_FOR_COMFYUI = "for ComfyUI or Forge convert with --dst sd-scripts (the kohya layout they read in full)"
# CLI name -> who reads a file in that layout (printed after converting, so nobody ships a file their tool skips).
CONSUMERS = {
    "sd-scripts": "kohya layout (lora_unet_/lora_te1_/lora_te3_): read by ComfyUI, Forge/A1111, sd-scripts, fluxlora "
                  "and diffusers (FluxPipeline.load_lora_weights converts it)",
    "diffusers": "diffusers layout (transformer./text_encoder. lora_A/lora_B): read by diffusers "
                 "(FluxPipeline.load_lora_weights) and ai-toolkit; ComfyUI skips its text-encoder (T5) keys, so "
                 + _FOR_COMFYUI,
    "ai-toolkit": "ai-toolkit layout (the diffusers naming): read by ai-toolkit and diffusers "
                  "(FluxPipeline.load_lora_weights); ComfyUI skips its text-encoder (T5) keys, so " + _FOR_COMFYUI,
    "peft": "PEFT layout (no transformer. prefix): read by peft on the transformer itself "
            "(FluxTransformer2DModel.load_lora_adapter); FluxPipeline.load_lora_weights wants --dst diffusers, and "
            "ComfyUI and Forge read none of its keys, so " + _FOR_COMFYUI,
}


@dataclass(frozen=True)
class ConvertOptions:
    """The flags of `convert_flux_lora.py` (sd-scripts names), typed."""

    src_path: Path
    dst_path: Path
    src: str = "ai-toolkit"  # a key of FORMAT_NAMES
    dst: str = "sd-scripts"
    drop_unmapped: bool = False
    hidden_size: int | None = None


def convert(args: ConvertOptions) -> str:
    """Convert `src_path` (layout `src`) to `dst_path` (layout `dst`); returns who reads the written layout."""
    header = read_header(args.src_path, flag="--src_path")
    src, dst = FORMAT_NAMES[args.src], FORMAT_NAMES[args.dst]
    try:
        found = detect_lora_format(header.tensors, header.metadata)
        same_family = found == src or (found in _DIFFUSERS_LIKE and src in _DIFFUSERS_LIKE)
        if not same_family:
            shown = {v: k for k, v in FORMAT_NAMES.items()}[found]
            raise ConfigError(f"the file is in {shown} format but --src is {args.src}; pass --src {shown}", key="--src")
        tensors = load_tensors(header)
        if found == "kohya":
            refuse_lycoris(tensors, args.dst)
        kohya = to_kohya(tensors, found, hidden_size=args.hidden_size, drop_unmapped=args.drop_unmapped)
        out = from_kohya(kohya, dst, hidden_size=args.hidden_size)
    except FluxLoraError as err:
        raise type(err)(f"--src_path {header.path}: {err}", path=header.path, key=err.key) from None
    if not out:
        raise CheckpointError(f"--src_path {header.path}: nothing left to write after conversion", path=header.path)
    save_safetensors(args.dst_path, out, header.metadata)
    logger.info("converted %s (%s, %d tensors) -> %s (%s, %d tensors)", header.path, args.src, len(tensors),
                args.dst_path, args.dst, len(out))
    return CONSUMERS[args.dst]


def refuse_lycoris(tensors, dst: str) -> None:
    """LoKr / LoHa / full / DoRA modules have no diffusers / PEFT / ai-toolkit LoRA form: say so, write nothing."""
    lycoris = {n: algorithm(p) for n, p in group_modules(tensors).items() if is_lycoris(p)}
    if lycoris:
        kinds = sorted({ALGO_NAMES[a] for a in lycoris.values()})
        raise ConfigError(f"{len(lycoris)} module(s) are {'/'.join(kinds)} (LyCORIS), e.g. {next(iter(lycoris))}; "
                          f"the {dst} LoRA format holds only plain LoRA pairs, so converting would load wrongly — use the "
                          "file as it is (ComfyUI, fluxlora generate) or merge it into the model with flux_merge_lora.py",
                          key="--src_path")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="convert_flux_lora.py", description=__doc__.split("\n")[0])
    choices = list(FORMAT_NAMES)
    p.add_argument("--src", default="ai-toolkit", choices=choices, help="source format (default ai-toolkit)")
    p.add_argument("--dst", default="sd-scripts", choices=choices, help="destination format (default sd-scripts)")
    p.add_argument("--src_path", default=None, help="source LoRA file (.safetensors)")
    p.add_argument("--dst_path", default=None, help="destination LoRA file (.safetensors)")
    p.add_argument("--drop_unmapped", action="store_true",
                   help="(fluxlora) drop keys that map to no module instead of failing")
    p.add_argument("--hidden_size", type=int, default=None,
                   help="(fluxlora) FLUX width check; normally read from the LoRA's shapes")
    return p


def parse_convert_args(argv: list[str]) -> ConvertOptions:
    """The command line as `ConvertOptions`; --src_path and --dst_path are required."""
    a = build_parser().parse_args(argv)
    for flag in ("src_path", "dst_path"):
        if getattr(a, flag) is None:
            raise ConfigError(f"--{flag} is required", key=f"--{flag}")
    return ConvertOptions(src_path=Path(a.src_path), dst_path=Path(a.dst_path), src=a.src, dst=a.dst,
                          drop_unmapped=a.drop_unmapped, hidden_size=a.hidden_size)


def main(argv: list[str]) -> int:
    options = parse_convert_args(argv)
    readers = convert(options)
    print(f"wrote {options.dst_path}: {readers}")
    return 0
