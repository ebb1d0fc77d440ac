"""`flux_extract_lora.py`: a LoRA from the difference of an original and a tuned FLUX model (spec §10.1).

For every 2-D weight of the double and single blocks (the network's default targets; norms and biases
excluded): `Δ = W_tuned − W_org` in fp32, `r = min(dim, out, in)`, SVD `Δ = U S Vᵀ`, up = `U[:, :r]·diag(S[:r])`,
down = `Vᵀ[:r]`, both clamped to [−hi, hi] with hi the `--clamp_quantile` quantile of the signed values of up
and down together, as sd-scripts does (1.0 disables clamping).
Fixes of spec §12.33: either model may carry the `model.diffusion_model.` prefix; alpha = r as a float tensor in
the save precision (scale 1), and `ss_network_alpha` says the same value (or "Dynamic" when r differs between
modules because a weight is smaller than `--dim`). Tensors are read one at a time (memory-mapped), so two
23 GB models never sit in memory together.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from fluxlora.errors import CheckpointError, ConfigError
from fluxlora.families import resolve_family
from fluxlora.models.checkpoints import ModelKind, read_header, require_kind, strip_prefix
from fluxlora.network.formats import LoraModule, kohya_name, write_kohya
from fluxlora.network.metadata import ArchitectureStrings, build_metadata
from fluxlora.network.saving import save_lora
from fluxlora.tools.merge import parse_precision

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExtractOptions:
    """The flags of `flux_extract_lora.py` (sd-scripts names), typed."""

    model_org: Path
    model_tuned: Path
    save_to: Path
    dim: int = 4
    device: str | None = None
    save_precision: str | None = None
    clamp_quantile: float = 0.99
    no_metadata: bool = False
    model_type: str | None = None  # the model family of both files (None: from the headers; Kontext needs it)


def target_keys(model_keys: dict[str, tuple[int, ...]]) -> list[str]:
    """Model keys (prefix stripped) whose delta is extracted: block weights, no norms, no biases (sd-scripts' rule)."""
    return sorted(
        k for k, shape in model_keys.items()
        if ("single_block" in k or "double_block" in k) and k.endswith(".weight") and "norm" not in k and len(shape) == 2
    )


def quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """torch.quantile's 'linear' rule without its 16M-element limit (large ranks of full-size FLUX exceed it)."""
    flat = values.flatten()
    pos = q * (flat.numel() - 1)
    lo, hi = int(pos // 1), min(int(pos // 1) + 1, flat.numel() - 1)
    low = flat.kthvalue(lo + 1).values
    high = flat.kthvalue(hi + 1).values if hi != lo else low
    return low + (high - low) * (pos - lo)


def svd_lora(delta: torch.Tensor, dim: int, clamp_quantile: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(up [out, r], down [r, in]) with up @ down the best rank-r approximation of `delta`, clamped (sd-scripts)."""
    rank = min(dim, *delta.shape)
    u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)
    up = u[:, :rank] @ torch.diag(s[:rank])
    down = vh[:rank]
    if clamp_quantile < 1.0:
        hi = quantile(torch.cat([up.flatten(), down.flatten()]), clamp_quantile)
        up, down = up.clamp(-hi, hi), down.clamp(-hi, hi)
    return up, down


def _open_model(path: Path, flag: str):
    header = read_header(path, flag=flag)
    require_kind(header, (ModelKind.FLUX, ModelKind.CHROMA), flag=flag)
    model_to_file = {model: file for file, model in strip_prefix(header.tensors).items()}
    return header, model_to_file


def _architecture(args: ExtractOptions) -> ArchitectureStrings:
    """The base model both files are (the LoRA is named after it); files of two families are refused."""
    family, info = resolve_family(args.model_org, args.model_type, flag="--model_org")
    tuned_family, tuned = resolve_family(args.model_tuned, args.model_type, flag="--model_tuned")
    if tuned_family.name != family.name or tuned.variant != info.variant:
        raise CheckpointError(f"--model_tuned {args.model_tuned}: is {tuned.title} but --model_org is {info.title}; "
                              "extract from two files of one model", path=args.model_tuned, key="--model_tuned")
    return family.architecture(info)


def extract(args: ExtractOptions) -> None:
    """SVD-extract the LoRA of `model_tuned - model_org` and save it to `save_to`."""
    from safetensors import safe_open

    save_dtype = parse_precision(args.save_precision, "--save_precision") or torch.float32
    if args.dim < 1:
        raise ConfigError(f"--dim {args.dim} must be at least 1", key="--dim")
    if not 0.0 < args.clamp_quantile <= 1.0:
        raise ConfigError(f"--clamp_quantile {args.clamp_quantile} must be in (0, 1]", key="--clamp_quantile")
    org, org_keys = _open_model(args.model_org, "--model_org")
    tuned, tuned_keys = _open_model(args.model_tuned, "--model_tuned")
    architecture = _architecture(args)
    org_shapes = {k: org.tensors[f].shape for k, f in org_keys.items()}
    keys = target_keys(org_shapes)
    if not keys:
        raise CheckpointError(f"--model_org {org.path}: no double/single block weights to extract from", path=org.path)
    for key in keys:
        if key not in tuned_keys:
            raise CheckpointError(f"--model_tuned {tuned.path}: key {key!r} of --model_org is missing; "
                                  "both files must be the same FLUX architecture", path=tuned.path, key=key)
        if tuned.tensors[tuned_keys[key]].shape != org_shapes[key]:
            raise CheckpointError(
                f"--model_tuned {tuned.path}: key {key!r} is {list(tuned.tensors[tuned_keys[key]].shape)} but "
                f"{list(org_shapes[key])} in --model_org; both files must be the same FLUX architecture",
                path=tuned.path, key=key)
    device = args.device or "cpu"
    modules: dict[str, LoraModule] = {}
    with safe_open(str(org.path), framework="pt") as f_org, safe_open(str(tuned.path), framework="pt") as f_tuned:
        for key in keys:
            w_org = f_org.get_tensor(org_keys[key]).to(device, torch.float32)
            w_tuned = f_tuned.get_tensor(tuned_keys[key]).to(device, torch.float32)
            up, down = svd_lora(w_tuned - w_org, args.dim, args.clamp_quantile)
            name = kohya_name("lora_unet", key[: -len(".weight")])
            modules[name] = LoraModule(down.cpu(), up.cpu(), float(down.shape[0]))
    tensors = write_kohya(modules, save_dtype)
    ranks = {m.rank for m in modules.values()}
    rank = str(ranks.pop()) if len(ranks) == 1 else None
    info = {"network_dim": rank or "Dynamic", "network_alpha": str(float(rank)) if rank else "Dynamic",
            "network_args": {}, "metadata_title": args.save_to.stem}
    metadata = build_metadata(info, architecture,
                              detail="bare" if args.no_metadata else "minimal")
    save_lora(args.save_to, tensors, metadata)  # adds sshs_model_hash / sshs_legacy_hash
    logger.info("extracted %d module(s) at rank %s -> %s", len(modules), rank or "varying", args.save_to)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flux_extract_lora.py", description=__doc__.split("\n")[0])
    p.add_argument("--model_org", required=True, help="original FLUX model (.safetensors)")
    p.add_argument("--model_tuned", required=True, help="tuned FLUX model (.safetensors)")
    p.add_argument("--save_to", required=True, help="output LoRA file (.safetensors)")
    p.add_argument("--dim", type=int, default=4, help="LoRA rank (default 4)")
    p.add_argument("--device", default=None, help="device for the SVD, e.g. cuda (default cpu)")
    p.add_argument("--save_precision", default=None, help="float, fp16, bf16 (default float)")
    p.add_argument("--clamp_quantile", type=float, default=0.99, help="clamp up/down to this quantile (default 0.99)")
    p.add_argument("--mem_eff_safe_open", action="store_true", help="accepted; tensors are always read one at a time")
    p.add_argument("--no_metadata", action="store_true", help="write only the minimal ss_* metadata")
    p.add_argument("--model_type", default=None, help="(fluxlora) the model family of both files when the headers do "
                   "not tell (kontext); default: detected")
    return p


def parse_extract_args(argv: list[str]) -> ExtractOptions:
    """The command line as `ExtractOptions`."""
    a = build_parser().parse_args(argv)
    return ExtractOptions(model_org=Path(a.model_org), model_tuned=Path(a.model_tuned), save_to=Path(a.save_to),
                          dim=a.dim, device=a.device, save_precision=a.save_precision,
                          clamp_quantile=a.clamp_quantile, no_metadata=a.no_metadata, model_type=a.model_type)


def main(argv: list[str]) -> int:
    extract(parse_extract_args(argv))
    return 0
