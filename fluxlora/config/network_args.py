"""`--network_args` for `networks.lora_flux`: parsed once into a typed, validated `NetworkArgs`.

sd-scripts reads these lazily from a `k=v` string list, accepts only the exact string "True" for booleans and
silently ignores unknown keys (spec §12.23). Here every key of spec §5.3 is parsed up front; an unknown key, a
duplicated key or a bad value is a `ConfigError` naming the key and saying what is accepted.

Regex rules (`network_reg_dims`, `network_reg_lrs`) follow the documented semantics (not sd-scripts' code, spec
§12.24): rules are tried in the order given and the **last** matching pattern wins; they only refine modules that the
block/type selection (`train_blocks`, `train_*_block_indices`, a family dim of 0) has kept.
"""

from __future__ import annotations

import difflib
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from fluxlora.config.adapter_args import (
    LORA_FLUX_KEYS,
    LYCORIS_KEYS,
    LYCORIS_MODULE,
    AdapterSpec,
    check_combination,
    parse_adapter_spec,
)
from fluxlora.errors import ConfigError

logger = logging.getLogger(__name__)

FLAG = "--network_args"

#: Per-family rank keys in sd-scripts' resolution order (first matching family applies).
TYPE_DIM_KEYS: tuple[str, ...] = (
    "img_attn_dim", "txt_attn_dim", "img_mlp_dim", "txt_mlp_dim", "img_mod_dim", "txt_mod_dim", "single_dim", "single_mod_dim",
)
#: `in_dims` order: rank of each input layer family.
IN_DIM_LAYERS: tuple[str, ...] = ("img_in", "time_in", "vector_in", "guidance_in", "txt_in")

_BOOL_KEYS = ("split_qkv", "train_t5xxl", "verbose")
_FLOAT_KEYS = ("rank_dropout", "module_dropout", "dropout", "ggpo_sigma", "ggpo_beta",
               "loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio", "conv_alpha")
VALID_KEYS: tuple[str, ...] = (
    *TYPE_DIM_KEYS, "in_dims", "train_double_block_indices", "train_single_block_indices", "train_blocks",
    "network_reg_dims", "network_reg_lrs", *_BOOL_KEYS, *_FLOAT_KEYS, "conv_dim",
)

#: The keys `--network_module lycoris.kohya` accepts: LyCORIS' own plus the dropouts, LoRA+, T5 and verbose.
LYCORIS_VALID_KEYS: tuple[str, ...] = (
    *LYCORIS_KEYS, "conv_dim", "conv_alpha", "rank_dropout", "module_dropout", "dropout", "loraplus_lr_ratio",
    "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio", "train_t5xxl", "verbose",
)

_TRUE = ("true", "1", "yes")
_FALSE = ("false", "0", "no")


@dataclass(frozen=True)
class BlockSelection:
    """Which blocks of one kind get LoRA modules: `indices is None` means all of them."""

    indices: frozenset[int] | None = None
    text: str = "all"

    def check(self, count: int, key: str) -> None:
        """Fail if an index is outside the model's real block count (pruned models have fewer than 19/38)."""
        if self.indices is None:
            return
        bad = sorted(i for i in self.indices if i >= count)
        if bad:
            raise ConfigError(
                f"{FLAG} {key}={self.text}: block index {bad[0]} is out of range, this model has {count} blocks "
                f"(valid 0-{count - 1})", key=key)

    def __contains__(self, index: int) -> bool:
        return self.indices is None or index in self.indices


@dataclass(frozen=True)
class RegexRule:
    """One `pattern=value` entry of `network_reg_dims` / `network_reg_lrs` (matched with `re.search`)."""

    pattern: re.Pattern[str]
    value: float

    @property
    def text(self) -> str:
        return self.pattern.pattern


def last_match(rules: Sequence[RegexRule], name: str) -> tuple[int, RegexRule] | None:
    """The last rule whose pattern is found in `name` (documented semantics: later rules override earlier ones)."""
    found = None
    for index, rule in enumerate(rules):
        if rule.pattern.search(name):
            found = (index, rule)
    return found


