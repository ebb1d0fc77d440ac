"""Load a FLUX.1 transformer: BFL single file (optionally `model.diffusion_model.`-prefixed), fp8 or 16-bit,
or diffusers format (folder, sharded folder or single file) → our `Flux` module.

Everything is decided from safetensors headers first (kind, layout, variant, width, depths) and every
key and shape is checked against the model built on the meta device, so a wrong or damaged file fails
in milliseconds with the key and file named. Only then are tensors read (memory-mapped, zero-copy
when no cast is asked for) and assigned with a strict `load_state_dict`.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fluxlora.errors import CheckpointError
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
from fluxlora.models.diffusers_keys import bfl_to_diffusers, diffusers_to_bfl
from fluxlora.models.flux import Flux, FluxParams

logger = logging.getLogger(__name__)

DEFAULT_FLAG = "--pretrained_model_name_or_path"
FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model"


@dataclass(frozen=True)
class FluxInfo:
    """What a FLUX transformer file is, from its header(s) alone."""

    variant: str  # "dev" | "schnell"
    params: FluxParams
    layout: str  # "bfl" | "diffusers"
    file_dtype: str  # safetensors dtype holding most parameters, e.g. "BF16", "F8_E4M3"
    path: Path
    files: tuple[Path, ...] = field(default=())  # the safetensors file(s) read (several for sharded diffusers)
    num_params: int = 0
    size_bytes: int = 0


@dataclass(frozen=True)
class _Plan:
    info: FluxInfo
    headers: tuple[SafetensorsHeader, ...]
    rename: dict[str, str]  # file key -> key in the layout's own namespace (prefix stripped)
    file_shapes: dict[str, tuple[int, ...]]  # renamed key -> shape, in the file's layout


def _where(flag: str | None) -> str:
    return f"{flag} " if flag else ""


def diffusers_weight_files(folder: Path, flag: str | None) -> list[Path]:
    """The weight files of a diffusers transformer folder (pipeline root or its transformer/ subfolder), any family."""
    for base in (folder / "transformer", folder):
        index = base / f"{DIFFUSERS_WEIGHTS}.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                shards = sorted(set(weight_map.values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
                raise CheckpointError(f"{_where(flag)}{index}: unreadable shard index ({err}); re-download the model",
                                      path=index, key=flag) from None
            return [check_path(base / s, flag=flag) for s in shards]
        single = base / f"{DIFFUSERS_WEIGHTS}.safetensors"
        if single.is_file():
            return [single]
        pickles = sorted(base.glob(f"{DIFFUSERS_WEIGHTS}*.bin"))
        if pickles:
            check_path(pickles[0], flag=flag)  # raises the "pickle refused, convert" error
    raise CheckpointError(
        f"{_where(flag)}{folder}: folder holds no diffusers FLUX transformer (looked for transformer/{DIFFUSERS_WEIGHTS}"
        f"*.safetensors and {DIFFUSERS_WEIGHTS}*.safetensors); pass the flux1-dev.safetensors file or the model folder",
        path=folder, key=flag,
    )


def _main_dtype(headers: tuple[SafetensorsHeader, ...]) -> str:
    counts: Counter[str] = Counter()
    for header in headers:
        counts.update(header.dtype_counts())
    return counts.most_common(1)[0][0] if counts else "F32"


def _plan(path: str | Path, flag: str | None) -> _Plan:
    path = check_path(path, flag=flag)
    if path.is_dir():
        headers = tuple(read_header(f, flag=flag) for f in diffusers_weight_files(path, flag))
        kinds = {require_kind(h, Kind.FLUX_DIFFUSERS, flag=flag) for h in headers}
    else:
        headers = (read_header(path, flag=flag),)
        kinds = {require_kind(headers[0], (Kind.FLUX, Kind.FLUX_DIFFUSERS), flag=flag)}
    layout = "diffusers" if kinds == {Kind.FLUX_DIFFUSERS} else "bfl"

    rename: dict[str, str] = {}
    file_shapes: dict[str, tuple[int, ...]] = {}
    for header in headers:
        names = strip_prefix(header.tensors) if layout == "bfl" else {k: k for k in header.tensors}
        for file_key, key in names.items():
            if key in file_shapes:
                raise CheckpointError(f"{_where(flag)}{header.path}: key {key!r} appears in two shards; re-download the model",
                                      path=header.path, key=key)
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
            raise CheckpointError(f"{_where(flag)}{path}: inconsistent diffusers weight shapes ({err}); the file is damaged",
                                  path=path, key=flag) from None
    try:
        params = FluxParams.from_shapes(bfl_shapes, path=path)
    except CheckpointError as err:
        raise CheckpointError(f"{_where(flag)}{err}", path=path, key=err.key) from None
    info = FluxInfo(
        variant=params.variant, params=params, layout=layout, file_dtype=_main_dtype(headers), path=path,
        files=tuple(h.path for h in headers), num_params=sum(h.num_params for h in headers),
        size_bytes=sum(h.file_size for h in headers),
    )
    return _Plan(info, headers, rename, file_shapes)


def inspect_flux(path: str | Path, *, flag: str | None = DEFAULT_FLAG) -> FluxInfo:
    """Variant, layout, hyper-parameters and dtype of a FLUX transformer from its header(s) only (no weights read)."""
    return _plan(path, flag).info


def _load_state(plan: _Plan, device: str | torch.device, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    keep_fp8 = dtype is None or dtype in FP8
    state: dict[str, torch.Tensor] = {}
    for header in plan.headers:
        state.update(load_tensors(header, rename=plan.rename, device=device, dtype=dtype, keep_fp8=keep_fp8))
    return diffusers_to_bfl(state) if plan.info.layout == "diffusers" else state


def load_flux(
    path: str | Path,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    flag: str = DEFAULT_FLAG,
) -> tuple[Flux, FluxInfo]:
    """Load a FLUX.1 transformer (BFL or diffusers layout) into `Flux`, strictly.

    `dtype=None` keeps the file's dtypes (fp8 stays fp8, memory-mapped without a copy); another dtype casts
    every floating tensor, except that fp8 tensors are kept when `dtype` is itself an fp8 type.
    """
    plan = _plan(path, flag)
    info = plan.info
    with torch.device("meta"):
        model = Flux(info.params)
    expected = module_shapes(model)
    what = (f"a FLUX.1-{info.variant} transformer of width {info.params.hidden_size} with {info.params.depth} double "
            f"and {info.params.depth_single_blocks} single blocks")
    if info.layout == "diffusers":
        meta = {k: torch.empty(s, device="meta") for k, s in expected.items()}
        expected = {k: tuple(v.shape) for k, v in bfl_to_diffusers(meta).items()}
    check_keys(plan.file_shapes, expected, path=path, what=what, flag=flag)

    state = _load_state(plan, device, dtype)
    model.load_state_dict(state, strict=True, assign=True)
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:  # cannot happen after a strict load; guard the invariant anyway
        raise CheckpointError(f"{_where(flag)}{path}: {leftover[0]!r} was not loaded", path=path, key=leftover[0])
    logger.info("loaded %s (%s layout, %s, %.2f B parameters) from %s", what, info.layout, info.file_dtype,
                info.num_params / 1e9, path)
    return model, info
