"""What a file is, from its header only, naming the model family (`fluxlora inspect`, `fluxlora.tools.model_files`).

Transformer files (and diffusers folders) are described by the family that claims them (`--model_type` chooses
one: FLUX.1 Kontext has the FLUX.1-dev layout, so only `--model_type kontext` names it); every other file (LoRA,
text encoder, autoencoder) as `fluxlora.models.inspect` describes it.
"""

from __future__ import annotations

from pathlib import Path

from fluxlora.families import resolve_family
from fluxlora.models import inspect as file_inspect
from fluxlora.models.checkpoints import KIND_DESCRIPTIONS, ModelKind, detect_kind, read_header

TRANSFORMER_KINDS = (ModelKind.FLUX, ModelKind.FLUX_DIFFUSERS, ModelKind.CHROMA, ModelKind.CHROMA_DIFFUSERS)


def describe(path: str | Path, model_type: str | None = None) -> list[str]:
    """Lines describing one file or diffusers folder, from headers only."""
    path = Path(path)
    if not path.is_dir() and model_type is None and detect_kind(read_header(path).tensors) not in TRANSFORMER_KINDS:
        return file_inspect.describe(path)
    family, info = resolve_family(path, model_type, flag="")
    headers = [read_header(f) for f in info.files]
    kind = detect_kind(k for h in headers for k in h.tensors)
    p = info.params
    lines = [str(path), f"  kind:       {kind.value} ({KIND_DESCRIPTIONS[kind]})",
             f"  family:     {family.name} ({info.title})", f"  variant:    {info.variant}",
             f"  layout:     {info.layout}",
             f"  model:      width {p.hidden_size}, {p.num_heads} heads of {p.head_dim}, {p.depth} double + "
             f"{p.depth_single_blocks} single blocks, MLP {p.mlp_hidden_dim}"]
    if len(headers) > 1:
        lines.append(f"  files:      {len(headers)} shards")
    lines += file_inspect.size_lines(headers)
    return lines