@dataclass(frozen=True)
class NetworkArgs:
    """Every `--network_args` key of spec §5.3, typed. `raw` keeps the strings for `ss_network_args`."""

    type_dims: Mapping[str, int] = field(default_factory=dict)  # only the keys given
    in_dims: tuple[int, int, int, int, int] | None = None
    train_double_block_indices: BlockSelection = BlockSelection()
    train_single_block_indices: BlockSelection = BlockSelection()
    train_blocks: str = "all"
    network_reg_dims: tuple[RegexRule, ...] = ()
    network_reg_lrs: tuple[RegexRule, ...] = ()
    split_qkv: bool = False
    train_t5xxl: bool = False
    verbose: bool = False
    rank_dropout: float | None = None
    module_dropout: float | None = None
    dropout: float | None = None
    ggpo_sigma: float | None = None
    ggpo_beta: float | None = None
    loraplus_lr_ratio: float | None = None
    loraplus_unet_lr_ratio: float | None = None
    loraplus_text_encoder_lr_ratio: float | None = None
    conv_dim: int | None = None
    conv_alpha: float | None = None
    adapter: AdapterSpec = field(default_factory=AdapterSpec)
    raw: Mapping[str, str] = field(default_factory=dict)

    @property
    def ggpo(self) -> bool:
        return self.ggpo_sigma is not None and self.ggpo_beta is not None

    @property
    def unet_plus_ratio(self) -> float | None:
        """LoRA+ ratio for DiT modules: the specific ratio overrides the general one."""
        return self.loraplus_unet_lr_ratio if self.loraplus_unet_lr_ratio is not None else self.loraplus_lr_ratio

    @property
    def text_encoder_plus_ratio(self) -> float | None:
        return (self.loraplus_text_encoder_lr_ratio if self.loraplus_text_encoder_lr_ratio is not None
                else self.loraplus_lr_ratio)


def _bad(key: str, value: str, expected: str) -> ConfigError:
    return ConfigError(f"{FLAG} {key}={value!r}: {expected}", key=key)


def _parse_bool(key: str, value: str) -> bool:
    low = value.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise _bad(key, value, "expected a boolean (true/True/1 or false/False/0)")


def _parse_int(key: str, value: str, *, minimum: int = 0) -> int:
    try:
        number = int(value.strip())
    except ValueError:
        raise _bad(key, value, f"expected a whole number ≥ {minimum}") from None
    if number < minimum:
        raise _bad(key, value, f"expected a whole number ≥ {minimum}")
    return number


def _parse_float(key: str, value: str) -> float:
    try:
        number = float(value.strip())
    except ValueError:
        raise _bad(key, value, "expected a number") from None
    if number != number or number in (float("inf"), float("-inf")):
        raise _bad(key, value, "expected a finite number")
    if key in ("rank_dropout", "module_dropout", "dropout"):
        if not 0.0 <= number < 1.0:
            raise _bad(key, value, "a dropout probability must be in [0, 1)")
    elif number < 0 or (number == 0 and key.startswith("loraplus")):
        raise _bad(key, value, "expected a positive number" if key.startswith("loraplus") else "expected a number ≥ 0")
    return number


def _parse_in_dims(key: str, value: str) -> tuple[int, int, int, int, int]:
    text = value.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 5:
        raise _bad(key, value, f"expected exactly 5 ranks for {', '.join(IN_DIM_LAYERS)}, e.g. in_dims=[4,2,2,2,4]")
    return tuple(_parse_int(key, p) for p in parts)  # type: ignore[return-value]


def parse_block_indices(key: str, value: str) -> BlockSelection:
    """`all`, `none`/empty, or a comma list of 0-based indices and `a-b` ranges (inclusive)."""
    text = value.strip()
    low = text.lower()
    if low == "all":
        return BlockSelection(None, "all")
    if low in ("none", ""):
        return BlockSelection(frozenset(), "none")
    indices: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)\s*-\s*(\d+)", part)
        if m:
            start, end = int(m.group(1)), int(m.group(2))
            if start > end:
                raise _bad(key, value, f"range {part!r} runs backwards; write it as {end}-{start}")
            indices.update(range(start, end + 1))
        elif re.fullmatch(r"\d+", part):
            indices.add(int(part))
        else:
            raise _bad(key, value, "expected all, none, or 0-based indices and ranges like 0,1,4-5,7")
    return BlockSelection(frozenset(indices), text)


def _parse_rules(key: str, value: str, *, integer: bool) -> tuple[RegexRule, ...]:
    rules = []
    for part in value.split(","):
        part = part.strip()
        if not part:
            continue
        if "=" not in part:
            raise _bad(key, value, f"entry {part!r} must be regex=value, e.g. {key}=double_blocks_0_.*=8")
        pattern, number = part.rsplit("=", 1)
        try:
            compiled = re.compile(pattern.strip())
        except re.error as err:
            raise _bad(key, value, f"pattern {pattern!r} is not a valid regular expression ({err})") from None
        if integer:
            rules.append(RegexRule(compiled, _parse_int(key, number)))
        else:
            rate = _parse_float(key, number)
            rules.append(RegexRule(compiled, rate))
    if not rules:
        raise _bad(key, value, "expected at least one regex=value entry")
    return tuple(rules)


