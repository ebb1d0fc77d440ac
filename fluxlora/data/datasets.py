"""From a dataset blueprint to image entries, buckets, the validation split and each epoch's batches.

Semantics follow sd-scripts (spec §2.2, §2.3, §2.5): `num_repeats` copies per image, regularisation images
rebalanced to the training count, one batch list per bucket (`ceil(len / batch_size)` batches, never mixing
buckets or datasets), reshuffled every epoch. Fixed on purpose: the validation split is disjoint from training
for every (n, split) and also applies to fine-tuning datasets (§12.17); the epoch order and every per-sample
random choice are pure functions of (seed, epoch, batch index, position), so a resumed run sees the very same
batches, whatever worker process builds them. Finding a subset's images is in `fluxlora.data.subset_images`,
the `ss_*` metadata of the built datasets in `fluxlora.data.dataset_metadata`.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from fluxlora.config.dataset import DatasetBlueprint, DatasetConfig, SubsetConfig
from fluxlora.config.dataset_options import cache_conflicts
from fluxlora.data.buckets import assign_bucket, make_buckets
from fluxlora.data.captions import CaptionOptions, static_caption
from fluxlora.data.dataset_metadata import (
    dataset_metadata,
    merged_dataset_dirs,
    merged_tag_frequency,
    subset_name,
    tag_counts,
)
from fluxlora.data.images import check_complete, image_size
from fluxlora.data.pairs import ControlKind, PairError, control_index, find_control
from fluxlora.data.subset_images import dreambooth_images, finetuning_images
from fluxlora.errors import DatasetError

if TYPE_CHECKING:
    from fluxlora.data.latent_cache import LatentItem
    from fluxlora.data.text_cache import TextItem

logger = logging.getLogger(__name__)

Size = tuple[int, int]
Split = Literal["train", "validation"]


@dataclass(frozen=True)
class ImageEntry:
    """One image of a dataset. `num_repeats` is after regularisation rebalancing (1 for validation images)."""

    path: Path
    caption: str  # raw caption text; processed per sample by captions.process_caption
    subset: int  # index into DatasetConfig.subsets
    is_reg: bool
    loss_weight: float
    size: Size  # (width, height) after EXIF rotation
    bucket: Size
    resized_size: Size  # cover-resize target before the crop to `bucket`
    num_repeats: int = 1
    control: Path | None = None  # its paired image from conditioning_data_dir (a reference image or a mask)

    @property
    def key(self) -> str:
        """Identity of the image for logs and batches: its absolute path."""
        return str(self.path)

    @property
    def latent_key(self) -> tuple[str, Size]:
        """Lookup key in the latent cache (`LatentItem.key`): (path, bucket)."""
        return str(self.path), (int(self.bucket[0]), int(self.bucket[1]))

    @property
    def control_latent_key(self) -> tuple[str, Size]:
        """Lookup key of its reference image's latents (same bucket, resize and crop as the image)."""
        return str(self.control), (int(self.bucket[0]), int(self.bucket[1]))

    @property
    def masked_latent_key(self) -> tuple[str, Size, str]:
        """Lookup key of the latents of the image with its mask's region blanked (`LatentItem.mask`)."""
        return str(self.path), (int(self.bucket[0]), int(self.bucket[1])), str(self.control)


@dataclass(frozen=True)
class BuiltDataset:
    """One `[[datasets]]` entry with its images; `split` tells training entries from held-out ones."""

    config: DatasetConfig
    entries: tuple[ImageEntry, ...]
    caption_options: tuple[CaptionOptions, ...]  # one per subset
    split: Split = "train"
    tag_frequency: dict[str, dict[str, int]] = field(default_factory=dict)
    num_reg_images: int = 0  # regularisation images x their configured repeats, before rebalancing

    def bucket_items(self) -> dict[Size, list[int]]:
        """Entry indices per bucket, each repeated `num_repeats` times (sorted buckets, entry order)."""
        items: dict[Size, list[int]] = {}
        for i, entry in enumerate(self.entries):
            items.setdefault(entry.bucket, []).extend([i] * entry.num_repeats)
        return dict(sorted(items.items()))

    @property
    def num_batches(self) -> int:
        bs = self.config.batch_size
        return sum(math.ceil(len(v) / bs) for v in self.bucket_items().values())


