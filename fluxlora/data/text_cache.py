"""Text-encoder output cache: a model family's text outputs (FLUX.1: CLIP pooled + T5 states and mask) per
processed caption, in memory or on disk.

Keyed by the caption the model will actually see (`captions.static_caption`: prefix/suffix and separators
applied, fixing spec §12.9), the T5 length, the attention-mask flag and the encoders' fingerprints. Identical
captions are encoded once. On disk each image gets `<stem>_flux_te.safetensors` (beside it or under
`cache_dir`), which also keeps up to `_KEEP_OTHER` earlier captions made with the same encoder settings (a
second dataset with other caption options does not evict the first).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from fluxlora.data.caches import (
    TEXT_SUFFIX,
    CacheFile,
    CacheStats,
    cache_file_path,
    entry_key,
    load_entry,
    owned,
    write_cache_file,
)
from fluxlora.errors import CacheError

logger = logging.getLogger(__name__)

_KEEP_OTHER = 8
OutputKinds = Mapping[str, str]  # output name -> "vector" | "sequence" | "mask" (a family's `text_outputs`)


@dataclass(frozen=True)
class TextItem:
    """One image's processed caption. `root` is the dataset folder, mirrored under `cache_dir`."""

    path: Path
    caption: str
    root: Path | None = None


def _fingerprint_text(te_fingerprint: str | Sequence[str]) -> str:
    return te_fingerprint if isinstance(te_fingerprint, str) else "+".join(te_fingerprint)


def text_key(caption: str, *, t5_max_length: int, apply_t5_attn_mask: bool, te_fingerprint: str | Sequence[str]) -> str:
    """The content key of one text entry."""
    return entry_key(
        kind="text", caption=caption, t5_max_length=int(t5_max_length), apply_t5_attn_mask=bool(apply_t5_attn_mask),
        te=_fingerprint_text(te_fingerprint),
    )


class TextCache:
    """Lookups of cached encoder outputs by caption text."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = tuple(names)
        self._entries: dict[str, dict[str, torch.Tensor] | tuple[Path, str]] = {}

    def get(self, caption: str) -> dict[str, torch.Tensor]:
        """The outputs of a processed caption (FLUX.1: {'clip_pooled': [P], 't5_out': [L, D], 't5_mask': [L]})."""
        try:
            value = self._entries[caption]
        except KeyError:
            raise KeyError(f"no cached text-encoder outputs for caption {caption!r}; was it cached?") from None
        if isinstance(value, tuple):
            path, key = value
            return {name: load_entry(path, f"{name}.{key}") for name in self.names}
        return value

    def __contains__(self, caption: str) -> bool:
        return caption in self._entries

    def __len__(self) -> int:
        return len(self._entries)


def _shape_ok(kind: str, tensor: torch.Tensor, length: int) -> bool:
    if kind == "vector":
        return tensor.ndim == 1
    if kind == "sequence":
        return tensor.ndim == 2 and tensor.shape[0] == length
    return tuple(tensor.shape) == (length,)


def _valid(tensors: dict[str, torch.Tensor], kinds: OutputKinds, length: int) -> bool:
    """Every output present, of its kind's shape at this text length, and finite."""
    for name, kind in kinds.items():
        tensor = tensors.get(name)
        if tensor is None or not _shape_ok(kind, tensor, length):
            return False
        if kind != "mask" and not bool(torch.isfinite(tensor.float()).all()):
            return False
    return True


