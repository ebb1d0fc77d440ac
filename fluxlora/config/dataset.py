"""The dataset TOML/JSON of sd-scripts (`--dataset_config`), or the dataset flags, as one validated blueprint.

Schema and precedence follow sd-scripts (spec §2.1): two top-level keys, `general` and `datasets`; each value is
the first one set among subset -> dataset -> general -> command line -> built-in default. We differ on purpose:
every problem in the file is reported at once with its key path and a hint; `interpolation_type` (the guide's
name) is an alias of `resize_interpolation`; an int where a float is expected is accepted (`validation_split = 1`),
and an integral float where an int is expected; sizes are checked against FLUX's multiple-of-16 rule.
Nothing here touches image files; `fluxlora.data.datasets` turns the blueprint into images and batches.
"""

from __future__ import annotations

import difflib
import json
import logging
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from fluxlora.errors import DatasetError

logger = logging.getLogger(__name__)

INTERPOLATIONS = ("lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area", "box")
FLUX_MULTIPLE = 16  # 8x autoencoder downsampling, then 2x2 patches

_G, _D, _S = "general", "dataset", "subset"
_ALL = frozenset({_G, _D, _S})
_DS = frozenset({_G, _D})
_SUB = frozenset({_S})

# key -> (kind, levels, built-in default). Kinds are checked by _coerce.
_SCHEMA: dict[str, tuple[str, frozenset[str], Any]] = {
    # dataset-level keys (general or [[datasets]])
    "batch_size": ("pos_int", _DS, 1),
    "resolution": ("resolution", _DS, None),
    "enable_bucket": ("bool", _DS, False),
    "min_bucket_reso": ("pos_int", _DS, 256),
    "max_bucket_reso": ("pos_int", _DS, 1024),
    "bucket_reso_steps": ("pos_int", _DS, 64),
    "bucket_no_upscale": ("bool", _DS, False),
    "network_multiplier": ("float", _DS, 1.0),
    "validation_split": ("fraction", _DS, 0.0),
    "validation_seed": ("int", _DS, None),
    # subset keys that may also be set higher up as defaults ("ascendable")
    "resize_interpolation": ("interpolation", _ALL, None),
    "num_repeats": ("pos_int", _ALL, 1),
    "shuffle_caption": ("bool", _ALL, False),
    "caption_separator": ("str", _ALL, ","),
    "keep_tokens": ("nonneg_int", _ALL, 0),
    "keep_tokens_separator": ("str", _ALL, ""),
    "secondary_separator": ("str", _ALL, None),
    "enable_wildcard": ("bool", _ALL, False),
    "color_aug": ("bool", _ALL, False),
    "flip_aug": ("bool", _ALL, False),
    "random_crop": ("bool", _ALL, False),
    "face_crop_aug_range": ("range", _ALL, None),
    "caption_prefix": ("str", _ALL, None),
    "caption_suffix": ("str", _ALL, None),
    "token_warmup_min": ("nonneg_int", _ALL, 1),
    "token_warmup_step": ("nonneg_float", _ALL, 0.0),
    "custom_attributes": ("table", _ALL, None),
    "caption_dropout_rate": ("fraction", _ALL, 0.0),
    "caption_dropout_every_n_epochs": ("nonneg_int", _ALL, 0),
    "caption_tag_dropout_rate": ("fraction", _ALL, 0.0),
    "caption_extension": ("str", _ALL, ".caption"),
    "class_tokens": ("str", _ALL, None),
    "cache_info": ("bool", _ALL, False),
    # subset-only keys
    "image_dir": ("path", _SUB, None),
    "metadata_file": ("path", _SUB, None),
    "is_reg": ("bool", _SUB, False),
    "alpha_mask": ("bool", _SUB, False),
}
_ALIASES = {"interpolation_type": "resize_interpolation"}
# Keys sd-scripts knows that we refuse, with the reason and what to do instead.
_REFUSED = {
    "conditioning_data_dir": "mask/ControlNet subsets are not supported by fluxlora; use alpha_mask = true "
    "with images that carry an alpha channel",
}
# Dataset-level settings that sd-scripts reads from a differently named flag.
_FLAG_NAMES = {"batch_size": "train_batch_size"}
_EXPECTED = {
    "bool": "true or false", "int": "an integer", "pos_int": "an integer >= 1", "nonneg_int": "an integer >= 0",
    "float": "a number", "nonneg_float": "a number >= 0", "fraction": "a number between 0 and 1",
    "str": "a string", "path": "a path string", "table": "a table",
    "interpolation": "one of " + ", ".join(INTERPOLATIONS),
    "resolution": "an integer or [width, height]", "range": "[low, high] numbers",
}