@dataclass(frozen=True)
class BatchSpec:
    """One batch of an epoch: which dataset, bucket and entries (with repeats), and where it sits in the epoch."""

    dataset: int
    bucket: Size
    entries: tuple[int, ...]
    epoch: int
    index: int


def sample_rng(seed: int, epoch: int, batch_index: int, position: int, purpose: str) -> random.Random:
    """The random source of one sample's choice (`purpose`: caption, image): a pure function of its arguments.

    String seeds go through SHA-512 in CPython, so this is the same in every process and Python run.
    """
    return random.Random(f"fluxlora:{purpose}:{seed}:{epoch}:{batch_index}:{position}")


@dataclass(frozen=True)
class TrainingData:
    """Every dataset of the run, built; what the loader, the trainer and the `ss_*` metadata need."""

    datasets: tuple[BuiltDataset, ...]
    validation: tuple[BuiltDataset, ...]
    prior_loss_weight: float = 1.0
    num_skipped_images: int = 0
    control_kind: ControlKind | None = None  # what each entry's `control` is (None: no pairs)

    @property
    def num_train_images(self) -> int:
        """Training samples per epoch with repeats, regularisation excluded (sd-scripts' `num_train_images`)."""
        return sum(e.num_repeats for d in self.datasets for e in d.entries if not e.is_reg)

    @property
    def num_reg_images(self) -> int:
        """Regularisation images times their configured repeats, before rebalancing (sd-scripts' count)."""
        return sum(d.num_reg_images for d in self.datasets)

    @property
    def num_reg_samples(self) -> int:
        """Regularisation samples per epoch after rebalancing to the training count."""
        return sum(e.num_repeats for d in self.datasets for e in d.entries if e.is_reg)

    @property
    def num_validation_images(self) -> int:
        return sum(len(d.entries) for d in self.validation)

    @property
    def num_batches_per_epoch(self) -> int:
        return sum(d.num_batches for d in self.datasets)

    def epoch_batches(self, seed: int, epoch: int) -> list[BatchSpec]:
        """The batches of 1-based `epoch` in training order: a pure function of (seed, epoch).

        Each bucket's items are shuffled and cut into `batch_size` chunks, then all batches of all datasets are
        shuffled together (sd-scripts: per-dataset shuffle seeded with seed + epoch, DataLoader shuffle on top).
        """
        rng = random.Random(f"fluxlora:epoch:{seed}:{epoch}")
        batches: list[tuple[int, Size, tuple[int, ...]]] = []
        for d_index, dataset in enumerate(self.datasets):
            bs = dataset.config.batch_size
            for bucket, items in dataset.bucket_items().items():
                items = list(items)
                rng.shuffle(items)
                batches.extend((d_index, bucket, tuple(items[k : k + bs])) for k in range(0, len(items), bs))
        rng.shuffle(batches)
        return [BatchSpec(d, b, e, epoch, i) for i, (d, b, e) in enumerate(batches)]

    def validation_batches(self) -> list[BatchSpec]:
        """Held-out batches in a fixed order (dataset, bucket, file); epoch 0 marks them for `sample_rng`."""
        out: list[BatchSpec] = []
        for d_index, dataset in enumerate(self.validation):
            bs = dataset.config.batch_size
            for bucket, items in dataset.bucket_items().items():
                for k in range(0, len(items), bs):
                    out.append(BatchSpec(d_index, bucket, tuple(items[k : k + bs]), 0, len(out)))
        return out

    def split_datasets(self, split: Split) -> tuple[BuiltDataset, ...]:
        return self.datasets if split == "train" else self.validation

    def cache_conflicts(self, *, cache_latents: bool, cache_text_encoder_outputs: bool) -> list[str]:
        """Settings that make the requested caches wrong, one `subset key.option: reason` each (empty when fine);
        the rules are the option table's (`fluxlora.config.dataset_options.cache_conflicts`)."""
        return [f"{subset.key}.{c.name}: {c.why}, which {c.flag} cannot hold; turn it off or drop {c.flag}"
                for dataset in self.datasets for subset in dataset.config.subsets
                for c in cache_conflicts(subset, cache_latents=cache_latents,
                                         cache_text_encoder_outputs=cache_text_encoder_outputs)]

    def latent_items(self) -> list[LatentItem]:
        """One latent-cache item per distinct (image, bucket) of training and validation, in a stable order; with
        pairs also one per reference image (resized and cropped as its image) or per masked image."""
        from fluxlora.data.latent_cache import LatentItem

        items: dict[tuple, LatentItem] = {}
        for dataset in (*self.datasets, *self.validation):
            for entry in dataset.entries:
                subset = dataset.config.subsets[entry.subset]
                root = subset.image_dir or (subset.metadata_file.parent if subset.metadata_file else None)
                items.setdefault(entry.latent_key, LatentItem(
                    path=entry.path, bucket=entry.bucket, resized_size=entry.resized_size,
                    interpolation=subset.resize_interpolation, alpha_mask=subset.alpha_mask, root=root))
                if entry.control is None:
                    continue
                if self.control_kind == "reference":
                    # mirrored under cache_dir beside (not onto) the images' cache files
                    control_root = subset.conditioning_data_dir.parent if subset.conditioning_data_dir else None
                    items.setdefault(entry.control_latent_key, LatentItem(
                        path=entry.control, bucket=entry.bucket, resized_size=entry.resized_size,
                        interpolation=subset.resize_interpolation, root=control_root))
                elif self.control_kind == "mask":
                    items.setdefault(entry.masked_latent_key, LatentItem(
                        path=entry.path, bucket=entry.bucket, resized_size=entry.resized_size,
                        interpolation=subset.resize_interpolation, root=root, mask=entry.control))
        return list(items.values())

    def text_items(self) -> list[TextItem]:
        """One text-cache item per (image, processed caption); raises DatasetError when captions are not static."""
        from fluxlora.data.text_cache import TextItem

        items: dict[tuple[str, str], TextItem] = {}
        for dataset in (*self.datasets, *self.validation):
            for entry in dataset.entries:
                subset = dataset.config.subsets[entry.subset]
                caption = static_caption(entry.caption, dataset.caption_options[entry.subset])
                items.setdefault((entry.key, caption), TextItem(path=entry.path, caption=caption,
                                                                 root=subset.image_dir))
        return list(items.values())

    def metadata(self) -> list[dict[str, Any]]:
        """`ss_datasets` entries (spec §6.3), one per training dataset."""
        return [dataset_metadata(d) for d in self.datasets]

    def tag_frequency(self) -> dict[str, dict[str, int]]:
        """`ss_tag_frequency`: {folder or metadata file name: {tag: count}} over every dataset."""
        return merged_tag_frequency(self.datasets)

    def dataset_dirs(self) -> dict[str, dict[str, int]]:
        """`ss_dataset_dirs`: {folder name: {n_repeats, img_count}} for non-reg subsets, duplicates suffixed."""
        return merged_dataset_dirs(self.datasets)


