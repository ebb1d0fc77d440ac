"""The `ss_*` metadata of built datasets (spec §6.3): `ss_datasets`, `ss_tag_frequency`, `ss_dataset_dirs`.

Names and shapes follow sd-scripts so LoRA browsers read our files as theirs: a subset is named by its folder
(DreamBooth) or metadata file (fine-tuning), tags are counted lower-cased per comma-separated item.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from fluxlora.config.dataset import SubsetConfig

if TYPE_CHECKING:
    from fluxlora.data.datasets import BuiltDataset


def subset_name(subset: SubsetConfig) -> str:
    """The name sd-scripts gives a subset in metadata: its folder's or metadata file's name."""
    path = subset.image_dir if subset.is_dreambooth else subset.metadata_file
    return path.name if path is not None else ""


def tag_counts(texts: list[str]) -> dict[str, int]:
    """{tag: count} over comma-separated tag texts, tags stripped and lower-cased."""
    counts: dict[str, int] = {}
    for text in texts:
        for tag in text.split(","):
            tag = tag.strip().lower()
            if tag:
                counts[tag] = counts.get(tag, 0) + 1
    return counts


def dataset_metadata(d: BuiltDataset) -> dict[str, Any]:
    """One `ss_datasets` entry: the dataset's settings, per-subset counts and options, and its buckets."""
    cfg = d.config
    img_counts = Counter(e.subset for e in d.entries)
    subsets = []
    for s_index, s in enumerate(cfg.subsets):
        info: dict[str, Any] = {
            "img_count": img_counts.get(s_index, 0), "num_repeats": s.num_repeats, "color_aug": s.color_aug,
            "flip_aug": s.flip_aug, "random_crop": s.random_crop, "shuffle_caption": s.shuffle_caption,
            "keep_tokens": s.keep_tokens, "keep_tokens_separator": s.keep_tokens_separator,
            "secondary_separator": s.secondary_separator, "enable_wildcard": s.enable_wildcard,
            "caption_prefix": s.caption_prefix, "caption_suffix": s.caption_suffix,
            "resize_interpolation": s.resize_interpolation,
        }
        if s.is_dreambooth:
            info.update(image_dir=subset_name(s), class_tokens=s.class_tokens, is_reg=s.is_reg)
        else:
            info.update(metadata_file=subset_name(s))
        subsets.append(info)
    items = d.bucket_items()
    errors = [abs(e.bucket[0] / e.bucket[1] - e.size[0] / e.size[1]) for e in d.entries]
    return {
        "is_dreambooth": cfg.is_dreambooth,
        "batch_size_per_device": cfg.batch_size,
        "num_train_images": sum(e.num_repeats for e in d.entries if not e.is_reg),
        "num_reg_images": sum(e.num_repeats for e in d.entries if e.is_reg),
        "resolution": list(cfg.resolution),
        "enable_bucket": cfg.enable_bucket,
        "min_bucket_reso": cfg.min_bucket_reso,
        "max_bucket_reso": cfg.max_bucket_reso,
        "tag_frequency": d.tag_frequency,
        "bucket_info": {
            "buckets": {i: {"resolution": list(b), "count": len(v)} for i, (b, v) in enumerate(items.items())},
            "mean_img_ar_error": sum(errors) / len(errors) if errors else 0.0,
        },
        "resize_interpolation": cfg.resize_interpolation,
        "subsets": subsets,
    }


def merged_tag_frequency(datasets: Iterable[BuiltDataset]) -> dict[str, dict[str, int]]:
    """`ss_tag_frequency`: {folder or metadata file name: {tag: count}} over every dataset."""
    out: dict[str, dict[str, int]] = {}
    for dataset in datasets:
        for name, tags in dataset.tag_frequency.items():
            merged = out.setdefault(name, {})
            for tag, count in tags.items():
                merged[tag] = merged.get(tag, 0) + count
    return out


def merged_dataset_dirs(datasets: Iterable[BuiltDataset]) -> dict[str, dict[str, int]]:
    """`ss_dataset_dirs`: {folder name: {n_repeats, img_count}} for non-reg subsets, duplicates suffixed."""
    out: dict[str, dict[str, int]] = {}
    for dataset in datasets:
        counts = Counter(e.subset for e in dataset.entries if not e.is_reg)
        for s_index, subset in enumerate(dataset.config.subsets):
            if subset.is_reg:
                continue
            name, n = subset_name(subset), 2
            base = name
            while name in out:
                name, n = f"{base} ({n})", n + 1
            out[name] = {"n_repeats": subset.num_repeats, "img_count": counts.get(s_index, 0)}
    return out
