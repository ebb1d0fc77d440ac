"""LoRA files: save atomically with sd-scripts' `sshs_*` hashes, and read them back strictly (pickles refused).

The `ss_*` / `modelspec.*` metadata written with them is built by `fluxlora.network.metadata`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

import torch

from fluxlora.errors import CheckpointError, ConfigError
from fluxlora.files import save_safetensors

SAVE_PRECISIONS: dict[str | None, torch.dtype | None] = {
    None: None, "float": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
}


def save_dtype(precision: str | None) -> torch.dtype | None:
    """`--save_precision` name → dtype (None keeps the fp32 parameters)."""
    if precision not in SAVE_PRECISIONS:
        raise ConfigError(f"--save_precision {precision!r}: expected one of float, fp16, bf16", key="save_precision")
    return SAVE_PRECISIONS[precision]


def _addnet_hash(payload: bytes) -> str:
    """SHA-256 of the tensor data after the header (sd-scripts `addnet_hash_safetensors`)."""
    header_len = int.from_bytes(payload[:8], "little")
    return hashlib.sha256(payload[8 + header_len :]).hexdigest()


def _legacy_hash(payload: bytes) -> str:
    """First 8 hex digits of SHA-256 of the 64 KiB at offset 1 MiB (sd-scripts `addnet_hash_legacy`)."""
    return hashlib.sha256(payload[0x100000 : 0x100000 + 0x10000]).hexdigest()[:8]


def lora_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None) -> tuple[str, str]:
    """(`sshs_model_hash`, `sshs_legacy_hash`) as sd-scripts computes them (spec §5.7): on a re-serialisation whose
    metadata is only the `ss_*` keys, so later edits of user metadata (titles, thumbnails) do not change the hash."""
    from safetensors.torch import save

    ss_only = {k: v for k, v in (metadata or {}).items() if k.startswith("ss_")}
    data = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    payload = save(data, metadata=ss_only or None)
    return _addnet_hash(payload), _legacy_hash(payload)


def save_lora(path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> None:
    """Write a LoRA `.safetensors` atomically with `sshs_model_hash` / `sshs_legacy_hash` added to the metadata."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise ConfigError(f"{path}: LoRA files are saved as .safetensors only (pickle formats can run code when "
                          "loaded); use --save_model_as safetensors", path=path, key="save_model_as")
    meta = dict(metadata or {})
    meta["sshs_model_hash"], meta["sshs_legacy_hash"] = lora_hashes(tensors, meta)
    save_safetensors(path, tensors, meta)


def read_lora(path: str | Path, *, flag: str = "--network_weights") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a LoRA file (header validated first; pickles refused) → (tensors on CPU, metadata)."""
    from fluxlora.models.checkpoints import load_tensors, read_header

    header = read_header(path, flag=flag)
    if not header.tensors:
        raise CheckpointError(f"{flag} {path}: the file holds no tensors; pass a LoRA .safetensors file",
                              path=path, key=flag)
    return load_tensors(header), dict(header.metadata)
