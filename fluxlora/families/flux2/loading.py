"""Load a FLUX.2 transformer: BFL single file (`flux2-dev.safetensors`, `flux-2-klein-4b.safetensors`, optionally
`model.diffusion_model.`-prefixed as ComfyUI saves it), fp8 or 16-bit, or a diffusers folder / file → `Flux2`.

Everything is decided from safetensors headers first (layout, width, depths, guidance, dev vs klein 4B / 9B) and every
key and shape is checked against the model built on the meta device, so a wrong file (a FLUX.1 transformer, a text
encoder, a scaled-fp8 ComfyUI file) fails in milliseconds with the file named. Only then are tensors read, memory-
mapped (the page cache streams them; no second copy unless a cast is asked for).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from fluxlora.errors import CheckpointError
from fluxlora.families.flux2.keys import bfl_to_diffusers, diffusers_to_bfl
from fluxlora.families.flux2.model import Flux2
from fluxlora.families.flux2.params import (
    FLUX2_DIFFUSERS_MARKER,
    FLUX2_MARKER,
    Flux2Params,
    resolve_model_version,
)
from fluxlora.models.checkpoints import (
    COMFY_PREFIX,
    KIND_DESCRIPTIONS,
    SafetensorsHeader,
    check_keys,
    check_path,
    detect_kind,
    load_tensors,
    module_shapes,
    read_header,
    strip_prefix,
)
from fluxlora.models.fp8 import FP8_DTYPES, upcast_fp8_linears

logger = logging.getLogger(__name__)

DEFAULT_FLAG = "--pretrained_model_name_or_path"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model"
VERSION_KEY = "fluxlora.model_version"  # safetensors metadata naming the --model_version of a file we wrote
# Keys of ComfyUI's scaled / mixed-precision fp8 files: per-tensor scales that a plain fp8 load would ignore.
_SCALED_FP8_SUFFIXES = (".weight_scale", ".input_scale", ".scale_weight", ".comfy_quant")


@dataclass(frozen=True)
class Flux2Info:
    """What a FLUX.2 transformer file is, from its header(s) alone."""

    architecture: str  # "dev" | "klein-4b" | "klein-9b" | "custom"
    base: bool  # klein base (undistilled, for training) rather than the step-distilled klein
    params: Flux2Params
    layout: str  # "bfl" | "diffusers"
    file_dtype: str
    path: Path
    files: tuple[Path, ...]
    num_params: int
    size_bytes: int

    @property
    def model_version(self) -> str:
        """musubi-tuner's `--model_version` spelling of this file."""
        if self.architecture.startswith("klein") and self.base:
            return self.architecture.replace("klein-", "klein-base-")
        return self.architecture


def is_flux2_keys(keys) -> bool:
    """True for FLUX.2 transformer keys in either layout (the shared single-stream modulation is FLUX.2's alone)."""
    return any(k.endswith((FLUX2_MARKER, FLUX2_DIFFUSERS_MARKER)) for k in keys)


def _where(flag: str | None) -> str:
    return f"{flag} " if flag else ""


def _diffusers_files(folder: Path, flag: str | None) -> list[Path]:
    for base in (folder / "transformer", folder):
        index = base / f"{DIFFUSERS_WEIGHTS}.safetensors.index.json"
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
                raise CheckpointError(f"{_where(flag)}{index}: unreadable shard index ({err}); re-download the model",
                                      path=index, key=flag) from None
            return [check_path(base / s, flag=flag) for s in shards]
        if (base / f"{DIFFUSERS_WEIGHTS}.safetensors").is_file():
            return [base / f"{DIFFUSERS_WEIGHTS}.safetensors"]
    raise CheckpointError(f"{_where(flag)}{folder}: folder holds no diffusers FLUX.2 transformer (looked for "
                          f"transformer/{DIFFUSERS_WEIGHTS}*.safetensors); pass the BFL .safetensors file or the model "
                          "folder", path=folder, key=flag)


def _require_flux2(header: SafetensorsHeader, flag: str | None) -> None:
    keys = header.tensors
    if is_flux2_keys(keys):
        scaled = next((k for k in keys if k.endswith(_SCALED_FP8_SUFFIXES)), None)
        if scaled is not None:
            raise CheckpointError(f"{_where(flag)}{header.path}: a ComfyUI scaled / mixed fp8 file ({scaled!r}) is "
                                  "not supported; use the BF16 file or BFL's plain fp8 file", path=header.path,
                                  key=flag)
        return
    kind = detect_kind(keys)
    what = "a FLUX.1 transformer" if kind.value.startswith("flux") else KIND_DESCRIPTIONS[kind]
    raise CheckpointError(f"{_where(flag)}{header.path}: this file is {what}, not a FLUX.2 transformer; pass "
                          "flux2-dev.safetensors or a FLUX.2 klein file", path=header.path, key=flag)


