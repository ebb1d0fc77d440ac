"""Load a Chroma transformer: BFL/ComfyUI single file (optionally `model.diffusion_model.`-prefixed), fp8 or 16-bit,
or diffusers `ChromaTransformer2DModel` weights (folder, sharded folder or single file) → `Chroma`.

As for FLUX.1 (`fluxlora.models.flux_loading`): everything is decided from the headers, every key and shape is
checked against the model built on the meta device before a tensor is read, then a strict `load_state_dict`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fluxlora.errors import CheckpointError
from fluxlora.families.chroma.diffusers_keys import bfl_to_diffusers, diffusers_to_bfl
from fluxlora.families.chroma.model import Chroma, ChromaParams
from fluxlora.models.checkpoints import ModelKind as Kind
from fluxlora.models.checkpoints import (
    SafetensorsHeader,
    check_keys,
    check_path,
    load_tensors,
    module_shapes,
    read_header,
    require_kind,
    strip_prefix,
)
from fluxlora.models.flux_loading import diffusers_weight_files

logger = logging.getLogger(__name__)

DEFAULT_FLAG = "--pretrained_model_name_or_path"
FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


@dataclass(frozen=True)
class ChromaInfo:
    """What a Chroma transformer file is, from its header(s) alone."""

    params: ChromaParams
    layout: str  # "bfl" | "diffusers"
    file_dtype: str  # safetensors dtype holding most parameters
    path: Path
    files: tuple[Path, ...] = field(default=())
    num_params: int = 0
    size_bytes: int = 0

    @property
    def variant(self) -> str:
        return "chroma"


@dataclass(frozen=True)
class _Plan:
    info: ChromaInfo
    headers: tuple[SafetensorsHeader, ...]
    rename: dict[str, str]  # file key -> key in the layout's namespace (prefix stripped)
    file_shapes: dict[str, tuple[int, ...]]


def _where(flag: str | None) -> str:
    return f"{flag} " if flag else ""


def _main_dtype(headers: tuple[SafetensorsHeader, ...]) -> str:
    counts: dict[str, int] = {}
    for header in headers:
        for dtype, n in header.dtype_counts().items():
            counts[dtype] = counts.get(dtype, 0) + n
    return max(counts, key=counts.__getitem__) if counts else "F32"


def _plan(path: str | Path, flag: str | None) -> _Plan:
    path = check_path(path, flag=flag)
    if path.is_dir():
        headers = tuple(read_header(f, flag=flag) for f in diffusers_weight_files(path, flag))
        # shards split the keys by size, so only all of them together show the approximator beside the blocks
        union = SafetensorsHeader(path, {k: t for h in headers for k, t in h.tensors.items()}, {}, 0, 0)
        kinds = {require_kind(union, Kind.CHROMA_DIFFUSERS, flag=flag)}
    else:
        headers = (read_header(path, flag=flag),)
        kinds = {require_kind(headers[0], (Kind.CHROMA, Kind.CHROMA_DIFFUSERS), flag=flag)}
    layout = "diffusers" if kinds == {Kind.CHROMA_DIFFUSERS} else "bfl"
    rename: dict[str, str] = {}
    file_shapes: dict[str, tuple[int, ...]] = {}
    for header in headers:
        names = strip_prefix(header.tensors) if layout == "bfl" else {k: k for k in header.tensors}
        for file_key, key in names.items():
            if key in file_shapes:
                raise CheckpointError(f"{_where(flag)}{header.path}: key {key!r} appears in two shards; re-download "
                                      "the model", path=header.path, key=key)
            rename[file_key] = key
            file_shapes[key] = header.tensors[file_key].shape
    bfl_shapes = file_shapes
    if layout == "diffusers":
        meta = {k: torch.empty(s, device="meta") for k, s in file_shapes.items()}
        try:
            bfl_shapes = {k: tuple(v.shape) for k, v in diffusers_to_bfl(meta).items()}
        except CheckpointError as err:
            raise CheckpointError(f"{_where(flag)}{path}: {err}", path=path, key=err.key) from None
        except RuntimeError as err:  # torch.cat of q/k/v parts with different widths
            raise CheckpointError(f"{_where(flag)}{path}: inconsistent diffusers weight shapes ({err}); the file is "
                                  "damaged", path=path, key=flag) from None
    try:
        params = ChromaParams.from_shapes(bfl_shapes, path=path)
    except CheckpointError as err:
        raise CheckpointError(f"{_where(flag)}{err}", path=path, key=err.key) from None
    info = ChromaInfo(params=params, layout=layout, file_dtype=_main_dtype(headers), path=path,
                      files=tuple(h.path for h in headers), num_params=sum(h.num_params for h in headers),
                      size_bytes=sum(h.file_size for h in headers))
    return _Plan(info, headers, rename, file_shapes)


def inspect_chroma(path: str | Path, *, flag: str | None = DEFAULT_FLAG) -> ChromaInfo:
    """Layout, hyper-parameters and dtype of a Chroma transformer from its header(s) only (no weights read)."""
    return _plan(path, flag).info


def describe_params(p: ChromaParams) -> str:
    return (f"a Chroma transformer of width {p.hidden_size} with {p.depth} double and {p.depth_single_blocks} single "
            f"blocks and a {p.approximator_depth}-layer approximator of width {p.approximator_hidden_size}")


def load_chroma(
    path: str | Path,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    flag: str = DEFAULT_FLAG,
) -> tuple[Chroma, ChromaInfo]:
    """Load a Chroma transformer (BFL or diffusers layout) strictly.

    `dtype=None` keeps the file's dtypes (fp8 stays fp8, memory-mapped without a copy); another dtype casts every
    floating tensor, except that fp8 tensors are kept when `dtype` is itself an fp8 type.
    """
    plan = _plan(path, flag)
    info = plan.info
    with torch.device("meta"):
        model = Chroma(info.params)
    expected = module_shapes(model)
    if info.layout == "diffusers":
        meta = {k: torch.empty(s, device="meta") for k, s in expected.items()}
        expected = {k: tuple(v.shape) for k, v in bfl_to_diffusers(meta).items()}
    what = describe_params(info.params)
    check_keys(plan.file_shapes, expected, path=path, what=what, flag=flag)

    keep_fp8 = dtype is None or dtype in FP8
    state: dict[str, torch.Tensor] = {}
    for header in plan.headers:
        state.update(load_tensors(header, rename=plan.rename, device=device, dtype=dtype, keep_fp8=keep_fp8))
    if info.layout == "diffusers":
        state = diffusers_to_bfl(state)
    model.load_state_dict(state, strict=True, assign=True)
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:  # cannot happen after a strict load; guard the invariant anyway
        raise CheckpointError(f"{_where(flag)}{path}: {leftover[0]!r} was not loaded", path=path, key=leftover[0])
    logger.info("loaded %s (%s layout, %s, %.2f B parameters) from %s", what, info.layout, info.file_dtype,
                info.num_params / 1e9, path)
    return model, info