def build_text_cache(
    items: Sequence[TextItem],
    encode: Callable[[list[str]], dict[str, torch.Tensor]],
    *,
    te_fingerprint: str | Sequence[str],
    t5_max_length: int,
    apply_t5_attn_mask: bool,
    outputs: OutputKinds,
    batch_size: int = 1,
    to_disk: bool = False,
    cache_dir: Path | None = None,
    progress: bool = True,
    rank: int = 0,
    world_size: int = 1,
    keep_in_memory: bool = False,
) -> tuple[TextCache, CacheStats]:
    """Encode every caption not already cached (exactly) and return the cache and what was done.

    `encode(captions)` returns the `outputs` (name -> kind, the family's text outputs; FLUX.1: {'clip_pooled':
    [B,P], 't5_out': [B,L,D], 't5_mask': [B,L]}) with L = `t5_max_length` (the text length). Stats count entries: (image file, caption) pairs on disk, distinct captions in memory.
    With `world_size > 1` (disk only) rank r handles the files whose index is r mod world_size.
    """
    if world_size > 1 and not to_disk:
        raise CacheError(
            "multi-process text-encoder caching needs --cache_text_encoder_outputs_to_disk",
            key="cache_text_encoder_outputs_to_disk",
        )
    settings = {"t5_max_length": int(t5_max_length), "mask": bool(apply_t5_attn_mask),
                "te": _fingerprint_text(te_fingerprint)}

    def key_of(caption: str) -> str:
        return text_key(caption, t5_max_length=t5_max_length, apply_t5_attn_mask=apply_t5_attn_mask,
                        te_fingerprint=te_fingerprint)

    kinds = dict(outputs)
    names = tuple(kinds)
    stats, cache = CacheStats(), TextCache(names)
    by_file: dict[Path, list[TextItem]] = {}
    files: dict[Path, CacheFile] = {}
    needed: dict[Path, set[str]] = {}  # file -> captions it lacks
    to_encode: dict[str, None] = {}  # ordered set
    if to_disk:
        for item in items:
            path = cache_file_path(Path(item.path), TEXT_SUFFIX, cache_dir=cache_dir, root=item.root)
            by_file.setdefault(path, []).append(item)
        for index, (path, file_items) in enumerate(by_file.items()):
            if not owned(index, rank, world_size):
                continue
            cf = files[path] = CacheFile(path)
            if cf.corrupt:
                logger.warning("text cache %s is unreadable (%s); rebuilding it", path, cf.error)
            for caption in dict.fromkeys(i.caption for i in file_items):
                key = key_of(caption)
                entry = {n: cf.tensors[f"{n}.{key}"] for n in names if f"{n}.{key}" in cf.tensors}
                if not cf.corrupt and _valid(entry, kinds, t5_max_length):
                    stats.hits += 1
                    continue
                if cf.corrupt or entry:
                    stats.corrupt += 1
                elif cf.exists:
                    stats.stale += 1
                needed.setdefault(path, set()).add(caption)
                to_encode[caption] = None
    else:
        for item in items:
            to_encode[item.caption] = None
    stats.computed = sum(len(c) for c in needed.values()) if to_disk else len(to_encode)

    encoded: dict[str, dict[str, torch.Tensor]] = {}
    captions = list(to_encode)
    with tqdm(total=len(captions), desc="caching text encoder outputs", unit="caption", disable=not progress) as bar:
        for start in range(0, len(captions), batch_size):
            batch = captions[start : start + batch_size]
            with torch.no_grad():
                result = encode(batch)
            _check_batch(result, batch, kinds, t5_max_length, items)
            for row, caption in enumerate(batch):
                encoded[caption] = {n: result[n][row].detach().cpu().clone() for n in names}
            bar.update(len(batch))

    for path, missing in needed.items():
        _write(files[path], {key_of(c): (c, encoded[c]) for c in missing}, settings, names)

    for item in items:
        if item.caption in cache:
            continue
        if not to_disk:
            cache._entries[item.caption] = encoded[item.caption]
            continue
        path = cache_file_path(Path(item.path), TEXT_SUFFIX, cache_dir=cache_dir, root=item.root)
        key = key_of(item.caption)
        if keep_in_memory and item.caption in encoded:
            cache._entries[item.caption] = encoded[item.caption]
        elif keep_in_memory and path in files and f"{names[0]}.{key}" in files[path].tensors:
            cache._entries[item.caption] = {n: files[path].tensors[f"{n}.{key}"] for n in names}
        else:
            cache._entries[item.caption] = (path, key)
    logger.info(
        "text-encoder cache: %d reused, %d computed (%d stale, %d corrupt)",
        stats.hits, stats.computed, stats.stale, stats.corrupt,
    )
    return cache, stats


def _check_batch(result: dict[str, torch.Tensor], batch: list[str], kinds: OutputKinds, length: int,
                 items: Sequence[TextItem]) -> None:
    missing = [n for n in kinds if n not in result]
    if missing:
        raise CacheError(f"text encoder returned no {', '.join(missing)}")
    size = len(batch)
    for name, kind in kinds.items():
        tensor = result[name]
        if tensor.shape[0] != size or not _shape_ok(kind, tensor[0], length):
            raise CacheError(f"text encoder returned {name} of shape {tuple(tensor.shape)} for {size} captions at "
                             f"text length {length}")
    for row, caption in enumerate(batch):
        if not all(bool(torch.isfinite(result[n][row].float()).all()) for n, k in kinds.items() if k != "mask"):
            where = next((str(i.path) for i in items if i.caption == caption), "?")
            raise CacheError(
                f"{where}: text encoders produced NaN/inf for caption {caption!r}; check the encoder precision",
                path=where,
            )


def _write(cf: CacheFile, new: dict[str, tuple[str, dict[str, torch.Tensor]]], settings: dict,
           names: Sequence[str]) -> None:
    """Rewrite one file with the new entries plus up to `_KEEP_OTHER` earlier captions of the same settings."""
    tensors: dict[str, torch.Tensor] = {}
    info: dict[str, dict] = {}
    kept = 0
    for key, meta in cf.info.items():
        if key in new or kept >= _KEEP_OTHER or {k: meta.get(k) for k in settings} != settings:
            continue
        entry = [f"{n}.{key}" for n in names]
        if all(name in cf.tensors for name in entry):
            tensors.update({name: cf.tensors[name] for name in entry})
            info[key] = meta
            kept += 1
    for key, (caption, outputs) in new.items():
        tensors.update({f"{n}.{key}": outputs[n] for n in names})
        info[key] = {"caption": caption, **settings}
    write_cache_file(cf.path, tensors, info)
    cf.tensors, cf.info = tensors, info
