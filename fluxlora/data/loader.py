"""The torch DataLoader over pre-built batches: one item is one whole batch (like sd-scripts' batch_size=1).

The sampler runs in the main process and yields the epoch's `BatchSpec`s themselves, so workers build batches
from (spec, position) alone: every random choice comes from `sample_rng(seed, epoch, batch, position)`, and
the epoch/step used by caption dropout and token warm-up are computed from the batch's own index (fixing
spec §12.15, where a lagging counter shifted them). The result is identical with 0 or N workers and after a
mid-epoch resume (`start_batch` skips batches without loading them).
"""

from __future__ import annotations

import math
import os
from collections.abc import Hashable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from fluxlora.data.buckets import apply_plan, plan_resize, prepare_image, resolve_interpolation
from fluxlora.data.captions import process_caption
from fluxlora.data.datasets import BatchSpec, Split, TrainingData, sample_rng
from fluxlora.data.images import load_image
from fluxlora.data.pairs import masked_image, prepare_control


class LatentSource(Protocol):
    """`fluxlora.data.latent_cache.LatentCache`: keyed by (image path, bucket), as `ImageEntry.latent_key`."""

    def get(self, item_key: Hashable, flipped: bool = False) -> torch.Tensor: ...

    def get_alpha_mask(self, item_key: Hashable, flipped: bool = False) -> torch.Tensor | None: ...


class TextSource(Protocol):
    """`fluxlora.data.text_cache.TextCache`: keyed by the processed (static) caption."""

    def get(self, caption: str) -> dict[str, torch.Tensor]: ...