@dataclass(frozen=True)
class _Plan:
    info: Flux2Info
    headers: tuple[SafetensorsHeader, ...]
    rename: dict[str, str]  # file key -> key in the layout's namespace (prefix stripped)
    file_shapes: dict[str, tuple[int, ...]]


def _plan(path: str | Path, flag: str | None, model_version: str | None) -> _Plan:
    path = check_path(path, flag=flag)
    files = _diffusers_files(path, flag) if path.is_dir() else [path]
    headers = tuple(read_header(f, flag=flag) for f in files)
    for header in headers:
        _require_flux2(header, flag)
    layout = "diffusers" if any(FLUX2_DIFFUSERS_MARKER in h.tensors for h in headers) or path.is_dir() else "bfl"
    rename: dict[str, str] = {}
    file_shapes: dict[str, tuple[int, ...]] = {}
    for header in headers:
        names = strip_prefix(header.tensors, COMFY_PREFIX) if layout == "bfl" else {k: k for k in header.tensors}
        for file_key, key in names.items():
            if key in file_shapes:
                raise CheckpointError(f"{_where(flag)}{header.path}: key {key!r} appears twice; re-download the model",
                                      path=header.path, key=key)
            rename[file_key] = key
            file_shapes[key] = header.tensors[file_key].shape
    bfl_shapes = file_shapes
    if layout == "diffusers":
        try:
            meta = diffusers_to_bfl({k: torch.empty(s, device="meta") for k, s in file_shapes.items()})
        except CheckpointError as err:
            raise CheckpointError(f"{_where(flag)}{path}: {err}", path=path, key=err.key) from None
        except RuntimeError as err:
            raise CheckpointError(f"{_where(flag)}{path}: inconsistent diffusers weight shapes ({err}); the file is "
                                  "damaged", path=path, key=flag) from None
        bfl_shapes = {k: tuple(v.shape) for k, v in meta.items()}
    try:
        params = Flux2Params.from_shapes(bfl_shapes, path=path)
    except CheckpointError as err:
        raise CheckpointError(f"{_where(flag)}{err}", path=path, key=err.key) from None
    if model_version is None:  # files we write (tiny, converted) name their version; BFL's do not
        model_version = next((h.metadata[VERSION_KEY] for h in headers if VERSION_KEY in h.metadata), None)
    architecture, base = resolve_model_version(params, model_version, path=path)
    counts: Counter[str] = Counter()
    for header in headers:
        counts.update(header.dtype_counts())
    info = Flux2Info(architecture=architecture, base=base, params=params, layout=layout,
                     file_dtype=counts.most_common(1)[0][0] if counts else "F32", path=path,
                     files=tuple(h.path for h in headers), num_params=sum(h.num_params for h in headers),
                     size_bytes=sum(h.file_size for h in headers))
    return _Plan(info, headers, rename, file_shapes)


def inspect_flux2(path: str | Path, *, model_version: str | None = None, flag: str | None = DEFAULT_FLAG) -> Flux2Info:
    """Architecture, base/distilled, layout, hyper-parameters and dtype from the header(s) only (no weights read)."""
    return _plan(path, flag, model_version).info


def load_flux2(path: str | Path, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
               model_version: str | None = None, flag: str = DEFAULT_FLAG) -> tuple[Flux2, Flux2Info]:
    """Load a FLUX.2 transformer (BFL or diffusers layout) into `Flux2`, strictly.

    `dtype=None` keeps the file's dtypes (fp8 stays fp8 and is up-cast per call); another dtype casts every floating
    tensor, except that fp8 tensors are kept when `dtype` is itself fp8.
    """
    plan = _plan(path, flag, model_version)
    info = plan.info
    with torch.device("meta"):
        model = Flux2(info.params)
    expected = module_shapes(model)
    if info.layout == "diffusers":
        expected = {k: tuple(v.shape) for k, v in
                    bfl_to_diffusers({k: torch.empty(s, device="meta") for k, s in expected.items()}).items()}
    p = info.params
    what = (f"a FLUX.2 {info.architecture} transformer of width {p.hidden_size} with {p.depth} double and "
            f"{p.depth_single_blocks} single blocks")
    check_keys(plan.file_shapes, expected, path=path, what=what, flag=flag)

    keep_fp8 = dtype is None or dtype in FP8_DTYPES
    state: dict[str, torch.Tensor] = {}
    for header in plan.headers:
        state.update(load_tensors(header, rename=plan.rename, device=device, dtype=dtype, keep_fp8=keep_fp8))
    if info.layout == "diffusers":
        state = diffusers_to_bfl(state)
    model.load_state_dict(state, strict=True, assign=True)
    fp8 = upcast_fp8_linears(model)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:  # cannot happen after a strict load; guard the invariant anyway
        raise CheckpointError(f"{_where(flag)}{path}: {left[0]!r} was not loaded", path=path, key=left[0])
    logger.info("loaded %s (%s layout, %s, %d fp8 Linear layers, %.2f B parameters) from %s", what, info.layout,
                info.file_dtype, fp8, info.num_params / 1e9, path)
    return model, info