def caption_options(subset: SubsetConfig) -> CaptionOptions:
    """The caption pipeline settings of a subset."""
    names = CaptionOptions.__dataclass_fields__
    return CaptionOptions(**{name: getattr(subset, name) for name in names})


def split_for_validation(paths: list[Path], split: float, seed: int) -> tuple[list[Path], list[Path]]:
    """(train, validation): shuffle the sorted paths with `random.Random(seed)`, hold out the first k.

    k = round(n·split), at least 1 when split > 0 and n >= 2, at most n - 1 when split < 1 (every subset keeps
    a training image); split = 1 holds out everything. Disjoint and covering by construction.
    """
    ordered = sorted(paths)
    n = len(ordered)
    if split <= 0 or n == 0:
        return ordered, []
    if split >= 1:
        return [], ordered
    k = min(max(round(n * split), 1), n - 1)
    random.Random(seed).shuffle(ordered)
    return sorted(ordered[k:]), sorted(ordered[:k])


def rebalance_reg_repeats(reg_repeats: list[int], num_train: int) -> list[int]:
    """Per-image repeats of regularisation images, exactly as sd-scripts (spec §2.2).

    Images are registered in order, each with its own repeats, until the running count reaches `num_train`
    (the rest get 0: dropped); then one repeat at a time is added round-robin until it does.
    """
    out = [0] * len(reg_repeats)
    if not reg_repeats:
        return out
    n, first_loop = 0, True
    while n < num_train:
        for i, repeats in enumerate(reg_repeats):
            if first_loop:
                out[i] = repeats
                n += repeats
            else:
                out[i] += 1
                n += 1
            if n >= num_train:
                break
        first_loop = False
    return out