@dataclass(frozen=True)
class DatasetDefaults:
    """Command-line values for the dataset (sd-scripts flag names); the dataset TOML overrides them."""

    resolution: int | str | tuple[int, int] | None = None
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    train_batch_size: int = 1
    caption_extension: str = ".caption"
    shuffle_caption: bool = False
    caption_separator: str = ","
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    secondary_separator: str | None = None
    enable_wildcard: bool = False
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    token_warmup_min: int = 1
    token_warmup_step: float = 0.0
    color_aug: bool = False
    flip_aug: bool = False
    random_crop: bool = False
    face_crop_aug_range: str | tuple[float, float] | None = None
    alpha_mask: bool = False
    resize_interpolation: str | None = None
    cache_info: bool = False
    validation_split: float = 0.0
    validation_seed: int | None = None
    train_data_dir: str | Path | None = None
    reg_data_dir: str | Path | None = None
    in_json: str | Path | None = None
    dataset_repeats: int = 1
    prior_loss_weight: float = 1.0


@dataclass(frozen=True)
class SubsetConfig:
    """One `[[datasets.subsets]]` entry with every setting resolved (subset -> dataset -> general -> CLI)."""

    key: str  # where it came from, e.g. "datasets[0].subsets[1]" or "--train_data_dir 10_sks dog"
    image_dir: Path | None
    metadata_file: Path | None = None
    is_reg: bool = False
    num_repeats: int = 1
    class_tokens: str | None = None
    caption_extension: str = ".caption"
    shuffle_caption: bool = False
    caption_separator: str = ","
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    secondary_separator: str | None = None
    enable_wildcard: bool = False
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    token_warmup_min: int = 1
    token_warmup_step: float = 0.0
    color_aug: bool = False
    flip_aug: bool = False
    random_crop: bool = False
    alpha_mask: bool = False
    resize_interpolation: str | None = None
    cache_info: bool = False
    custom_attributes: dict[str, Any] = field(default_factory=dict)

    @property
    def is_dreambooth(self) -> bool:
        return self.metadata_file is None

    @property
    def diff_output_preservation(self) -> bool:
        return bool(self.custom_attributes.get("diff_output_preservation", False))


@dataclass(frozen=True)
class DatasetConfig:
    """One `[[datasets]]` entry: its own batch size, resolution and buckets; batches never mix datasets."""

    key: str
    subsets: tuple[SubsetConfig, ...]
    resolution: tuple[int, int]
    batch_size: int = 1
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    validation_split: float = 0.0
    validation_seed: int | None = None
    resize_interpolation: str | None = None

    @property
    def is_dreambooth(self) -> bool:
        return all(s.is_dreambooth for s in self.subsets)


@dataclass(frozen=True)
class DatasetBlueprint:
    """Every dataset of the run, validated; `source` is the TOML/JSON file or None when built from flags."""

    datasets: tuple[DatasetConfig, ...]
    prior_loss_weight: float = 1.0
    source: Path | None = None


