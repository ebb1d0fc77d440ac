"""Content-keyed caches of latents and text-encoder outputs: shared parts (keys, fingerprints, files, stats).

Every cache entry is named by a SHA-256 of everything that produced it (image bytes, bucket, resize and crop,
flip, filter and autoencoder fingerprint for latents; processed caption, T5 length, mask flag and encoder
fingerprints for text), so an entry is either exactly right or absent: a changed input simply finds no entry
and is recomputed (sd-scripts' "file exists and has the keys" rule reuses stale data, spec §12.9-12.10).
Files are safetensors only (no pickle), written atomically, and one file may hold several entries (both
flips, several buckets, several captions); each entry's provenance is stored in the file's metadata.

The builders live in `latent_cache.py` and `text_cache.py` and are re-exported here.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fluxlora.errors import CacheError, FluxLoraError
from fluxlora.files import save_safetensors

logger = logging.getLogger(__name__)

CACHE_FORMAT = "fluxlora-cache-1"
"""Bumped whenever what an entry means changes; part of every key, so old files are ignored, not misread."""

LATENT_SUFFIX = "_flux_latents.safetensors"
TEXT_SUFFIX = "_flux_te.safetensors"

_HASH_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes (used for images: small, and the content must be exact)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_fingerprint(path: Path, *, samples: int = 16, sample_bytes: int = 1 << 16) -> str:
    """A cheap identity for a model file: size + safetensors header + `samples` evenly spaced byte windows.

    A full SHA-256 of a 23 GB checkpoint takes minutes on every start (sd-scripts does it, §12.26). The header
    changes with any key, shape or dtype change, and the sampled windows (first and last included) change with
    any retrained or fine-tuned weights, which alter every tensor. A single edited tensor between samples would be
    missed: pass the file through `sha256_file` instead where that matters.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        digest = hashlib.sha256(f"{CACHE_FORMAT}|size={size}|".encode())
        with open(path, "rb") as handle:
            head = handle.read(8)
            digest.update(head)
            if len(head) == 8:
                header_len = int.from_bytes(head, "little")
                if 0 < header_len <= min(size - 8, 100 << 20):  # a plausible safetensors JSON header
                    digest.update(handle.read(header_len))
            span = max(size - sample_bytes, 0)
            for i in range(samples):
                handle.seek(span * i // max(samples - 1, 1))
                digest.update(handle.read(sample_bytes))
    except OSError as err:
        raise CacheError(f"{path}: cannot read model file to fingerprint it ({err})", path=path) from err
    return "file:" + digest.hexdigest()


def tensor_fingerprint(state_dict: Mapping[str, torch.Tensor], *, max_elements: int | None = None) -> str:
    """Identity of in-memory weights: names, dtypes, shapes and bytes (all of them, or a strided sample of at most
    `max_elements` per tensor for very large models)."""
    digest = hashlib.sha256(CACHE_FORMAT.encode())
    for name in sorted(state_dict):
        tensor = state_dict[name].detach()
        digest.update(f"|{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        flat = tensor.reshape(-1)
        if max_elements is not None and flat.numel() > max_elements:
            flat = flat[:: -(-flat.numel() // max_elements)]
        raw = flat.contiguous().cpu().view(torch.uint8) if flat.numel() else flat.new_empty(0, dtype=torch.uint8)
        digest.update(raw.numpy().tobytes())
    return "tensors:" + digest.hexdigest()


def entry_key(**parts: object) -> str:
    """SHA-256 of the named parts (sorted, JSON-encoded) plus the format version."""
    payload = json.dumps({"format": CACHE_FORMAT, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


@dataclass
class CacheStats:
    """What a cache build did, counted in entries (one latent orientation, or one caption for one image file).

    `hits` were reused; `computed` were (re)encoded — this includes the `stale` ones (a file existed but had no
    entry for the current inputs) and the `corrupt` ones (unreadable file, wrong shape or non-finite values).
    `skipped` images produced non-finite latents and were left out (only with on_nonfinite="skip").
    """

    hits: int = 0
    computed: int = 0
    stale: int = 0
    corrupt: int = 0
    skipped: int = 0
    skipped_paths: list[Path] = field(default_factory=list)


def cache_file_path(image_path: Path, suffix: str, *, cache_dir: Path | None, root: Path | None) -> Path:
    """Where an image's cache file lives: beside it, or under `cache_dir` mirroring the dataset layout.

    Under `cache_dir` the file goes to `cache_dir/<root folder name>/<path below root>/<stem><suffix>` (or
    `cache_dir/<image folder name>/...` without `root`): never outside `cache_dir`, and a moved dataset folder
    keeps hitting its cache.
    """
    image_path = Path(image_path)
    name = image_path.stem + suffix
    if cache_dir is None:
        return image_path.parent / name
    folder = Path(image_path.parent.name or "_")
    if root is not None:
        try:
            folder = Path(Path(root).name or "_") / image_path.parent.relative_to(root)
        except ValueError:
            pass
    target = Path(cache_dir) / folder / name
    if ".." in target.relative_to(cache_dir).parts:  # defensive: relative_to never yields "..", keep it so
        raise CacheError(f"{image_path}: cache path {target} would leave cache_dir {cache_dir}", path=image_path)
    return target


class CacheFile:
    """One cache file read once: its entries' provenance and tensors, or why it could not be used."""

    def __init__(self, path: Path):
        self.path = path
        self.exists = path.is_file()
        self.error: str | None = None
        self.tensors: dict[str, torch.Tensor] = {}
        self.info: dict[str, dict] = {}
        if not self.exists:
            return
        try:
            from safetensors import safe_open
            from safetensors.torch import load_file

            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
            if metadata.get("format") != CACHE_FORMAT:
                self.error = f"format {metadata.get('format')!r} is not {CACHE_FORMAT!r}"
                return
            self.info = json.loads(metadata.get("entries", "{}"))
            self.tensors = load_file(str(path))
        except Exception as err:  # truncated, garbage or unreadable: never reuse, always rebuild
            self.error = f"{type(err).__name__}: {err}"
            self.tensors, self.info = {}, {}

    @property
    def corrupt(self) -> bool:
        return self.exists and self.error is not None


def write_cache_file(path: Path, tensors: Mapping[str, torch.Tensor], info: Mapping[str, dict]) -> None:
    """Atomically (temp file, fsync, rename) write entries and their provenance."""
    metadata = {"format": CACHE_FORMAT, "entries": json.dumps(dict(info), sort_keys=True)}
    try:
        save_safetensors(path, tensors, metadata)
    except FluxLoraError as err:
        raise CacheError(f"{path}: cannot write cache file ({err}); check free space and permissions", path=path) from err


def load_entry(path: Path, name: str) -> torch.Tensor:
    """Read one tensor of a cache file (lazy lookups of entries written by another rank or an earlier run)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return handle.get_tensor(name)
    except Exception as err:
        raise CacheError(
            f"{path}: cache entry {name} is missing or unreadable ({type(err).__name__}); rerun caching",
            path=path,
        ) from err


def owned(index: int, rank: int, world_size: int) -> bool:
    """Rank split for multi-process caching: work unit `index` belongs to rank `index % world_size`."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
    return index % world_size == rank


_LAZY = {
    "LatentCache": "fluxlora.data.latent_cache",
    "LatentItem": "fluxlora.data.latent_cache",
    "build_latent_cache": "fluxlora.data.latent_cache",
    "latent_key": "fluxlora.data.latent_cache",
    "TextCache": "fluxlora.data.text_cache",
    "TextItem": "fluxlora.data.text_cache",
    "build_text_cache": "fluxlora.data.text_cache",
    "text_key": "fluxlora.data.text_cache",
}


def __getattr__(name: str) -> object:
    # The builders import this module; re-exporting them lazily avoids an import cycle.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CACHE_FORMAT",
    "CacheStats",
    "cache_file_path",
    "file_fingerprint",
    "sha256_file",
    "tensor_fingerprint",
    *_LAZY,
]
