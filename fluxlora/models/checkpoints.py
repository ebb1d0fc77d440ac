"""safetensors I/O for model files: bounded header reading, kind detection and strict key validation.

Only safetensors files are read. Everything here works from the header alone (a few KB), so a wrong,
truncated or mislabelled file is reported before any tensor is materialised.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import torch

from fluxlora.errors import CheckpointError

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the official reader's limit
MAX_TENSORS = 200_000
COMFY_PREFIX = "model.diffusion_model."

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4,
               "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


@dataclass(frozen=True)
class TensorInfo:
    dtype: str  # safetensors dtype name, e.g. "BF16"
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass(frozen=True)
class SafetensorsHeader:
    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    file_size: int
    data_start: int

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: v.shape for k, v in self.tensors.items()}

    @property
    def num_params(self) -> int:
        return sum(t.numel for t in self.tensors.values())

    def dtype_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for info in self.tensors.values():
            counts[info.dtype] = counts.get(info.dtype, 0) + info.numel
        return counts


def check_path(path: str | Path, *, flag: str | None = None) -> Path:
    """Refuse a missing path or a pickle file before anything is read."""
    path = Path(path)
    where = f"{flag} " if flag else ""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{where}{path}: pickle files ({path.suffix}) are refused because loading them can run arbitrary code; "
            "convert it to .safetensors first (e.g. safetensors.torch.save_file(torch.load(f, weights_only=True), out))",
            path=path, key=flag,
        )
    if not path.exists():
        raise CheckpointError(f"{where}{path}: file not found; check the path", path=path, key=flag)
    return path


def read_header(path: str | Path, *, flag: str | None = None) -> SafetensorsHeader:
    """Read and validate a safetensors header without touching tensor data.

    Checks the length prefix, JSON, dtype names, shapes against byte ranges, and that the file is long enough
    for every tensor (a truncated download fails here, not an hour into training).
    """
    path = check_path(path, flag=flag)
    where = f"{flag} " if flag else ""
    if path.is_dir():
        raise CheckpointError(f"{where}{path}: is a folder, expected a .safetensors file", path=path, key=flag)
    file_size = path.stat().st_size

    def bad(reason: str) -> CheckpointError:
        return CheckpointError(f"{where}{path}: not a valid safetensors file ({reason}); re-download or re-export it",
                               path=path, key=flag)

    if file_size < 8:
        raise bad(f"only {file_size} bytes")
    with open(path, "rb") as handle:
        (header_len,) = struct.unpack("<Q", handle.read(8))
        if header_len > MAX_HEADER_BYTES or header_len + 8 > file_size:
            raise bad(f"header length {header_len} does not fit a file of {file_size} bytes")
        raw = handle.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise bad(f"header is not JSON: {err}") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise bad("__metadata__ must map strings to strings")
    if len(header) > MAX_TENSORS:
        raise bad(f"{len(header)} tensors is more than the {MAX_TENSORS} accepted")
    data_start = 8 + header_len
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(int(s) for s in entry["shape"]), entry["data_offsets"]
            begin, end = int(begin), int(end)
        except (KeyError, TypeError, ValueError):
            raise bad(f"malformed entry for tensor {name!r}") from None
        if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:  # a JSON list/object here is no dtype
            raise bad(f"tensor {name!r} has unsupported dtype {dtype}")
        if any(s < 0 for s in shape) or not 0 <= begin <= end:
            raise bad(f"tensor {name!r} has an invalid shape or byte range")
        info = TensorInfo(dtype, shape, begin, end)
        if end - begin != info.numel * DTYPE_BYTES[dtype]:
            raise bad(f"tensor {name!r}: byte range does not match shape {list(shape)} and dtype {dtype}")
        tensors[name] = info
    needed = data_start + max((t.end for t in tensors.values()), default=0)
    if needed > file_size:
        raise CheckpointError(
            f"{where}{path}: file is truncated ({file_size} bytes, its header needs {needed}); "
            "the download or save was interrupted — get the file again",
            path=path, key=flag,
        )
    return SafetensorsHeader(path, tensors, {str(k): v for k, v in metadata.items()}, file_size, data_start)


class ModelKind(StrEnum):
    FLUX = "flux"  # BFL single-file transformer (optionally model.diffusion_model.-prefixed)
    FLUX_DIFFUSERS = "flux-diffusers"  # diffusers FluxTransformer2DModel weights
    CHROMA = "chroma"  # Chroma transformer, BFL/ComfyUI layout (optionally model.diffusion_model.-prefixed)
    CHROMA_DIFFUSERS = "chroma-diffusers"  # diffusers ChromaTransformer2DModel weights
    AE = "ae"  # BFL autoencoder
    CLIP_L = "clip_l"  # CLIPTextModel, ComfyUI / sd-scripts layout
    T5XXL = "t5xxl"  # T5EncoderModel, ComfyUI / sd-scripts layout
    LLM = "llm"  # a decoder-only language model (Mistral 3 / Qwen3: FLUX.2's text encoders), ComfyUI / HF layout
    LORA = "lora"
    UNKNOWN = "unknown"


KIND_DESCRIPTIONS = {
    ModelKind.FLUX: "a FLUX transformer (BFL layout)",
    ModelKind.FLUX_DIFFUSERS: "a FLUX transformer (diffusers layout)",
    ModelKind.CHROMA: "a Chroma transformer (BFL layout)",
    ModelKind.CHROMA_DIFFUSERS: "a Chroma transformer (diffusers layout)",
    ModelKind.AE: "a FLUX autoencoder (ae.safetensors)",
    ModelKind.CLIP_L: "a CLIP-L text encoder",
    ModelKind.T5XXL: "a T5-XXL text encoder",
    ModelKind.LLM: "a language-model text encoder (Mistral 3 / Qwen3)",
    ModelKind.LORA: "a LoRA",
    ModelKind.UNKNOWN: "an unrecognised model",
}


#: Keys only LyCORIS adapter files have (LoKr, LoHa, full, DoRA), under the kohya `lora_unet_` / `lora_te*_` names.
LYCORIS_KEY_ENDINGS = (".lokr_w1", ".lokr_w1_a", ".lokr_w2", ".lokr_w2_a", ".hada_w1_a", ".diff", ".dora_scale")


def detect_kind(keys: Iterable[str]) -> ModelKind:
    """What a checkpoint is, from its key names alone."""
    keys = set(keys)
    if any(k.endswith((".lora_down.weight", ".lora_A.weight", ".lora_B.weight", *LYCORIS_KEY_ENDINGS)) for k in keys):
        return ModelKind.LORA
    stripped = {k[len(COMFY_PREFIX):] if k.startswith(COMFY_PREFIX) else k for k in keys}
    if "distilled_guidance_layer.in_proj.weight" in stripped:  # Chroma's approximator, in both layouts
        bfl = "img_in.weight" in stripped or any(k.startswith(("double_blocks.", "single_blocks.")) for k in stripped)
        return ModelKind.CHROMA if bfl else ModelKind.CHROMA_DIFFUSERS
    if "double_blocks.0.img_attn.qkv.weight" in stripped or "img_in.weight" in stripped:
        return ModelKind.FLUX
    if any(k.startswith(("transformer_blocks.", "single_transformer_blocks.")) for k in keys) or "x_embedder.weight" in keys:
        return ModelKind.FLUX_DIFFUSERS
    if "encoder.conv_in.weight" in keys and "decoder.conv_in.weight" in keys:
        return ModelKind.AE
    if any(k.startswith(("text_model.encoder.layers.", "text_model.embeddings.")) for k in keys):
        return ModelKind.CLIP_L
    if any(k.startswith("encoder.block.") for k in keys) and any(".SelfAttention." in k for k in keys):
        return ModelKind.T5XXL
    if any(k.endswith("layers.0.self_attn.q_proj.weight") for k in keys) and any(
            k.endswith("embed_tokens.weight") for k in keys):
        return ModelKind.LLM
    return ModelKind.UNKNOWN


def require_kind(header: SafetensorsHeader, expected: ModelKind | tuple[ModelKind, ...], *,
                 flag: str | None) -> ModelKind:
    """Fail with a clear message when a file of another kind was given for a role (e.g. the AE as --clip_l)."""
    expected = expected if isinstance(expected, tuple) else (expected,)
    kind = detect_kind(header.tensors)
    if kind not in expected:
        want = " or ".join(KIND_DESCRIPTIONS[k] for k in expected)
        where = f"{flag} " if flag else ""
        raise CheckpointError(
            f"{where}{header.path}: this file is {KIND_DESCRIPTIONS[kind]}, but {flag or 'this role'} expects {want}; "
            "check which file you passed to which flag",
            path=header.path, key=flag,
        )
    return kind


def strip_prefix(names: Iterable[str], prefix: str = COMFY_PREFIX) -> dict[str, str]:
    """Map file key -> model key, dropping `prefix` where every key has it (ComfyUI-saved transformers)."""
    names = list(names)
    if names and all(n.startswith(prefix) for n in names):
        return {n: n[len(prefix):] for n in names}
    return {n: n for n in names}


def check_keys(
    actual: Mapping[str, tuple[int, ...]],
    expected: Mapping[str, tuple[int, ...]],
    *,
    path: str | Path,
    what: str,
    flag: str | None = None,
) -> None:
    """Strict key-set and shape check: a missing, extra or mis-shaped key is an error naming it and the file."""
    missing = sorted(set(expected) - set(actual))
    extra = sorted(set(actual) - set(expected))
    wrong = sorted(k for k in set(expected) & set(actual) if tuple(actual[k]) != tuple(expected[k]))
    if not (missing or extra or wrong):
        return
    where = f"{flag} " if flag else ""
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s), first {missing[0]!r}")
    if extra:
        parts.append(f"{len(extra)} unexpected key(s), first {extra[0]!r}")
    if wrong:
        k = wrong[0]
        parts.append(f"{len(wrong)} shape mismatch(es), first {k!r}: file {list(actual[k])} vs model {list(expected[k])}")
    raise CheckpointError(
        f"{where}{path}: does not fit {what}: " + "; ".join(parts) + " — is this the right file for this role?",
        path=path, key=flag,
    )


def load_tensors(
    header: SafetensorsHeader,
    *,
    rename: Mapping[str, str] | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    keep_fp8: bool = True,
) -> dict[str, torch.Tensor]:
    """Load every tensor (memory-mapped), renamed by `rename` (file key -> model key) and cast to `dtype`.

    fp8 tensors keep their dtype when `keep_fp8` (the model decides how to up-cast them per layer).
    """
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    with safe_open(str(header.path), framework="pt", device=str(device)) as handle:
        for name in handle.keys():  # noqa: SIM118 - safe_open is not a dict
            tensor = handle.get_tensor(name)
            if dtype is not None and tensor.is_floating_point():
                if not (keep_fp8 and tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)):
                    tensor = tensor.to(dtype)
            out[rename.get(name, name) if rename else name] = tensor
    return out


def module_shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Parameter and persistent-buffer shapes of a module (works on the meta device)."""
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}