def build_training_data(blueprint: DatasetBlueprint, *, seed: int, skip_bad_images: bool = False,
                        control_kind: ControlKind | None = None) -> TrainingData:
    """Find every image, read captions and header sizes, split off validation, rebalance and bucket.

    `seed` is the run seed (used for the split when a dataset has no `validation_seed`). `control_kind` is what the
    model reads from each image's paired file in `conditioning_data_dir` (None: the model reads no pairs, and a
    subset that sets the folder is an error). Every problem (empty dataset, unreadable image or caption, missing
    metadata image, missing or mismatched pair) is collected and raised as one DatasetError; with
    `skip_bad_images` unreadable images are left out with a warning instead.
    """
    problems: list[str] = []
    train, validation = [], []
    skipped = 0
    for dataset in blueprint.datasets:
        built, held_out, n_skipped = _build_dataset(dataset, blueprint.prior_loss_weight, seed, skip_bad_images,
                                                    problems, control_kind)
        train.extend([built] if built is not None else [])
        validation.extend([held_out] if held_out is not None else [])
        skipped += n_skipped
    if not train and not problems:
        problems.append("no dataset has training images; add images or lower validation_split")
    if problems:
        source = blueprint.source or "dataset flags"
        raise DatasetError(f"{source}: {len(problems)} dataset problem(s): " + "; ".join(problems),
                           path=blueprint.source)
    return TrainingData(tuple(train), tuple(validation), blueprint.prior_loss_weight, skipped, control_kind)


def _control_indexes(cfg: DatasetConfig, kind: ControlKind | None, problems: list[str]) -> dict[int, dict]:
    """Per subset index, its control folder's images by stem; a subset with pairs the model does not read, or
    without the pairs it needs, is a problem."""
    what = {"reference": "reference images", "mask": "masks (white = the region to paint)"}
    indexes: dict[int, dict] = {}
    for s_index, subset in enumerate(cfg.subsets):
        folder = subset.conditioning_data_dir
        if folder is not None and kind is None:
            problems.append(f"{subset.key}.conditioning_data_dir: this model reads no paired images (only FLUX.1 "
                            "Kontext reads reference images and FLUX.1 Fill masks); remove it, or choose that model "
                            "with --model_type (for a loss mask use alpha_mask = true)")
        elif folder is None and kind is not None:
            problems.append(f"{subset.key}: this model trains on pairs: set conditioning_data_dir (or "
                            f"control_directory) to the folder of its {what[kind]}, matched by file stem")
        elif folder is not None and folder.is_dir():
            indexes[s_index] = control_index(folder)
    return indexes