class _Problems:
    """Collects every problem of one configuration so the user fixes them in one go."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.items: list[tuple[str, str]] = []

    def add(self, key: str, message: str) -> None:
        self.items.append((key, message))

    def raise_if_any(self, path: Path | None) -> None:
        if not self.items:
            return
        lines = [f"{k}: {m}" if k else m for k, m in self.items]
        head = f"{self.source}: {len(lines)} problem{'s' if len(lines) > 1 else ''} in the dataset configuration"
        err = DatasetError(f"{head}: " + "; ".join(lines), path=path, key=self.items[0][0] or None)
        err.problems = lines  # type: ignore[attr-defined]
        raise err


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _coerce(kind: str, value: Any, where: str, problems: _Problems) -> Any:
    """Check one raw TOML/JSON value against its kind; return the typed value or None after recording a problem."""
    bad = f"expected {_EXPECTED[kind]}, got {type(value).__name__} {value!r}"
    if isinstance(value, str) and kind not in ("str", "path", "interpolation"):
        bad += " (remove the quotes)"
    if kind == "bool":
        if isinstance(value, bool):
            return value
    elif kind in ("int", "pos_int", "nonneg_int"):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if _is_int(value):
            if (kind == "pos_int" and value < 1) or (kind == "nonneg_int" and value < 0):
                problems.add(where, f"expected {_EXPECTED[kind]}, got {value}")
                return None
            return value
    elif kind in ("float", "nonneg_float", "fraction"):
        if _is_int(value) or isinstance(value, float):
            value = float(value)
            if kind == "fraction" and not 0.0 <= value <= 1.0:
                hint = f" (for {value:g} % write {value / 100:g})" if 1 < value <= 100 else ""
                problems.add(where, f"expected a fraction between 0 and 1, got {value:g}{hint}")
                return None
            if kind == "nonneg_float" and value < 0:
                problems.add(where, f"expected a number >= 0, got {value:g}")
                return None
            return value
    elif kind in ("str", "path"):
        if isinstance(value, str):
            return Path(value) if kind == "path" else value
    elif kind == "interpolation":
        if isinstance(value, str) and value.lower() in INTERPOLATIONS:
            return value.lower()
    elif kind == "table":
        if isinstance(value, dict):
            return dict(value)
    elif kind == "resolution":
        return _resolution(value, where, problems, bad)
    elif kind == "range":
        if isinstance(value, (list, tuple)) and len(value) == 2 and all(
            _is_int(v) or isinstance(v, float) for v in value
        ):
            return (float(value[0]), float(value[1]))
    problems.add(where, bad)
    return None


def _resolution(value: Any, where: str, problems: _Problems, bad: str) -> tuple[int, int] | None:
    """`1024`, `[1024, 768]`, and on the command line `"1024"` or `"1024,768"`, as (width, height)."""
    if isinstance(value, str) and re.fullmatch(r"\s*\d+\s*(,\s*\d+\s*)?", value) and where.startswith("--"):
        value = [int(v) for v in value.split(",")]
    if _is_int(value) or (isinstance(value, float) and value.is_integer()):
        value = [int(value)] * 2
    if isinstance(value, (list, tuple)) and len(value) in (1, 2):
        vals = [int(v) if isinstance(v, float) and v.is_integer() else v for v in value]
        if all(_is_int(v) and v > 0 for v in vals):
            return (vals[0], vals[-1])
    problems.add(where, bad)
    return None


def _suggest(key: str, allowed: frozenset[str] | set[str]) -> str:
    match = difflib.get_close_matches(key, sorted(allowed), n=1, cutoff=0.6)
    return f" (did you mean {match[0]}?)" if match else ""


def _read_table(table: Any, level: str, where: str, problems: _Problems) -> dict[str, Any]:
    """Typed values of one general/dataset/subset table; unknown and misplaced keys are recorded as problems."""
    if not isinstance(table, dict):
        problems.add(where, f"expected a table, got {type(table).__name__}")
        return {}
    out: dict[str, Any] = {}
    allowed = {k for k, (_, levels, _) in _SCHEMA.items() if level in levels} | {
        a for a, k in _ALIASES.items() if level in _SCHEMA[k][1]
    }
    for raw_key, value in table.items():
        path = f"{where}.{raw_key}" if where else raw_key
        if level == _D and raw_key == "subsets":
            continue
        key = _ALIASES.get(raw_key, raw_key)
        if key in _REFUSED:
            problems.add(path, _REFUSED[key])
            continue
        if key not in _SCHEMA:
            problems.add(path, f"unknown key{_suggest(raw_key, allowed)}")
            continue
        kind, levels, _ = _SCHEMA[key]
        if level not in levels:
            home = "each [[datasets.subsets]]" if levels == _SUB else "[general] or [[datasets]]"
            problems.add(path, f"{raw_key} is not allowed here; set it in {home}")
            continue
        if key in out:
            problems.add(path, f"both {key} and its alias {raw_key} are set; keep one")
            continue
        typed = _coerce(kind, value, path, problems)
        if typed is not None:
            out[key] = typed
    return out


def _parse_file(path: Path) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DatasetError(f"{path}: cannot read the dataset config ({e.strerror}); check --dataset_config",
                           path=path) from e
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DatasetError(
            f"{path}: not UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start}); save the file as UTF-8", path=path
        ) from e
    suffix = path.suffix.lower()
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{path}: line {e.lineno}, column {e.colno}: {e.msg}; fix the JSON", path=path) from e
    elif suffix == ".toml":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise DatasetError(_toml_error_message(path, text, e), path=path) from e
    else:
        raise DatasetError(f"{path}: unsupported dataset config extension {suffix!r}; use .toml or .json", path=path)
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: the top level must be a table with [general] and [[datasets]]", path=path)
    return data


def _toml_error_message(path: Path, text: str, e: tomllib.TOMLDecodeError) -> str:
    msg = str(e)
    lines = text.splitlines() or [""]
    m = re.search(r"\(at line (\d+), column (\d+)\)", msg)
    line, col = (int(m.group(1)), int(m.group(2))) if m else (len(lines), len(lines[-1]) + 1)
    reason = re.sub(r"\s*\(at (line \d+, column \d+|end of document)\)", "", msg)
    src = lines[line - 1].strip() if 0 < line <= len(lines) else ""
    hint = "fix the TOML syntax"
    if "\\" in src and ("escape" in reason.lower() or "\\" in reason or "hex" in reason.lower()):
        hint = "write Windows paths in single quotes ('C:\\data\\images') or with forward slashes"
    return f"{path}: line {line}, column {col}: {reason}: `{src}`; {hint}"


def load_dataset_config(path: Path, defaults: DatasetDefaults) -> DatasetBlueprint:
    """Read a dataset TOML (or JSON, by extension) and resolve it against the command-line `defaults`.

    Raises one DatasetError listing every problem of the file (key path and hint for each); the list is also in
    the error's `problems` attribute.
    """
    path = Path(path)
    problems = _Problems(str(path))
    data = _parse_file(path)
    for top in data:
        if top == "validation":
            problems.add("validation", "there is no [validation] table (the guide is wrong); set validation_split = "
                         "0.1 and optionally validation_seed in [general] or [[datasets]]")
        elif top not in ("general", "datasets"):
            problems.add(top, f"unknown top-level key{_suggest(top, {'general', 'datasets'})}; only [general] "
                         "and [[datasets]] are allowed")
    general = _read_table(data.get("general", {}), _G, "general", problems)
    raw_datasets = data.get("datasets", [])
    if not isinstance(raw_datasets, list) or not raw_datasets:
        problems.add("datasets", "no [[datasets]] with [[datasets.subsets]]; add at least one")
        raw_datasets = []
    datasets = []
    for i, raw in enumerate(raw_datasets):
        where = f"datasets[{i}]"
        dataset_table = _read_table(raw, _D, where, problems)
        raw_subsets = raw.get("subsets", []) if isinstance(raw, dict) else []
        if not isinstance(raw_subsets, list) or not raw_subsets:
            problems.add(f"{where}.subsets", "no [[datasets.subsets]]; add one with image_dir")
            raw_subsets = []
        subset_tables = [_read_table(s, _S, f"{where}.subsets[{j}]", problems) for j, s in enumerate(raw_subsets)]
        built = _build_dataset(where, [dataset_table, general], subset_tables, defaults, problems)
        if built is not None:
            datasets.append(built)
    problems.raise_if_any(path)
    return DatasetBlueprint(tuple(datasets), prior_loss_weight=float(defaults.prior_loss_weight), source=path)


class _Resolver:
    """First value set among the given tables, then the command line, then the built-in default, with its origin."""

    def __init__(self, tables: list[tuple[str, dict[str, Any]]], defaults: DatasetDefaults, problems: _Problems):
        self.tables, self.defaults, self.problems = tables, defaults, problems

    def get(self, key: str) -> tuple[Any, str]:
        for where, table in self.tables:
            if table.get(key) is not None:
                return table[key], f"{where}.{key}" if where else key
        flag = _FLAG_NAMES.get(key, key)
        value = getattr(self.defaults, flag, None)
        if value is not None:
            kind = _SCHEMA[key][0]
            if isinstance(value, Path):
                value = str(value)
            if kind == "range" and isinstance(value, str):
                value = [float(v) for v in value.split(",")] if re.fullmatch(r"[\d.\s]+,[\d.\s]+", value) else value
            typed = _coerce(kind, value, f"--{flag}", self.problems)
            return typed, f"--{flag}"
        return _SCHEMA[key][2], f"{key} (default)"

    def value(self, key: str) -> Any:
        return self.get(key)[0]


def _build_dataset(
    where: str,
    upper: list[dict[str, Any]],
    subset_tables: list[dict[str, Any]],
    defaults: DatasetDefaults,
    problems: _Problems,
) -> DatasetConfig | None:
    labels = [where, "general"]
    res = _Resolver(list(zip(labels, upper, strict=True)), defaults, problems)
    subsets = []
    for j, table in enumerate(subset_tables):
        sres = _Resolver([(f"{where}.subsets[{j}]", table), *res.tables], defaults, problems)
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
    key: str, subsets: list[SubsetConfig], resolution: tuple[int, int], res: _Resolver
) -> DatasetConfig:
    names = {f.name for f in fields(DatasetConfig)} - {"key", "subsets", "resolution"}
    return DatasetConfig(key=key, subsets=tuple(subsets), resolution=resolution,
                         **{name: res.value(name) for name in names})


def _check_sizes(res: _Resolver, problems: _Problems) -> tuple[int, int] | None:
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
    return resolution if ok else None


def _nearest_multiple(v: int) -> int:
    return max(FLUX_MULTIPLE, (v + FLUX_MULTIPLE // 2) // FLUX_MULTIPLE * FLUX_MULTIPLE)


def _check_network_multiplier(res: _Resolver, problems: _Problems) -> None:
    value, where = res.get("network_multiplier")
    if value is not None and value != 1.0:
        problems.add(where, "sd-scripts reads network_multiplier but never applies it, and fluxlora does not "
                     "either; remove it (or train separate LoRAs)")


def _build_subset(where: str, table: dict[str, Any], res: _Resolver, problems: _Problems) -> SubsetConfig:
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
    names = {f.name for f in fields(SubsetConfig)} - {"key", "image_dir", "metadata_file", "caption_extension"}
    values = {name: res.value(name) for name in names}
    if values["custom_attributes"] is None:
        values["custom_attributes"] = {}
    if values["cache_info"]:
        logger.info("%s: cache_info is not needed: image sizes are read from file headers", where)
    return SubsetConfig(key=where, image_dir=image_dir, metadata_file=metadata_file, caption_extension=extension,
                        **values)


def blueprint_from_flags(defaults: DatasetDefaults) -> DatasetBlueprint:
    """The dataset sd-scripts builds without `--dataset_config`.

    `--train_data_dir` holds sub-folders named `<repeats>_<class tokens>` (DreamBooth style), `--reg_data_dir` the
    same for regularisation images; with `--in_json` the metadata file describes a fine-tuning dataset whose
    relative image paths are joined to `--train_data_dir`.
    """
    problems = _Problems("command line")
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
        sres = _Resolver([("", table)], defaults, problems)
        built.append(_build_subset(key, table, sres, problems))
    res = _Resolver([], defaults, problems)
    resolution = _check_sizes(res, problems)
    problems.raise_if_any(None)
    assert resolution is not None
    dataset = _dataset_config("command line", built, resolution, res)
    return DatasetBlueprint((dataset,), prior_loss_weight=float(defaults.prior_loss_weight), source=None)


def _repeat_folders(flag: str, folder: Path, is_reg: bool, problems: _Problems) -> list[tuple[str, dict[str, Any]]]:
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