@dataclass(frozen=True)
class StepClock:
    """Global optimizer step of a batch from its position: steps of earlier epochs + index // accumulation.

    With several processes each sees every `num_processes`-th batch, so an optimizer step spans
    `num_processes * gradient_accumulation_steps` batches of the epoch list.
    """

    num_batches_per_epoch: int
    gradient_accumulation_steps: int = 1
    num_processes: int = 1

    @property
    def steps_per_epoch(self) -> int:
        per_process = math.ceil(self.num_batches_per_epoch / self.num_processes)
        return math.ceil(per_process / self.gradient_accumulation_steps)

    def step(self, epoch: int, batch_index: int) -> int:
        within = (batch_index // self.num_processes) // self.gradient_accumulation_steps
        return max(epoch - 1, 0) * self.steps_per_epoch + within


class EpochSampler(Sampler[BatchSpec]):
    """Yields the batch specs of the current epoch from `start_batch` on; `set_epoch` moves it on (the same
    DataLoader, and so persistent workers, serve every epoch).

    With `num_processes` > 1, process p takes batches p, p + n, p + 2n, ... of the epoch list, padded by
    wrapping around so every process gets the same count (a short rank would stall DDP).
    """

    def __init__(self, data: TrainingData, seed: int, split: Split = "train", *, num_processes: int = 1,
                 process_index: int = 0) -> None:
        if not 0 <= process_index < num_processes:
            raise ValueError(f"process_index {process_index} is outside 0..{num_processes - 1}")
        self.data, self.seed, self.split = data, seed, split
        self.num_processes, self.process_index = num_processes, process_index
        self.epoch, self.start_batch = 1, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def batches(self) -> list[BatchSpec]:
        if self.split == "validation":
            return self.data.validation_batches()
        return self.data.epoch_batches(self.seed, self.epoch)

    def _mine(self, batches: list[BatchSpec]) -> list[BatchSpec]:
        n = self.num_processes
        if n > 1 and self.split == "validation":  # no padding: a duplicate would count twice in the mean
            return batches[self.process_index :: n]
        if n > 1 and batches:
            padded = batches + batches[: (-len(batches)) % n]
            batches = padded[self.process_index :: n]
            return batches[math.ceil(self.start_batch / n) :]
        return batches[self.start_batch :]

    def __iter__(self) -> Iterator[BatchSpec]:
        yield from self._mine(self.batches())

    def __len__(self) -> int:
        n = self.num_processes
        if self.split == "validation":
            return len(self.data.validation_batches()[self.process_index :: n])
        total = self.data.num_batches_per_epoch
        return max(math.ceil(total / n) - math.ceil(self.start_batch / n), 0)


class BatchDataset(Dataset):
    """Map-style dataset indexed by `BatchSpec`: `dataset[spec]` is the batch dict the trainer consumes."""

    def __init__(
        self,
        data: TrainingData,
        *,
        seed: int,
        split: Split = "train",
        latent_cache: LatentSource | None = None,
        text_cache: TextSource | None = None,
        clock: StepClock | None = None,
        max_train_steps: int = 0,
    ) -> None:
        self.datasets = data.split_datasets(split)
        self.control_kind = data.control_kind
        self.seed, self.split = seed, split
        self.latent_cache, self.text_cache = latent_cache, text_cache
        self.clock = clock or StepClock(data.num_batches_per_epoch)
        self.max_train_steps = max_train_steps

    def __len__(self) -> int:  # indices are specs, not integers; the sampler decides what is served
        return sum(d.num_batches for d in self.datasets)

    def __getitem__(self, spec: BatchSpec) -> dict[str, Any]:
        # Validation batches carry epoch 0 (fixed random choices); their captions are processed as epoch 1.
        caption_epoch = spec.epoch if spec.epoch >= 1 else 1
        step = self.clock.step(spec.epoch, spec.index) if self.split == "train" else 0
        samples = [self._sample(spec, pos, caption_epoch, step) for pos in range(len(spec.entries))]
        batch = collate_batch(samples)
        batch.update(bucket=spec.bucket, epoch=spec.epoch, batch_index=spec.index, step=step)
        return batch

    def _sample(self, spec: BatchSpec, pos: int, caption_epoch: int, step: int) -> dict[str, Any]:
        dataset = self.datasets[spec.dataset]
        entry = dataset.entries[spec.entries[pos]]
        subset = dataset.config.subsets[entry.subset]
        caption = process_caption(
            entry.caption, dataset.caption_options[entry.subset],
            rng=sample_rng(self.seed, spec.epoch, spec.index, pos, "caption"),
            epoch=caption_epoch, step=step, max_train_steps=self.max_train_steps,
        )
        rng = sample_rng(self.seed, spec.epoch, spec.index, pos, "image")
        flipped = subset.flip_aug and rng.random() < 0.5
        out: dict[str, Any] = {
            "caption": caption, "image_path": entry.key, "loss_weight": entry.loss_weight,
            "dop": subset.diff_output_preservation, "alpha_mask": None,
        }
        if self.latent_cache is not None:
            out["latents"] = self.latent_cache.get(entry.latent_key, flipped)
            if subset.alpha_mask:
                mask = self.latent_cache.get_alpha_mask(entry.latent_key, flipped)
                out["alpha_mask"] = mask if mask is not None else _mask_only(
                    entry.path, entry.bucket, entry.resized_size, entry.size, subset.resize_interpolation, flipped)
            if entry.control is not None:
                out.update(self._cached_control(entry, subset.resize_interpolation, flipped))
        else:
            img = load_image(entry.path, keep_alpha=subset.alpha_mask)
            # A header size that disagrees with the pixels (stale metadata image_size) must not distort.
            resized = entry.resized_size if img.size == entry.size else None
            prepared = prepare_image(
                img, entry.bucket, interpolation=subset.resize_interpolation, random_crop=subset.random_crop,
                flip=flipped, color_aug=subset.color_aug, rng=rng, alpha_mask=subset.alpha_mask,
                resized_size=resized,
            )
            out["image"] = prepared.pixels
            out["alpha_mask"] = prepared.alpha_mask
            if entry.control is not None:
                control = prepare_control(load_image(entry.control), prepared.plan, flipped=prepared.flipped,
                                          interpolation=subset.resize_interpolation, kind=self.control_kind)
                if self.control_kind == "reference":
                    out["control_image"] = control
                else:
                    out["mask"], out["masked_image"] = control, masked_image(prepared.pixels, control)
        if self.text_cache is not None:
            out["text"] = self.text_cache.get(caption)
        return out


    def _cached_control(self, entry: Any, interpolation: str | None, flipped: bool) -> dict[str, torch.Tensor]:
        """A cached sample's pair: its reference image's latents, or its mask and its masked image's latents."""
        if self.control_kind == "reference":
            return {"control_latents": self.latent_cache.get(entry.control_latent_key, flipped)}
        plan = plan_resize(entry.size, entry.bucket, random_crop=False, rng=None, resized_size=entry.resized_size)
        mask = prepare_control(load_image(entry.control), plan, flipped=flipped, interpolation=interpolation,
                               kind="mask")
        return {"mask": mask, "masked_latents": self.latent_cache.get(entry.masked_latent_key, flipped)}


def _mask_only(path: Any, bucket: tuple[int, int], resized: tuple[int, int], size: tuple[int, int],
               interpolation: str | None, flipped: bool) -> torch.Tensor:
    """The alpha mask of a cached-latent sample: same centre crop and flip as the cached latent."""
    img = load_image(path, keep_alpha=True)
    alpha = img.alpha if img.alpha is not None else np.full(img.rgb.shape[:2], 255, np.uint8)
    plan = plan_resize(img.size, bucket, random_crop=False, rng=None,
                       resized_size=resized if img.size == size else None)
    mask = apply_plan(alpha, plan, resolve_interpolation(interpolation, img.size, plan.resized_size))
    if flipped:
        mask = mask[:, ::-1]
    return torch.from_numpy(np.ascontiguousarray(mask)).float().div_(255.0).unsqueeze(0)


def _pad_stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Stack along a new batch axis, zero-padding the first axis to the longest (variable T5 lengths)."""
    longest = max(t.shape[0] for t in tensors)
    padded = [torch.nn.functional.pad(t, (0, 0) * (t.dim() - 1) + (0, longest - t.shape[0])) for t in tensors]
    return torch.stack(padded)


def collate_batch(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """One batch dict from per-sample dicts.

    Keys: `captions` list[str], `image_paths` list[str], `loss_weights` float32 [B], `dop` bool [B];
    `images` [B,3,H,W] in [-1,1] or `latents` [B,16,h,w]; `alpha_masks` [B,1,H,W] (ones for samples without
    a mask) or None; `text` the family's text outputs (FLUX.1: clip_pooled [B,768], t5_out [B,L,4096], t5_mask
    [B,L]), sequences padded to the longest L. With pairs: `control_images` [B,3,H,W] or `control_latents`
    [B,16,h,w] (reference images), or `masks` [B,1,H,W] (0/1) with `masked_images` [B,3,H,W] or `masked_latents`
    [B,16,h,w] (masks).
    """
    batch: dict[str, Any] = {
        "captions": [s["caption"] for s in samples],
        "image_paths": [s["image_path"] for s in samples],
        "loss_weights": torch.tensor([s["loss_weight"] for s in samples], dtype=torch.float32),
        "dop": torch.tensor([s["dop"] for s in samples], dtype=torch.bool),
    }
    for key, out_key in (("image", "images"), ("latents", "latents"), ("control_image", "control_images"),
                         ("control_latents", "control_latents"), ("mask", "masks"), ("masked_image", "masked_images"),
                         ("masked_latents", "masked_latents")):
        if key in samples[0]:
            batch[out_key] = torch.stack([s[key] for s in samples])
    masks = [s["alpha_mask"] for s in samples]
    if any(m is not None for m in masks):
        shape = next(m for m in masks if m is not None).shape
        batch["alpha_masks"] = torch.stack([m if m is not None else torch.ones(shape) for m in masks])
    else:
        batch["alpha_masks"] = None
    if "text" in samples[0]:
        texts = [s["text"] for s in samples]
        # the model family's text outputs: sequences [L, D] and masks [L] padded to the longest L (vectors [D]
        # all have one length, so padding stacks them)
        batch["text"] = {name: _pad_stack([t[name] for t in texts]) for name in texts[0]}
    return batch


def _as_is(batch: dict[str, Any]) -> dict[str, Any]:
    return batch


def make_dataloader(
    data: TrainingData,
    epoch: int,
    *,
    seed: int,
    num_workers: int = 0,
    persistent_workers: bool = False,
    start_batch: int = 0,
    split: Split = "train",
    latent_cache: LatentSource | None = None,
    text_cache: TextSource | None = None,
    gradient_accumulation_steps: int = 1,
    num_processes: int = 1,
    process_index: int = 0,
    max_train_steps: int = 0,
) -> DataLoader:
    """A DataLoader yielding whole batches of 1-based `epoch`, from batch `start_batch` on.

    `start_batch` counts batches of the whole epoch list (all processes). With several processes pass
    `num_processes`/`process_index` and do not let accelerate re-shard this loader (it is already sharded).
    `num_workers` is capped by the CPU count (sd-scripts' `--max_data_loader_n_workers`); with
    `persistent_workers` keep the loader and call `set_epoch(loader, epoch)` for the next epoch.
    `max_train_steps` converts a fractional `token_warmup_step` into steps.
    """
    num_workers = max(0, min(num_workers, os.cpu_count() or 1))
    sampler = EpochSampler(data, seed, split, num_processes=num_processes, process_index=process_index)
    sampler.set_epoch(epoch, start_batch)
    clock = StepClock(data.num_batches_per_epoch, gradient_accumulation_steps, num_processes)
    dataset = BatchDataset(data, seed=seed, split=split, latent_cache=latent_cache, text_cache=text_cache,
                           clock=clock, max_train_steps=max_train_steps)
    return DataLoader(
        dataset, batch_size=None, sampler=sampler, num_workers=num_workers, collate_fn=_as_is,
        persistent_workers=persistent_workers and num_workers > 0,
    )


def set_epoch(loader: DataLoader, epoch: int, start_batch: int = 0) -> None:
    """Point a loader made by `make_dataloader` at another epoch (keeps persistent workers alive)."""
    sampler = loader.sampler
    if not isinstance(sampler, EpochSampler):
        raise TypeError("set_epoch needs a DataLoader made by make_dataloader")
    sampler.set_epoch(epoch, start_batch)
