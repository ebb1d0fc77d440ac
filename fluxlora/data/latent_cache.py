"""Latent cache: autoencoder outputs per (image content, bucket, resize/crop, flip, filter, AE), in memory or on disk.

One file per image, `<stem>_flux_latents.safetensors`, beside the image or under `cache_dir`; it can hold
entries for several buckets and both flips. Entries are validated on every build (opens, right shape, finite)
and anything wrong is recomputed and counted. Items are encoded in batches of the same bucket; with
`flip_aug` the horizontally flipped image is encoded too (a flipped latent is not the flip of a latent).
An item with a `mask` (FLUX.1 Fill) encodes its image with the mask's region blanked, keyed by both files' bytes.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from fluxlora.data.buckets import ResizePlan, plan_resize, prepare_image
from fluxlora.data.caches import (
    LATENT_SUFFIX,
    CacheFile,
    CacheStats,
    cache_file_path,
    entry_key,
    load_entry,
    owned,
    sha256_file,
    write_cache_file,
)
from fluxlora.data.images import image_size, load_image
from fluxlora.data.pairs import masked_image, prepare_control
from fluxlora.errors import CacheError, DatasetError

logger = logging.getLogger(__name__)

Size = tuple[int, int]
LATENT_DOWNSCALE = 8


@dataclass(frozen=True)
class LatentItem:
    """One image at one bucket to cache. `resized_size` overrides the cover-resize (bucket_no_upscale);
    `root` is the dataset folder, mirrored under `cache_dir`; `alpha_mask` also caches the resized alpha."""

    path: Path
    bucket: Size
    resized_size: Size | None = None
    interpolation: str | None = None
    alpha_mask: bool = False
    root: Path | None = None
    mask: Path | None = None  # encode the image with this mask's white region set to 0 (Fill's masked image)

    @property
    def key(self) -> tuple:
        """The lookup key of this item in a LatentCache: (image path, bucket), plus the mask path if any."""
        key = str(self.path), (int(self.bucket[0]), int(self.bucket[1]))
        return key if self.mask is None else (*key, str(self.mask))


def latent_key(
    image_sha256: str, bucket: Size, plan: ResizePlan, flipped: bool, interpolation: str | None, ae_fingerprint: str,
    mask_sha256: str | None = None,
) -> str:
    """The content key of one latent entry: everything that determines its values."""
    fields = dict(
        kind="latents",
        image=image_sha256,
        bucket=list(bucket),
        resized=list(plan.resized_size),
        crop=list(plan.crop_ltrb),
        flipped=bool(flipped),
        interpolation=interpolation or "auto",
        ae=ae_fingerprint,
    )
    if mask_sha256 is not None:  # absent otherwise, so keys of unmasked entries stay what they were
        fields["mask"] = mask_sha256
    return entry_key(**fields)


def _mask_key(image_sha256: str, plan: ResizePlan, interpolation: str | None) -> str:
    return entry_key(
        kind="alpha", image=image_sha256, resized=list(plan.resized_size), crop=list(plan.crop_ltrb),
        interpolation=interpolation or "auto",
    )


class LatentCache:
    """Lookups of cached latents by `LatentItem.key` (or the item itself) and flip."""

    def __init__(self) -> None:
        self._latents: dict[tuple[Hashable, bool], torch.Tensor | tuple[Path, str]] = {}
        self._masks: dict[Hashable, torch.Tensor | tuple[Path, str]] = {}

    def _put(self, item_key: Hashable, flipped: bool, value: torch.Tensor | tuple[Path, str]) -> None:
        self._latents[(item_key, flipped)] = value

    def get(self, item_key: Hashable | LatentItem, flipped: bool = False) -> torch.Tensor:
        """Latents [C, H/8, W/8] of an item (`flipped` = of its horizontally flipped image)."""
        if isinstance(item_key, LatentItem):
            item_key = item_key.key
        try:
            value = self._latents[(item_key, bool(flipped))]
        except KeyError:
            raise KeyError(f"no cached latents for {item_key} (flipped={flipped}); was it cached?") from None
        return load_entry(*value) if isinstance(value, tuple) else value

    def get_alpha_mask(self, item_key: Hashable | LatentItem, flipped: bool = False) -> torch.Tensor | None:
        """The alpha mask [1, H, W] float32 in [0, 1] at bucket size (None when not cached)."""
        if isinstance(item_key, LatentItem):
            item_key = item_key.key
        value = self._masks.get(item_key)
        if value is None:
            return None
        mask = load_entry(*value) if isinstance(value, tuple) else value
        mask = mask.float().div(255.0).unsqueeze(0)
        return mask.flip(-1) if flipped else mask

    def __contains__(self, item_key: Hashable) -> bool:
        return (item_key, False) in self._latents

    def __len__(self) -> int:
        return len(self._latents)


@dataclass
class _Job:
    item: LatentItem
    sha: str
    plan: ResizePlan
    keys: dict[bool, str]
    mask_key: str
    file: Path | None
    needs: set[bool] = field(default_factory=set)
    needs_mask: bool = False
    results: dict[str, torch.Tensor] = field(default_factory=dict)
    skipped: bool = False


def _valid(tensor: torch.Tensor, bucket: Size, channels: int) -> bool:
    expected = (channels, bucket[1] // LATENT_DOWNSCALE, bucket[0] // LATENT_DOWNSCALE)
    return (
        tensor.is_floating_point() and tuple(tensor.shape) == expected and bool(torch.isfinite(tensor).all())
    )


def _describe(items: Sequence[LatentItem], ae_fingerprint: str, flips: tuple[bool, ...], to_disk: bool,
              cache_dir: Path | None) -> list[_Job]:
    hashes: dict[Path, tuple[str, Size]] = {}
    jobs = []
    for item in items:
        path = Path(item.path)
        if path not in hashes:
            try:
                hashes[path] = (sha256_file(path), image_size(path))
            except OSError as err:
                raise DatasetError(f"{path}: cannot read image for caching ({err})", path=path) from err
        sha, size = hashes[path]
        mask_sha = None
        if item.mask is not None:
            try:
                mask_sha = sha256_file(Path(item.mask))
            except OSError as err:
                raise DatasetError(f"{item.mask}: cannot read mask for caching ({err})", path=item.mask) from err
        plan = plan_resize(size, item.bucket, random_crop=False, rng=None, resized_size=item.resized_size)
        keys = {f: latent_key(sha, item.bucket, plan, f, item.interpolation, ae_fingerprint, mask_sha)
                for f in flips}
        file = cache_file_path(path, LATENT_SUFFIX, cache_dir=cache_dir, root=item.root) if to_disk else None
        jobs.append(_Job(item, sha, plan, keys, _mask_key(sha, plan, item.interpolation), file))
    return jobs


def _check_file(cf: CacheFile, jobs: list[_Job], channels: int, stats: CacheStats) -> None:
    """Mark what each job of one file still needs, counting hits, stale and corrupt entries."""
    for job in jobs:
        for flipped, key in job.keys.items():
            name = f"latents.{key}"
            if cf.corrupt:
                stats.corrupt += 1
            elif name in cf.tensors:
                if _valid(cf.tensors[name], job.item.bucket, channels):
                    stats.hits += 1
                    continue
                stats.corrupt += 1
            elif cf.exists:
                stats.stale += 1
            job.needs.add(flipped)
        if job.item.alpha_mask:
            mask = cf.tensors.get(f"alpha.{job.mask_key}")
            bucket = job.item.bucket
            job.needs_mask = mask is None or tuple(mask.shape) != (bucket[1], bucket[0])


def build_latent_cache(
    items: Sequence[LatentItem],
    encode: Callable[[torch.Tensor], torch.Tensor],
    *,
    ae_fingerprint: str,
    batch_size: int = 1,
    to_disk: bool = False,
    cache_dir: Path | None = None,
    flip_aug: bool = False,
    progress: bool = True,
    rank: int = 0,
    world_size: int = 1,
    latent_channels: int = 16,
    on_nonfinite: str = "error",
    keep_in_memory: bool = False,
) -> tuple[LatentCache, CacheStats]:
    """Encode every item not already cached (exactly) and return the cache and what was done.

    `encode` maps pixels [B,3,H,W] float32 in [-1,1] to latents [B,C,H/8,W/8]. With `to_disk` the entries are
    read lazily from their files at lookup (set `keep_in_memory` to hold them in RAM instead). With
    `world_size > 1` (disk only) rank r encodes the cache files whose index is r mod world_size, so two ranks
    never write one file; the other ranks' entries are looked up lazily once every rank is done.
    Non-finite latents raise CacheError naming the image, or with `on_nonfinite="skip"` leave it out (counted).
    """
    if world_size > 1 and not to_disk:
        raise CacheError(
            "multi-process latent caching needs --cache_latents_to_disk (each process caches a share)",
            key="cache_latents_to_disk",
        )
    if on_nonfinite not in ("error", "skip"):
        raise ValueError(f"on_nonfinite must be 'error' or 'skip', not {on_nonfinite!r}")
    flips = (False, True) if flip_aug else (False,)
    stats, cache = CacheStats(), LatentCache()
    jobs = _describe(items, ae_fingerprint, flips, to_disk, cache_dir)

    by_file: dict[Path | None, list[_Job]] = {}
    for job in jobs:
        by_file.setdefault(job.file, []).append(job)
    files: dict[Path, CacheFile] = {}
    mine: list[_Job] = []
    if to_disk:
        for index, (path, file_jobs) in enumerate(by_file.items()):
            if not owned(index, rank, world_size):
                continue
            files[path] = CacheFile(path)
            if files[path].corrupt:
                logger.warning("latent cache %s is unreadable (%s); rebuilding it", path, files[path].error)
            _check_file(files[path], file_jobs, latent_channels, stats)
            mine.extend(file_jobs)
    else:
        for job in jobs:
            job.needs = set(flips)
            job.needs_mask = job.item.alpha_mask
        mine = jobs

    todo = [j for j in mine if j.needs or j.needs_mask]
    stats.computed = sum(len(j.needs) for j in todo)
    pending = {path: sum(1 for j in fj if j.needs or j.needs_mask) for path, fj in by_file.items()}
    by_bucket: dict[Size, list[_Job]] = {}
    for job in todo:
        by_bucket.setdefault(tuple(job.item.bucket), []).append(job)
    chunks = [group[s : s + batch_size] for _, group in sorted(by_bucket.items()) for s in range(0, len(group), batch_size)]
    with tqdm(total=len(todo), desc="caching latents", unit="img", disable=not progress) as bar:
        for chunk in chunks:  # a batch never mixes buckets
            _encode_chunk(chunk, encode, latent_channels, on_nonfinite, stats)
            bar.update(len(chunk))
            if to_disk:
                for job in chunk:
                    pending[job.file] -= 1
                    if pending[job.file] == 0:
                        _write(files[job.file], by_file[job.file], ae_fingerprint)

    for path, file_jobs in by_file.items():
        for job in file_jobs:
            if job.skipped:
                continue
            for flipped, key in job.keys.items():
                name = f"latents.{key}"
                if not to_disk or (keep_in_memory and name in job.results):
                    cache._put(job.item.key, flipped, job.results[name])
                elif keep_in_memory and path in files and name in files[path].tensors:
                    cache._put(job.item.key, flipped, files[path].tensors[name])
                else:
                    cache._put(job.item.key, flipped, (path, name))
            if job.item.alpha_mask:
                name = f"alpha.{job.mask_key}"
                cache._masks[job.item.key] = job.results[name] if not to_disk else (path, name)
    logger.info(
        "latent cache: %d reused, %d computed (%d stale, %d corrupt), %d skipped",
        stats.hits, stats.computed, stats.stale, stats.corrupt, stats.skipped,
    )
    return cache, stats


def _encode_chunk(chunk: list[_Job], encode: Callable[[torch.Tensor], torch.Tensor], channels: int,
                  on_nonfinite: str, stats: CacheStats) -> None:
    pixels: dict[int, torch.Tensor] = {}
    for i, job in enumerate(chunk):
        image = load_image(job.item.path, keep_alpha=job.item.alpha_mask)
        prepared = prepare_image(
            image, job.item.bucket, interpolation=job.item.interpolation, random_crop=False, flip=False,
            color_aug=False, rng=random.Random(0), alpha_mask=job.needs_mask, resized_size=job.plan.resized_size,
        )
        pixels[i] = prepared.pixels
        if job.item.mask is not None:
            mask = prepare_control(load_image(job.item.mask), job.plan, flipped=False,
                                   interpolation=job.item.interpolation, kind="mask")
            pixels[i] = masked_image(prepared.pixels, mask)
        if prepared.alpha_mask is not None:
            mask = prepared.alpha_mask[0].mul(255.0).round().to(torch.uint8)
            job.results[f"alpha.{job.mask_key}"] = mask
    for flipped in (False, True):
        rows = [i for i, job in enumerate(chunk) if flipped in job.needs]
        if not rows:
            continue
        batch = torch.stack([pixels[i] for i in rows])
        if flipped:
            batch = batch.flip(-1)
        with torch.no_grad():
            latents = encode(batch)
        bucket = chunk[rows[0]].item.bucket
        expected = (len(rows), channels, bucket[1] // LATENT_DOWNSCALE, bucket[0] // LATENT_DOWNSCALE)
        if tuple(latents.shape) != expected:
            raise CacheError(f"autoencoder returned latents of shape {tuple(latents.shape)}, expected {expected}")
        latents = latents.detach().cpu()
        for row, i in enumerate(rows):
            job = chunk[i]
            latent = latents[row].clone()
            if not bool(torch.isfinite(latent).all()):
                if on_nonfinite == "error":
                    raise CacheError(
                        f"{job.item.path}: autoencoder produced NaN/inf latents (flipped={flipped}); check the "
                        "image and the AE precision (--no_half_vae), or skip bad images",
                        path=job.item.path,
                    )
                if not job.skipped:
                    job.skipped = True
                    stats.skipped += 1
                    stats.skipped_paths.append(Path(job.item.path))
                    logger.warning("%s: non-finite latents; image skipped", job.item.path)
                continue
            job.results[f"latents.{job.keys[flipped]}"] = latent


def _write(cf: CacheFile, jobs: list[_Job], ae_fingerprint: str) -> None:
    """Rewrite one file: this build's entries plus earlier entries of the same image(s) made by the same AE
    (other buckets, e.g. a second dataset resolution); entries of changed images or other AEs are dropped."""
    images = {job.sha for job in jobs}
    tensors: dict[str, torch.Tensor] = {}
    info: dict[str, dict] = {}
    for name, tensor in cf.tensors.items():
        meta = cf.info.get(name)
        if meta and meta.get("image") in images and meta.get("ae") in (None, ae_fingerprint):
            tensors[name], info[name] = tensor, meta
    for job in jobs:
        if job.skipped:
            continue
        for name, tensor in job.results.items():
            tensors[name] = tensor
            info[name] = {"image": job.sha, "bucket": list(job.item.bucket), "source": Path(job.item.path).name}
            if name.startswith("latents."):
                info[name]["ae"] = ae_fingerprint
    write_cache_file(cf.path, tensors, info)
    cf.tensors, cf.info = tensors, info
