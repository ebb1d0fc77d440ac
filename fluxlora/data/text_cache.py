"""Text-encoder output cache: CLIP pooled + T5 states per processed caption, in memory or on disk.

Keyed by the caption the model will actually see (`captions.static_caption`: prefix/suffix and separators
applied, fixing spec §12.9), the T5 length, the attention-mask flag and the encoders' fingerprints. Identical
captions are encoded once. On disk each image gets `<stem>_flux_te.safetensors` (beside it or under
`cache_dir`), which also keeps up to `_KEEP_OTHER` earlier captions made with the same encoder settings (a
second dataset with other caption options does not evict the first).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
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

OUTPUTS = ("clip_pooled", "t5_out", "t5_mask")
_KEEP_OTHER = 8


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

    def __init__(self) -> None:
        self._entries: dict[str, dict[str, torch.Tensor] | tuple[Path, str]] = {}

    def get(self, caption: str) -> dict[str, torch.Tensor]:
        """{'clip_pooled': [P], 't5_out': [L, D], 't5_mask': [L]} for a processed caption."""
        try:
            value = self._entries[caption]
        except KeyError:
            raise KeyError(f"no cached text-encoder outputs for caption {caption!r}; was it cached?") from None
        if isinstance(value, tuple):
            path, key = value
            return {name: load_entry(path, f"{name}.{key}") for name in OUTPUTS}
        return value

    def __contains__(self, caption: str) -> bool:
        return caption in self._entries

    def __len__(self) -> int:
        return len(self._entries)


def _valid(tensors: dict[str, torch.Tensor], t5_max_length: int) -> bool:
    pooled, t5_out, mask = (tensors.get(n) for n in OUTPUTS)
    if pooled is None or t5_out is None or mask is None:
        return False
    return (
        pooled.ndim == 1 and t5_out.ndim == 2 and t5_out.shape[0] == t5_max_length
        and tuple(mask.shape) == (t5_max_length,)
        and bool(torch.isfinite(pooled.float()).all()) and bool(torch.isfinite(t5_out.float()).all())
    )


def build_text_cache(
    items: Sequence[TextItem],
    encode: Callable[[list[str]], dict[str, torch.Tensor]],
    *,
    te_fingerprint: str | Sequence[str],
    t5_max_length: int,
    apply_t5_attn_mask: bool,
    batch_size: int = 1,
    to_disk: bool = False,
    cache_dir: Path | None = None,
    progress: bool = True,
    rank: int = 0,
    world_size: int = 1,
    keep_in_memory: bool = False,
) -> tuple[TextCache, CacheStats]:
    """Encode every caption not already cached (exactly) and return the cache and what was done.

    `encode(captions)` returns {'clip_pooled': [B,P], 't5_out': [B,L,D], 't5_mask': [B,L]} with
    L = `t5_max_length`. Stats count entries: (image file, caption) pairs on disk, distinct captions in memory.
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

    stats, cache = CacheStats(), TextCache()
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
                entry = {n: cf.tensors[f"{n}.{key}"] for n in OUTPUTS if f"{n}.{key}" in cf.tensors}
                if not cf.corrupt and _valid(entry, t5_max_length):
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

    outputs: dict[str, dict[str, torch.Tensor]] = {}
    captions = list(to_encode)
    with tqdm(total=len(captions), desc="caching text encoder outputs", unit="caption", disable=not progress) as bar:
        for start in range(0, len(captions), batch_size):
            batch = captions[start : start + batch_size]
            with torch.no_grad():
                result = encode(batch)
            _check_batch(result, batch, t5_max_length, items)
            for row, caption in enumerate(batch):
                outputs[caption] = {n: result[n][row].detach().cpu().clone() for n in OUTPUTS}
            bar.update(len(batch))

    for path, missing in needed.items():
        _write(files[path], {key_of(c): (c, outputs[c]) for c in missing}, settings)

    for item in items:
        if item.caption in cache:
            continue
        if not to_disk:
            cache._entries[item.caption] = outputs[item.caption]
            continue
        path = cache_file_path(Path(item.path), TEXT_SUFFIX, cache_dir=cache_dir, root=item.root)
        key = key_of(item.caption)
        if keep_in_memory and item.caption in outputs:
            cache._entries[item.caption] = outputs[item.caption]
        elif keep_in_memory and path in files and f"t5_out.{key}" in files[path].tensors:
            cache._entries[item.caption] = {n: files[path].tensors[f"{n}.{key}"] for n in OUTPUTS}
        else:
            cache._entries[item.caption] = (path, key)
    logger.info(
        "text-encoder cache: %d reused, %d computed (%d stale, %d corrupt)",
        stats.hits, stats.computed, stats.stale, stats.corrupt,
    )
    return cache, stats


def _check_batch(result: dict[str, torch.Tensor], batch: list[str], t5_max_length: int,
                 items: Sequence[TextItem]) -> None:
    missing = [n for n in OUTPUTS if n not in result]
    if missing:
        raise CacheError(f"text encoder returned no {', '.join(missing)}")
    size = len(batch)
    t5_out, mask, pooled = result["t5_out"], result["t5_mask"], result["clip_pooled"]
    if (pooled.ndim != 2 or pooled.shape[0] != size or t5_out.ndim != 3
            or tuple(t5_out.shape[:2]) != (size, t5_max_length) or tuple(mask.shape) != (size, t5_max_length)):
        raise CacheError(
            f"text encoder returned shapes clip_pooled {tuple(pooled.shape)}, t5_out {tuple(t5_out.shape)}, "
            f"t5_mask {tuple(mask.shape)} for {size} captions at t5 length {t5_max_length}"
        )
    for row, caption in enumerate(batch):
        if not (bool(torch.isfinite(pooled[row].float()).all()) and bool(torch.isfinite(t5_out[row].float()).all())):
            where = next((str(i.path) for i in items if i.caption == caption), "?")
            raise CacheError(
                f"{where}: text encoders produced NaN/inf for caption {caption!r}; check the encoder precision",
                path=where,
            )


def _write(cf: CacheFile, new: dict[str, tuple[str, dict[str, torch.Tensor]]], settings: dict) -> None:
    """Rewrite one file with the new entries plus up to `_KEEP_OTHER` earlier captions of the same settings."""
    tensors: dict[str, torch.Tensor] = {}
    info: dict[str, dict] = {}
    kept = 0
    for key, meta in cf.info.items():
        if key in new or kept >= _KEEP_OTHER or {k: meta.get(k) for k in settings} != settings:
            continue
        names = [f"{n}.{key}" for n in OUTPUTS]
        if all(name in cf.tensors for name in names):
            tensors.update({name: cf.tensors[name] for name in names})
            info[key] = meta
            kept += 1
    for key, (caption, outputs) in new.items():
        tensors.update({f"{n}.{key}": outputs[n] for n in OUTPUTS})
        info[key] = {"caption": caption, **settings}
    write_cache_file(cf.path, tensors, info)
    cf.tensors, cf.info = tensors, info