def _build_dataset(
    cfg: DatasetConfig, prior_loss_weight: float, seed: int, skip_bad: bool, problems: list[str],
    control_kind: ControlKind | None = None,
) -> tuple[BuiltDataset | None, BuiltDataset | None, int]:
    controls = _control_indexes(cfg, control_kind, problems)
    known_sizes: dict[Path, Size] = {}
    train_rows: list[tuple[int, Path, str, int]] = []  # (subset, path, caption, repeats)
    held_out: list[tuple[int, Path, str, int]] = []
    reg_rows: list[tuple[int, Path, str, int]] = []
    tag_texts: dict[str, list[str]] = {}
    split_seed = cfg.validation_seed if cfg.validation_seed is not None else seed
    for s_index, subset in enumerate(cfg.subsets):
        if subset.is_dreambooth:
            try:
                found = dreambooth_images(subset, problems)
            except DatasetError as err:
                problems.append(str(err))
                continue
        else:
            found = finetuning_images(subset, problems, known_sizes)
        if not found.items:
            logger.warning("%s: no images found; this subset is skipped", subset.key)
            continue
        by_path = {p: (c, t) for p, c, t in found.items}
        tag_texts.setdefault(subset_name(subset), []).extend(t for _, _, t in found.items)
        if subset.is_reg:
            reg_rows.extend((s_index, p, by_path[p][0], subset.num_repeats) for p in sorted(by_path))
            continue
        kept, val = split_for_validation(list(by_path), cfg.validation_split, split_seed)
        train_rows.extend((s_index, p, by_path[p][0], subset.num_repeats) for p in kept)
        held_out.extend((s_index, p, by_path[p][0], 1) for p in val)
    if not train_rows and not held_out:
        problems.append(f"{cfg.key}: no training images found in "
                        + ", ".join(repr(str(s.image_dir or s.metadata_file)) for s in cfg.subsets)
                        + "; add images (png, jpg, jpeg, webp, bmp) or remove this dataset")
        return None, None, 0
    num_reg_images = sum(r for *_, r in reg_rows)
    num_train = sum(r for *_, r in train_rows)
    if reg_rows:
        if sum(r for *_, r in reg_rows) > num_train:
            logger.warning("%s: more regularisation samples than training samples; some are not used", cfg.key)
        balanced = rebalance_reg_repeats([r for *_, r in reg_rows], num_train)
        reg_rows = [(s, p, c, n) for (s, p, c, _), n in zip(reg_rows, balanced, strict=True) if n > 0]
    buckets = (make_buckets(cfg.resolution, cfg.min_bucket_reso, cfg.max_bucket_reso, cfg.bucket_reso_steps)
               if cfg.enable_bucket and not cfg.bucket_no_upscale else None)
    skipped = 0

    def entries(rows: list[tuple[int, Path, str, int]], is_reg: bool) -> Iterator[ImageEntry]:
        nonlocal skipped
        for s_index, path, caption, repeats in rows:
            size = known_sizes.get(path.resolve())
            if size is None:
                try:
                    size = image_size(path)
                    check_complete(path)  # a cut-short PNG fails here, before any weights load
                except DatasetError as err:
                    if skip_bad:
                        logger.warning("skipping image %s", err)
                        skipped += 1
                    else:
                        problems.append(str(err))
                    continue
            control = None
            if s_index in controls:
                folder = cfg.subsets[s_index].conditioning_data_dir
                try:
                    control = find_control(path, size, folder, controls[s_index], kind=control_kind).resolve()
                except PairError as err:
                    problems.append(str(err))
                    continue
                except DatasetError as err:  # an unreadable control file
                    if skip_bad:
                        logger.warning("skipping image %s", err)
                        skipped += 1
                    else:
                        problems.append(str(err))
                    continue
            bucket, resized = assign_bucket(size, resolution=cfg.resolution, enable_bucket=cfg.enable_bucket,
                                            bucket_no_upscale=cfg.bucket_no_upscale, buckets=buckets,
                                            step=cfg.bucket_reso_steps)
            weight = prior_loss_weight if is_reg else 1.0
            yield ImageEntry(path.resolve(), caption, s_index, is_reg, weight, size, bucket, resized, repeats,
                             control)

    options = tuple(caption_options(s) for s in cfg.subsets)
    tags = {name: tag_counts(texts) for name, texts in tag_texts.items()}
    train_entries = (*entries(train_rows, False), *entries(reg_rows, True))
    train = BuiltDataset(cfg, train_entries, options, "train", tags, num_reg_images) if train_rows else None
    val_entries = tuple(entries(held_out, False))
    val = BuiltDataset(cfg, val_entries, options, "validation") if val_entries else None
    if train is not None and all(e.is_reg for e in train.entries):
        problems.append(f"{cfg.key}: none of its training images could be read; fix or remove them")
        train = None
    if cfg.validation_split > 0 and not held_out:
        logger.warning("%s: validation_split = %g holds out no image (each subset needs 2 or more)",
                       cfg.key, cfg.validation_split)
    return train, val, skipped
