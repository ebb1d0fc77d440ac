"""`fluxlora inspect FILE [FILE...]`: what a safetensors file (or diffusers folder) is, from its header only.

Prints kind, FLUX variant and layout, dtypes, parameter count and file size; for a LoRA its module count,
ranks, alphas and the main sd-scripts `ss_*` metadata. No tensor data is read, so a 23 GB file takes
milliseconds.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

from fluxlora.errors import FluxLoraError
from fluxlora.models.checkpoints import (
    KIND_DESCRIPTIONS,
    ModelKind,
    SafetensorsHeader,
    detect_kind,
    read_header,
)
from fluxlora.models.flux_loading import inspect_flux

SS_SUMMARY_KEYS = ("ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args", "ss_base_model_version",
                   "ss_output_name", "ss_steps", "ss_epoch", "ss_learning_rate", "ss_training_started_at")
LORA_DOWN = (".lora_down.weight", ".lora_A.weight")


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} GB"


def _count(n: int) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.3f} B ({n:,})"
    if n >= 1e6:
        return f"{n / 1e6:.3f} M ({n:,})"
    return f"{n:,}"


def _dtypes(headers: list[SafetensorsHeader]) -> str:
    counts: Counter[str] = Counter()
    for h in headers:
        counts.update(h.dtype_counts())
    total = sum(counts.values()) or 1
    return ", ".join(f"{d} {100 * n / total:.1f}%" for d, n in counts.most_common())


def _algorithms(keys) -> Counter[str]:
    """Modules per adapter algorithm, from the key suffixes (LyCORIS files hold LoKr / LoHa / full / DoRA)."""
    suffixes: dict[str, set[str]] = {}
    for key in keys:
        name, _, suffix = key.partition(".")
        suffixes.setdefault(name, set()).add(suffix)
    algos: Counter[str] = Counter()
    for parts in suffixes.values():
        kind = next((a for a, marks in _ALGO_MARKS if parts & marks), None)
        if kind is not None:
            algos[kind + (" + DoRA" if "dora_scale" in parts else "")] += 1
    return algos


_ALGO_MARKS = (("LoKr", {"lokr_w1", "lokr_w1_a", "lokr_w2", "lokr_w2_a"}), ("LoHa", {"hada_w1_a"}), ("full", {"diff"}),
               ("LoRA", {"lora_down.weight", "lora_A.weight"}))


def _lora_lines(header: SafetensorsHeader) -> list[str]:
    downs = {k: v for k, v in header.tensors.items() if k.endswith(LORA_DOWN)}
    ranks = Counter(v.shape[0] for v in downs.values() if v.shape)
    algos = _algorithms(header.tensors)
    # one key per module: a LoRA down, or the first factor of a LoKr / LoHa / full module
    firsts = list(downs) + [k for k in header.tensors if k.partition(".")[2] in ("lokr_w1", "lokr_w1_a", "hada_w1_a", "diff")]
    prefixes = Counter(k.split("_", 2)[1] if k.startswith("lora_") else k.split(".", 1)[0] for k in firsts)
    lines = [f"  modules:    {len(firsts)} ({', '.join(f'{p} {n}' for p, n in sorted(prefixes.items()))})",
             f"  ranks:      {', '.join(f'{r} ×{n}' for r, n in sorted(ranks.items()))}",
             f"  algorithms: {', '.join(f'{a} {n}' for a, n in sorted(algos.items()))}"]
    alphas = sorted({k for k in header.tensors if k.endswith(".alpha")})
    lines.append(f"  alpha keys: {len(alphas)}")
    ss = {k: v for k, v in header.metadata.items() if k.startswith("ss_")}
    for key in SS_SUMMARY_KEYS:
        if key in ss:
            value = ss[key] if len(ss[key]) <= 80 else ss[key][:77] + "..."
            lines.append(f"  {key}: {value}")
    lines.append(f"  metadata:   {len(ss)} ss_* keys, {len(header.metadata) - len(ss)} other keys")
    return lines


def size_lines(headers: list[SafetensorsHeader]) -> list[str]:
    """dtype shares, parameter and tensor counts and bytes of a file (or of a folder's shards)."""
    return [f"  dtype:      {_dtypes(headers)}",
            f"  parameters: {_count(sum(h.num_params for h in headers))}",
            f"  tensors:    {sum(len(h.tensors) for h in headers)}",
            f"  size:       {_size(sum(h.file_size for h in headers))}"]


def describe(path: str | Path) -> list[str]:
    """Lines describing one file or diffusers folder, from headers only."""
    path = Path(path)
    if path.is_dir():
        info = inspect_flux(path, flag=None)
        headers = [read_header(f) for f in info.files]
        kind = ModelKind.FLUX_DIFFUSERS
    else:
        headers = [read_header(path)]
        kind = detect_kind(headers[0].tensors)
        info = inspect_flux(path, flag=None) if kind in (ModelKind.FLUX, ModelKind.FLUX_DIFFUSERS) else None
    lines = [f"{path}", f"  kind:       {kind.value} ({KIND_DESCRIPTIONS[kind]})"]
    if info is not None:
        p = info.params
        lines += [f"  variant:    {info.variant}", f"  layout:     {info.layout}",
                  f"  model:      width {p.hidden_size}, {p.num_heads} heads of {p.head_dim}, {p.depth} double + "
                  f"{p.depth_single_blocks} single blocks, MLP {p.mlp_hidden_dim}"]
        if len(headers) > 1:
            lines.append(f"  files:      {len(headers)} shards")
    lines += size_lines(headers)
    if kind is ModelKind.LORA:
        lines += _lora_lines(headers[0])
    return lines


def main(argv: list[str]) -> int:
    """Print a description of each FILE; exit 2 if any could not be read (the others are still printed)."""
    parser = argparse.ArgumentParser(prog="fluxlora inspect", description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path, help=".safetensors files or diffusers model folders")
    args = parser.parse_args(argv)
    status = 0
    for path in args.files:
        try:
            print("\n".join(describe(path)))
        except FluxLoraError as err:
            print(f"error: {err}", file=sys.stderr)
            status = 2
    return status
