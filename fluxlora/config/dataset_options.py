"""Every dataset option, declared once: the dataset TOML key, its value kind, where the TOML may set it, its
sd-scripts default, the command-line flag that supplies it, its help, and the cache it rules out.

From this one table come
- the dataset flags of the training command line (`fluxlora.config.args`) and their `--help`,
- the dataset TOML schema (`fluxlora.config.dataset_schema`: kinds, levels, built-in defaults),
- `DatasetFlags` (the command-line dataset values of `TrainConfig`, also what the TOML resolves against),
- `SubsetConfig` / `DatasetConfig` (one resolved `[[datasets.subsets]]` / `[[datasets]]` entry),
- the caching rules (`cache_conflicts`): an option that changes pixels or captions per sample rules out the latent
  or text-encoder cache, whether it comes from a flag, the TOML or a subset.

Adding a dataset option is adding a row. A row with levels `()` is a command-line flag only; a row with
`flag=None` is a TOML key only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

INTERPOLATIONS = ("lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area", "box")
FLUX_MULTIPLE = 16  # 8x autoencoder downsampling, then 2x2 patches

# The levels a TOML key may be set at: [general], [[datasets]], [[datasets.subsets]].
GENERAL, DATASET, SUBSET = "general", "dataset", "subset"
ALL = (GENERAL, DATASET, SUBSET)  # subset options that [general] / [[datasets]] may set as defaults
DS = (GENERAL, DATASET)
SUB = (SUBSET,)
CLI = ()  # command line only

Cache = Literal["latents", "text"]


@dataclass(frozen=True)
class DatasetOption:
    """One dataset option (a row of `DATASET_OPTIONS`)."""

    name: str  # the TOML key; also the field name of SubsetConfig / DatasetConfig
    kind: str  # value kind, checked by `dataset_schema._coerce`: bool, int, pos_int, nonneg_int, float, ...
    levels: tuple[str, ...]  # where a dataset TOML may set it; () = command line only
    default: Any = None  # sd-scripts' default (TOML built-in default and the flag's sd-scripts default)
    flag: str | None = ""  # the command-line flag ("" = same as name, None = no flag)
    help: str = ""
    cache: Cache | None = None  # the cache this option makes wrong when it is on
    why: str = ""  # what it does per sample, for the caching message
    ours: bool = False  # a fluxlora flag (not in sd-scripts)
    fallback: bool = True  # the flag's value is the TOML's fallback (sd-scripts ignores some flags, e.g. this one)

    @property
    def flag_name(self) -> str | None:
        """The command-line flag (dest) of this option, or None."""
        return self.name if self.flag == "" else self.flag

    @property
    def fallback_flag(self) -> str | None:
        """The flag whose value a dataset TOML falls back to when it does not set this option, or None."""
        return self.flag_name if self.fallback else None


_TEXT = "text"
_LATENTS = "latents"

DATASET_OPTIONS: tuple[DatasetOption, ...] = (
    DatasetOption("dataset_config", "path", CLI, help="dataset TOML/JSON"),
    DatasetOption("train_data_dir", "path", CLI, help="folder of <repeats>_<class tokens> sub-folders"),
    DatasetOption("reg_data_dir", "path", CLI, help="regularisation images, same layout"),
    DatasetOption("in_json", "path", CLI, help="fine-tuning metadata JSON (images in --train_data_dir)"),
    DatasetOption("dataset_repeats", "pos_int", CLI, 1, help="repeats of the fine-tuning dataset"),
    DatasetOption("resolution", "resolution", DS, help="'size' or 'width,height' (multiples of 16)"),
    DatasetOption("batch_size", "pos_int", DS, 1, flag="train_batch_size", help="batch size"),
    DatasetOption("enable_bucket", "bool", DS, False, help="aspect-ratio bucketing"),
    DatasetOption("min_bucket_reso", "pos_int", DS, 256, help="smallest bucket side"),
    DatasetOption("max_bucket_reso", "pos_int", DS, 1024, help="largest bucket side"),
    DatasetOption("bucket_reso_steps", "pos_int", DS, 64, help="bucket granularity in pixels (multiple of 16)"),
    DatasetOption("bucket_no_upscale", "bool", DS, False, help="per-image buckets, never upscale"),
    DatasetOption("network_multiplier", "float", DS, 1.0, flag=None),
    DatasetOption("validation_split", "fraction", DS, 0.0, help="fraction held out (dataset TOML wins)"),
    DatasetOption("validation_seed", "int", DS, help="split shuffle and validation RNG seed"),
    DatasetOption("resize_interpolation", "interpolation", ALL, help="resize filter"),
    DatasetOption("num_repeats", "pos_int", ALL, 1, flag=None),
    DatasetOption("class_tokens", "str", ALL, flag=None),
    DatasetOption("caption_extension", "str", ALL, ".caption", help="caption file extension"),
    DatasetOption("shuffle_caption", "bool", ALL, False, help="shuffle separated tags",
                  cache=_TEXT, why="shuffles the tags every step"),
    DatasetOption("caption_separator", "str", ALL, ",", help="tag separator"),
    DatasetOption("keep_tokens", "nonneg_int", ALL, 0, help="leading tags kept in place"),
    DatasetOption("keep_tokens_separator", "str", ALL, "", help="marker between fixed and shuffled parts"),
    DatasetOption("secondary_separator", "str", ALL, help="intra-tag separator"),
    DatasetOption("enable_wildcard", "bool", ALL, False, help="{a|b} wildcards and multi-line captions",
                  cache=_TEXT, why="picks a random wildcard alternative every step"),
    DatasetOption("caption_prefix", "str", ALL, help="text put before every caption"),
    DatasetOption("caption_suffix", "str", ALL, help="text put after every caption"),
    DatasetOption("caption_dropout_rate", "fraction", ALL, 0.0, help="probability of an empty caption",
                  cache=_TEXT, why="drops captions at random"),
    DatasetOption("caption_dropout_every_n_epochs", "nonneg_int", ALL, 0, help="empty captions every N epochs",
                  cache=_TEXT, why="drops captions in some epochs"),
    DatasetOption("caption_tag_dropout_rate", "fraction", ALL, 0.0, help="per-tag drop probability",
                  cache=_TEXT, why="drops tags at random"),
    DatasetOption("token_warmup_min", "nonneg_int", ALL, 1, help="tag curriculum start"),
    DatasetOption("token_warmup_step", "nonneg_float", ALL, 0.0,
                  help="tag curriculum length (steps, or fraction if < 1)",
                  cache=_TEXT, why="changes the tag count during training"),
    DatasetOption("color_aug", "bool", ALL, False, help="hue/gamma jitter",
                  cache=_LATENTS, why="changes the pixels every step"),
    DatasetOption("flip_aug", "bool", ALL, False, help="random horizontal flips"),
    DatasetOption("random_crop", "bool", ALL, False, help="random instead of centred crop",
                  cache=_LATENTS, why="crops differently every step"),
    DatasetOption("face_crop_aug_range", "range", ALL, help="face-centred crop range 'a,b'"),
    DatasetOption("custom_attributes", "table", ALL, flag=None),
    DatasetOption("cache_info", "bool", ALL, False, help="cache captions and sizes in metadata_cache.json"),
    DatasetOption("image_dir", "path", SUB, flag=None),
    DatasetOption("metadata_file", "path", SUB, flag=None),
    DatasetOption("is_reg", "bool", SUB, False, flag=None),
    DatasetOption("alpha_mask", "bool", SUB, False, help="use the image alpha channel as loss mask"),
    DatasetOption("masked_loss", "bool", CLI, False, help="mask the loss with conditioning_data_dir images (dataset TOML)"),
    DatasetOption("conditioning_data_dir", "path", SUB, fallback=False,
                  help="images paired by file stem (Kontext references, Fill masks): only in the dataset TOML"),
    DatasetOption("prior_loss_weight", "float", CLI, 1.0, help="loss weight of regularisation images"),
    DatasetOption("max_data_loader_n_workers", "nonneg_int", CLI, 8, help="DataLoader workers"),
    DatasetOption("persistent_data_loader_workers", "bool", CLI, False, help="keep DataLoader workers between epochs"),
    DatasetOption("debug_dataset", "bool", CLI, False, help="sd-scripts' interactive dataset viewer"),
    DatasetOption("dataset_class", "str", CLI, help="custom dataset class"),
    DatasetOption("weighted_captions", "bool", CLI, False, help="A1111-style (word:1.2) caption weights"),
    DatasetOption("skip_bad_images", "bool", CLI, False, ours=True,
                  help="skip unreadable images with a warning instead of failing"),
)

OPTIONS: dict[str, DatasetOption] = {o.name: o for o in DATASET_OPTIONS}
FLAG_OPTIONS: dict[str, DatasetOption] = {o.flag_name: o for o in DATASET_OPTIONS if o.flag_name}  # type: ignore[misc]


# --------------------------------------------------------------------------------------- the typed classes

_PY_TYPES = {
    "bool": "bool", "int": "int | None", "pos_int": "int", "nonneg_int": "int", "float": "float",
    "nonneg_float": "float", "fraction": "float", "str": "str | None", "path": "Path | None",
    "interpolation": "str | None", "resolution": "tuple[int, int] | None", "range": "tuple[float, float] | None",
    "table": "dict[str, Any]",
}


def _field(option: DatasetOption) -> tuple[str, str, Any]:
    if option.kind == "table":
        return option.name, _PY_TYPES["table"], field(default_factory=dict)
    return option.name, _PY_TYPES[option.kind], field(default=option.default)


def _flag_field(option: DatasetOption) -> tuple[str, str, Any]:
    name, kind, default = _field(option)
    return option.flag_name or name, kind, default


# Command-line dataset values (sd-scripts flag names; the dataset TOML wins over them). After parsing, resolution
# is (W, H), caption_extension has its leading dot and paths are Path objects.
DatasetFlags = dataclasses.make_dataclass(
    "DatasetFlags", [_flag_field(o) for o in DATASET_OPTIONS if o.flag_name], frozen=True,
    namespace={"__doc__": "The command-line dataset values (flag names of `DATASET_OPTIONS`); the TOML wins.",
               "__module__": __name__},
)
DatasetDefaults = DatasetFlags  # its former name, as `load_dataset_config` / `blueprint_from_flags` take it

# Subset options resolved into SubsetConfig; face_crop_aug_range is refused when set, so it is not kept.
SUBSET_FIELDS = tuple(o for o in DATASET_OPTIONS if SUBSET in o.levels and o.name != "face_crop_aug_range"
                      and o.name not in ("image_dir", "metadata_file"))
# [[datasets]]-level options resolved into DatasetConfig (network_multiplier is checked, not kept).
DATASET_FIELDS = tuple(o for o in DATASET_OPTIONS if DATASET in o.levels and SUBSET not in o.levels
                       and o.name not in ("resolution", "batch_size", "network_multiplier"))


class _SubsetBase:
    @property
    def is_dreambooth(self) -> bool:
        return self.metadata_file is None  # type: ignore[attr-defined]

    @property
    def diff_output_preservation(self) -> bool:
        return bool(self.custom_attributes.get("diff_output_preservation", False))  # type: ignore[attr-defined]


SubsetConfig = dataclasses.make_dataclass(
    "SubsetConfig",
    [("key", "str"), ("image_dir", "Path | None"), ("metadata_file", "Path | None", field(default=None)),
     *[_field(o) for o in SUBSET_FIELDS]],
    bases=(_SubsetBase,), frozen=True,
    namespace={"__doc__": "One `[[datasets.subsets]]` entry with every setting resolved (subset -> dataset -> "
                          "general -> CLI); `key` names where it came from, e.g. \"datasets[0].subsets[1]\".",
               "__module__": __name__},
)


class _DatasetBase:
    @property
    def is_dreambooth(self) -> bool:
        return all(s.is_dreambooth for s in self.subsets)  # type: ignore[attr-defined]


DatasetConfig = dataclasses.make_dataclass(
    "DatasetConfig",
    [("key", "str"), ("subsets", "tuple[SubsetConfig, ...]"), ("resolution", "tuple[int, int]"),
     _field(OPTIONS["batch_size"]), _field(OPTIONS["resize_interpolation"]),
     *[_field(o) for o in DATASET_FIELDS]],
    bases=(_DatasetBase,), frozen=True,
    namespace={"__doc__": "One `[[datasets]]` entry: its own batch size, resolution and buckets; batches never mix "
                          "datasets.", "__module__": __name__},
)


def options_class(name: str, options: tuple[str, ...], *, module: str, doc: str) -> type:
    """A frozen dataclass with the given options as fields (types and defaults from the table), e.g. the
    caption settings of `fluxlora.data.captions`."""
    return dataclasses.make_dataclass(name, [_field(OPTIONS[o]) for o in options], frozen=True,
                                      namespace={"__doc__": doc, "__module__": module})


# --------------------------------------------------------------------------------------------- caching rules

class CacheConflict(NamedTuple):
    """An option that is on although a cache it rules out was asked for."""

    name: str  # the option (TOML key)
    flag: str  # the caching flag it conflicts with
    why: str  # what the option does per sample


CACHE_FLAGS: dict[Cache, str] = {"latents": "--cache_latents", "text": "--cache_text_encoder_outputs"}


def _value(options: Any, name: str) -> Any:
    return options.get(name) if isinstance(options, Mapping) else getattr(options, name, None)


def cache_conflicts(options: Any, *, cache_latents: bool, cache_text_encoder_outputs: bool) -> list[CacheConflict]:
    """The options (in table order) that are on in `options` — a mapping, DatasetFlags, SubsetConfig, CaptionOptions
    ... — and rule out a requested cache; "on" means true or above zero."""
    wanted = {"latents": cache_latents, "text": cache_text_encoder_outputs}
    return [CacheConflict(o.name, CACHE_FLAGS[o.cache], o.why) for o in DATASET_OPTIONS
            if o.cache is not None and wanted[o.cache] and _value(options, o.name)]


def text_cache_options() -> tuple[str, ...]:
    """The options that rule out a text-encoder output cache."""
    return tuple(o.name for o in DATASET_OPTIONS if o.cache == "text")


__all__ = [
    "ALL", "CACHE_FLAGS", "DATASET", "DATASET_OPTIONS", "DS", "FLAG_OPTIONS", "FLUX_MULTIPLE", "GENERAL",
    "INTERPOLATIONS", "OPTIONS", "SUB", "SUBSET",
    "CacheConflict", "DatasetConfig", "DatasetDefaults", "DatasetFlags", "DatasetOption", "SubsetConfig",
    "cache_conflicts", "options_class", "text_cache_options",
]