def _items(network_args: Sequence[str] | Mapping[str, object] | None) -> list[tuple[str, str]]:
    if network_args is None:
        return []
    if isinstance(network_args, Mapping):
        return [(str(k).strip(), str(v)) for k, v in network_args.items()]
    items = []
    for entry in network_args:
        if not isinstance(entry, str) or "=" not in entry:
            raise ConfigError(f"{FLAG} {entry!r}: each entry must be key=value, e.g. {FLAG} \"split_qkv=True\"", key=str(entry))
        key, value = entry.split("=", 1)
        items.append((key.strip(), value))
    return items


def parse_network_args(
    network_args: Sequence[str] | Mapping[str, object] | None,
    *,
    network_dropout: float | None = None,
    network_module: str | None = None,
) -> NetworkArgs:
    """Parse and validate `--network_args` (a list of `k=v` strings, or a dict from a config file).

    `network_module` `lycoris.kohya` takes LyCORIS' keys (`algo`, `factor`, `preset`, ...; see
    `fluxlora.config.adapter_args`); `networks.lora_flux` (the default) takes sd-scripts' keys plus `dora_wd` and
    `wd_on_output`.

    `network_dropout` (from `--network_dropout`) is the neuron dropout actually used, as in sd-scripts; it is also
    recorded as `dropout` in `raw` (hence in `ss_network_args`) when the list has no `dropout` key.
    """
    lycoris = network_module == LYCORIS_MODULE
    valid = LYCORIS_VALID_KEYS if lycoris else (*VALID_KEYS, *LORA_FLUX_KEYS)
    adapter_keys = LYCORIS_KEYS if lycoris else LORA_FLUX_KEYS
    values: dict[str, object] = {}
    type_dims: dict[str, int] = {}
    raw: dict[str, str] = {}
    for key, value in _items(network_args):
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            module = network_module or "networks.lora_flux"
            raise ConfigError(f"{FLAG} {key!r} is not a known key of {module}; {hint}valid keys: {', '.join(valid)}",
                              key=key)
        if key in raw:
            raise ConfigError(f"{FLAG} {key!r} is given twice ({raw[key]!r} and {value!r}); keep one", key=key)
        raw[key] = value
        if key in adapter_keys:
            continue  # parsed below into the AdapterSpec
        if key in TYPE_DIM_KEYS:
            type_dims[key] = _parse_int(key, value)
        elif key == "in_dims":
            values[key] = _parse_in_dims(key, value)
        elif key in ("train_double_block_indices", "train_single_block_indices"):
            values[key] = parse_block_indices(key, value)
        elif key == "train_blocks":
            choice = value.strip().lower()
            if choice not in ("all", "single", "double"):
                raise _bad(key, value, "expected all, single or double")
            values[key] = choice
        elif key == "network_reg_dims":
            values[key] = _parse_rules(key, value, integer=True)
        elif key == "network_reg_lrs":
            values[key] = _parse_rules(key, value, integer=False)
        elif key in _BOOL_KEYS:
            values[key] = _parse_bool(key, value)
        elif key in _FLOAT_KEYS:
            values[key] = _parse_float(key, value)
        elif key == "conv_dim":
            values[key] = _parse_int(key, value)

    if network_dropout is not None:
        if not 0.0 <= float(network_dropout) < 1.0:
            raise ConfigError(f"--network_dropout {network_dropout}: a dropout probability must be in [0, 1)",
                              key="network_dropout")
        if "dropout" in values and values["dropout"] != float(network_dropout):
            logger.warning("%s dropout=%s is overridden by --network_dropout %s", FLAG, raw["dropout"], network_dropout)
        values["dropout"] = float(network_dropout)
        raw.setdefault("dropout", str(network_dropout))
    if ("ggpo_sigma" in values) != ("ggpo_beta" in values):
        given, missing = ("ggpo_sigma", "ggpo_beta") if "ggpo_sigma" in values else ("ggpo_beta", "ggpo_sigma")
        raise ConfigError(f"{FLAG} {given} is set but {missing} is not; LoRA-GGPO needs both (e.g. "
                          "ggpo_sigma=0.03 ggpo_beta=0.01)", key=missing)
    if "conv_dim" in values or "conv_alpha" in values:
        logger.warning("%s conv_dim/conv_alpha have no effect: FLUX has no Conv2d layers", FLAG)
    adapter = parse_adapter_spec({k: raw[k] for k in adapter_keys if k in raw}, lycoris=lycoris,
                                 parse_bool=_parse_bool, parse_int=_parse_int)
    loraplus = any(k.startswith("loraplus") for k in values)
    check_combination(adapter, dropout=values.get("dropout"), split_qkv=bool(values.get("split_qkv")),  # type: ignore[arg-type]
                      ggpo="ggpo_sigma" in values, loraplus=loraplus)
    return NetworkArgs(type_dims=type_dims, raw=raw, adapter=adapter, **values)  # type: ignore[arg-type]
