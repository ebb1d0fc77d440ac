"""The dataset TOML/JSON of sd-scripts (`--dataset_config`), or the dataset flags, as one validated blueprint.

Schema and precedence follow sd-scripts (spec §2.1): two top-level keys, `general` and `datasets`; each value is
the first one set among subset -> dataset -> general -> command line -> built-in default. We differ on purpose:
every problem in the file is reported at once with its key path and a hint; `interpolation_type` (the guide's
name) is an alias of `resize_interpolation`; an int where a float is expected is accepted (`validation_split = 1`),
and an integral float where an int is expected; sizes are checked against FLUX's multiple-of-16 rule.
The key table, value types and file parsing live in `fluxlora.config.dataset_schema`. Nothing here touches
image files; `fluxlora.data.datasets` turns the blueprint into images and batches.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from fluxlora.config.dataset_options import (
    DATASET_FIELDS,
    FLUX_MULTIPLE,
    INTERPOLATIONS,
    SUBSET_FIELDS,
    DatasetConfig,
    DatasetDefaults,
    DatasetFlags,
    SubsetConfig,
)
from fluxlora.config.dataset_schema import (
    DATASET,
    GENERAL,
    SUBSET,
    Problems,
    Resolver,
    parse_file,
    read_table,
    suggest,
)

logger = logging.getLogger(__name__)

__all__ = [
    "FLUX_MULTIPLE",
    "INTERPOLATIONS",
    "DatasetBlueprint",
    "DatasetConfig",
    "DatasetDefaults",
    "DatasetFlags",
    "SubsetConfig",
    "as_mapping",
    "blueprint_from_flags",
    "load_dataset_config",
]


@dataclass(frozen=True)
class DatasetBlueprint:
    """Every dataset of the run, validated; `source` is the TOML/JSON file or None when built from flags."""

    datasets: tuple[DatasetConfig, ...]
    prior_loss_weight: float = 1.0
    source: Path | None = None



def load_dataset_config(path: Path, defaults: DatasetFlags) -> DatasetBlueprint:
    """Read a dataset TOML (or JSON, by extension) and resolve it against the command-line `defaults`.

    Raises one DatasetError listing every problem of the file (key path and hint for each); the list is also in
    the error's `problems` attribute.
    """
    path = Path(path)
    problems = Problems(str(path))
    data = parse_file(path)
    for top in data:
        if top == "validation":
            problems.add("validation", "there is no [validation] table (the guide is wrong); set validation_split = "
                         "0.1 and optionally validation_seed in [general] or [[datasets]]")
        elif top not in ("general", "datasets"):
            problems.add(top, f"unknown top-level key{suggest(top, {'general', 'datasets'})}; only [general] "
                         "and [[datasets]] are allowed")
    general = read_table(data.get("general", {}), GENERAL, "general", problems)
    raw_datasets = data.get("datasets", [])
    if not isinstance(raw_datasets, list) or not raw_datasets:
        problems.add("datasets", "no [[datasets]] with [[datasets.subsets]]; add at least one")
        raw_datasets = []
    datasets = []
    for i, raw in enumerate(raw_datasets):
        where = f"datasets[{i}]"
        dataset_table = read_table(raw, DATASET, where, problems)
        raw_subsets = raw.get("subsets", []) if isinstance(raw, dict) else []
        if not isinstance(raw_subsets, list) or not raw_subsets:
            problems.add(f"{where}.subsets", "no [[datasets.subsets]]; add one with image_dir")
            raw_subsets = []
        subset_tables = [read_table(s, SUBSET, f"{where}.subsets[{j}]", problems) for j, s in enumerate(raw_subsets)]
        built = _build_dataset(where, [dataset_table, general], subset_tables, defaults, problems)
        if built is not None:
            datasets.append(built)
    problems.raise_if_any(path)
    return DatasetBlueprint(tuple(datasets), prior_loss_weight=float(defaults.prior_loss_weight), source=path)


def _build_dataset(
    where: str,
    upper: list[dict[str, Any]],
    subset_tables: list[dict[str, Any]],
    defaults: DatasetFlags,
    problems: Problems,
) -> DatasetConfig | None:
    labels = [where, "general"]
    res = Resolver(list(zip(labels, upper, strict=True)), defaults, problems)
    subsets = []
    for j, table in enumerate(subset_tables):
        sres = Resolver([(f"{where}.subsets[{j}]", table), *res.tables], defaults, problems)
        subsets.append(_build_subset(f"{where}.subsets[{j}]", table, sres, problems))
    kinds = {s.is_dreambooth for s in subsets}
    if len(kinds) > 1:
        problems.add(f"{where}.subsets", "mixes DreamBooth subsets (image_dir only) and fine-tuning subsets "
                     "(metadata_file); put them in separate [[datasets]]")
    for s in subsets:
        if s.is_reg and not s.is_dreambooth:
            problems.add(f"{s.key}.is_reg", "regularisation images need a DreamBooth subset (image_dir without "
                         "metadata_file)")
    seen: dict[Path, str] = {}
    for s in subsets:
        if s.is_dreambooth and s.image_dir is not None:
            resolved = s.image_dir.resolve()
            if resolved in seen:
                problems.add(f"{s.key}.image_dir", f"same folder as {seen[resolved]}; merge the two subsets")
            seen.setdefault(resolved, s.key)
    resolution = _check_sizes(res, problems)
    _check_network_multiplier(res, problems)
    if resolution is None:
        return None
    return _dataset_config(where, subsets, resolution, res)


def _dataset_config(
    key: str, subsets: list[SubsetConfig], resolution: tuple[int, int], res: Resolver
) -> DatasetConfig:
    names = ["batch_size", "resize_interpolation", *(o.name for o in DATASET_FIELDS)]
    return DatasetConfig(key=key, subsets=tuple(subsets), resolution=resolution,
                         **{name: res.value(name) for name in names})


def _check_sizes(res: Resolver, problems: Problems) -> tuple[int, int] | None:
    """FLUX needs pixel sizes that are multiples of 16; bucket limits must bracket the resolution."""
    resolution, r_where = res.get("resolution")
    if resolution is None:
        if r_where.endswith("(default)"):
            problems.add("resolution", "not set; add resolution = 1024 (or [width, height]) to [general] or "
                         "[[datasets]], or pass --resolution")
        return None
    step, s_where = res.get("bucket_reso_steps")
    ok = True
    if any(v % FLUX_MULTIPLE for v in resolution):
        fixed = [_nearest_multiple(v) for v in resolution]
        problems.add(r_where, f"{list(resolution)} is not a multiple of {FLUX_MULTIPLE} (FLUX: 8x autoencoder, "
                     f"then 2x2 patches); use {fixed}")
        ok = False
    if step is not None and step % FLUX_MULTIPLE:
        problems.add(s_where, f"{step} is not a multiple of {FLUX_MULTIPLE} (FLUX); use "
                     f"{_nearest_multiple(step)} or the default 64")
        ok = False
    if res.value("enable_bucket") and not res.value("bucket_no_upscale") and step:
        lo, lo_where = res.get("min_bucket_reso")
        hi, hi_where = res.get("max_bucket_reso")
        if lo is not None and lo > min(resolution):
            problems.add(lo_where, f"{lo} is larger than the resolution's shorter side {min(resolution)}; "
                         f"lower it to {min(resolution)} or less")
            ok = False
        if hi is not None and hi < max(resolution):
            problems.add(hi_where, f"{hi} is smaller than the resolution's longer side {max(resolution)}; "
                         f"raise it to {max(resolution)} or more")
            ok = False
        if ok and lo is not None and lo < step and step % FLUX_MULTIPLE == 0:
            problems.add(s_where, _step_above_min(step, lo, lo_where, resolution))
            ok = False
    return resolution if ok else None


def _step_above_min(step: int, lo: int, lo_where: str, resolution: tuple[int, int]) -> str:
    """sd-scripts floors min_bucket_reso to a multiple of bucket_reso_steps: below one step it becomes 0 and the
    bucket table divides by zero. Say which values work."""
    fits = lo // FLUX_MULTIPLE * FLUX_MULTIPLE
    fix = [f"bucket_reso_steps = {fits} (or another multiple of {FLUX_MULTIPLE} up to {lo})"] if fits else []
    if min(resolution) >= step:
        fix.append(f"{lo_where.rsplit('.', 1)[-1].lstrip('-')} = {step} or more")
    else:
        fix.append(f"resolution and min_bucket_reso of at least {step}")
    return (f"{step} is larger than min_bucket_reso {lo} ({lo_where}, resolution {resolution[0]}x{resolution[1]}): "
            f"buckets are multiples of bucket_reso_steps, so the smallest would have a side of 0; use "
            + " or ".join(fix))


def _nearest_multiple(v: int) -> int:
    return max(FLUX_MULTIPLE, (v + FLUX_MULTIPLE // 2) // FLUX_MULTIPLE * FLUX_MULTIPLE)


def _check_network_multiplier(res: Resolver, problems: Problems) -> None:
    value, where = res.get("network_multiplier")
    if value is not None and value != 1.0:
        problems.add(where, "sd-scripts reads network_multiplier but never applies it, and fluxlora does not "
                     "either; remove it (or train separate LoRAs)")


def _build_subset(where: str, table: dict[str, Any], res: Resolver, problems: Problems) -> SubsetConfig:
    image_dir = table.get("image_dir")
    metadata_file = table.get("metadata_file")
    if metadata_file is None and image_dir is None:
        problems.add(f"{where}.image_dir", "required: the folder with this subset's images (or metadata_file for "
                     "a fine-tuning subset)")
    if image_dir is not None and not image_dir.is_dir():
        what = "is not a folder" if image_dir.exists() else "does not exist"
        hint = "" if image_dir.is_absolute() else " (relative paths start from the current directory, as in sd-scripts)"
        problems.add(f"{where}.image_dir", f"folder {str(image_dir)!r} {what}; fix the path{hint}")
    if metadata_file is not None:
        if metadata_file.suffix.lower() not in (".json", ".jsonl"):
            problems.add(f"{where}.metadata_file", "must be a .json or .jsonl file")
        elif not metadata_file.is_file():
            problems.add(f"{where}.metadata_file", f"file {str(metadata_file)!r} does not exist; fix the path")
    face, face_where = res.get("face_crop_aug_range")
    if face is not None:
        problems.add(face_where, "face_crop_aug_range is not supported (sd-scripts applies it only without "
                     "buckets, from face boxes in file names); crop the images beforehand and remove it")
    extension = res.value("caption_extension") or ".caption"
    if not extension.startswith("."):
        extension = "." + extension
    control_dir = table.get("conditioning_data_dir")
    if control_dir is not None and not control_dir.is_dir():
        what = "is not a folder" if control_dir.exists() else "does not exist"
        problems.add(f"{where}.conditioning_data_dir", f"folder {str(control_dir)!r} {what}; fix the path")
    names = [o.name for o in SUBSET_FIELDS if o.name not in ("caption_extension", "conditioning_data_dir")]
    values = {name: res.value(name) for name in names}
    if values["custom_attributes"] is None:
        values["custom_attributes"] = {}
    if values["cache_info"]:
        logger.info("%s: cache_info is not needed: image sizes are read from file headers", where)
    return SubsetConfig(key=where, image_dir=image_dir, metadata_file=metadata_file, caption_extension=extension,
                        conditioning_data_dir=control_dir, **values)


def blueprint_from_flags(defaults: DatasetFlags) -> DatasetBlueprint:
    """The dataset sd-scripts builds without `--dataset_config`.

    `--train_data_dir` holds sub-folders named `<repeats>_<class tokens>` (DreamBooth style), `--reg_data_dir` the
    same for regularisation images; with `--in_json` the metadata file describes a fine-tuning dataset whose
    relative image paths are joined to `--train_data_dir`.
    """
    problems = Problems("command line")
    subsets: list[dict[str, Any]] = []
    keys: list[str] = []
    if defaults.in_json is not None:
        if defaults.reg_data_dir is not None:
            problems.add("--reg_data_dir", "cannot be combined with --in_json (fine-tuning has no regularisation "
                         "images); use a dataset TOML with a DreamBooth dataset for them")
        table: dict[str, Any] = {"metadata_file": Path(defaults.in_json), "num_repeats": defaults.dataset_repeats}
        if defaults.train_data_dir is not None:
            table["image_dir"] = Path(defaults.train_data_dir)
        subsets.append(table)
        keys.append("--in_json")
    elif defaults.train_data_dir is None:
        problems.add("--train_data_dir", "no dataset given; pass --dataset_config dataset.toml or --train_data_dir")
    else:
        for flag, folder, is_reg in (("--train_data_dir", defaults.train_data_dir, False),
                                     ("--reg_data_dir", defaults.reg_data_dir, True)):
            if folder is not None:
                for key, table in _repeat_folders(flag, Path(folder), is_reg, problems):
                    subsets.append(table)
                    keys.append(key)
    built = []
    for key, table in zip(keys, subsets, strict=True):
        sres = Resolver([("", table)], defaults, problems)
        built.append(_build_subset(key, table, sres, problems))
    res = Resolver([], defaults, problems)
    resolution = _check_sizes(res, problems)
    problems.raise_if_any(None)
    assert resolution is not None
    dataset = _dataset_config("command line", built, resolution, res)
    return DatasetBlueprint((dataset,), prior_loss_weight=float(defaults.prior_loss_weight), source=None)


def _repeat_folders(flag: str, folder: Path, is_reg: bool, problems: Problems) -> list[tuple[str, dict[str, Any]]]:
    """Sub-folders `<repeats>_<class tokens>` of a DreamBooth parent folder, sorted by name."""
    if not folder.is_dir():
        problems.add(flag, f"folder {str(folder)!r} does not exist; fix the path")
        return []
    found = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        head, _, tokens = sub.name.partition("_")
        if not head.isdigit() or int(head) < 1:
            logger.warning("%s: skipping %s: the folder name must be <repeats>_<class tokens>, e.g. 10_sks dog",
                           flag, sub)
            continue
        table = {"image_dir": sub, "num_repeats": int(head), "is_reg": is_reg, "class_tokens": tokens or None}
        found.append((f"{flag} {sub.name}", table))
    if not found:
        problems.add(flag, f"{str(folder)!r} has no sub-folder named <repeats>_<class tokens> (e.g. "
                     "'10_sks dog'); put the images in one")
    return found


def as_mapping(obj: Any) -> Mapping[str, Any]:
    """A JSON-friendly dict of a config dataclass (for logs and `ss_*` metadata)."""
    out: dict[str, Any] = {}
    for f in fields(obj):
        v = getattr(obj, f.name)
        if isinstance(v, Path):
            v = str(v)
        elif isinstance(v, tuple) and v and hasattr(v[0], "__dataclass_fields__"):
            v = [as_mapping(x) for x in v]
        out[f.name] = v
    return out
