"""`--config_file` (flattened TOML of flags, the command line wins) and `--output_config` (write one).

Read as sd-scripts reads it: table names are discarded, keys are flag names without `--`, a path without the `.toml`
suffix gets it added, a key that is no flag changes nothing. So a GUI's own bookkeeping keys (`gui_keys.GUI_KEYS`)
are accepted silently, accelerate's spellings of values are understood (`dynamo_backend = "no"`), and any other
unknown key is a warning with a did-you-mean — an error with `--strict`. Unlike sd-scripts, duplicated keys and
wrongly typed values are errors that name the key and the file, and `--output_config` never overwrites a file.
"""

from __future__ import annotations

import argparse
import difflib
import math
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from fluxlora.config.args import FluxArgumentParser, build_parser, flag_actions, parse_given
from fluxlora.config.gui_keys import GUI_KEYS, MOVED_KEYS, accelerate_value
from fluxlora.config.unsupported import IGNORED_FOR_FLUX
from fluxlora.errors import ConfigError

# Never written by --output_config: they describe the run of the writer itself, or are secrets.
_NOT_WRITTEN = ("config_file", "output_config", "wandb_api_key", "huggingface_token")


def config_path(value: str | Path) -> Path:
    """The file `--config_file value` names: `.toml` is appended when missing (sd-scripts' rule)."""
    path = Path(value)
    return path if path.suffix == ".toml" else path.with_name(path.name + ".toml")


def _flatten(data: Mapping[str, Any], path: Path) -> tuple[dict[str, Any], list[str]]:
    flat: dict[str, Any] = {}
    where: dict[str, str] = {}
    problems: list[str] = []
    for name, value in data.items():
        items = value.items() if isinstance(value, dict) else [(name, value)]
        table = f"[{name}]" if isinstance(value, dict) else "the top level"
        for key, item in items:
            if isinstance(item, dict):
                problems.append(f"{key} in {table} is a table; {path.name} may nest flags one table deep only")
            elif key in flat:
                problems.append(f"{key} is set twice ({where[key]} and {table}); keep one")
            else:
                flat[key], where[key] = item, table
    return flat, problems


def _coerce_scalar(action: argparse.Action, value: Any) -> Any:
    """Convert one TOML value to what argparse would have produced for this flag, or raise ValueError."""
    kind = action.type
    if isinstance(value, bool) and kind is not None:
        raise ValueError(f"expected {getattr(kind, '__name__', 'a value')}, got a boolean")
    if kind is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, int):
            return value
        raise ValueError(f"expected an integer, got {value!r}")
    if kind is float:
        if isinstance(value, (int, float)):
            return float(value)
        raise ValueError(f"expected a number, got {value!r}")
    if kind is str:
        if isinstance(value, (str, int, float)):
            return str(value)
        raise ValueError(f"expected a string, got {value!r}")
    try:  # custom parsers (int_or_float, int_or_auto) take the text form
        return kind(str(value))
    except (argparse.ArgumentTypeError, TypeError, ValueError) as err:
        raise ValueError(str(err)) from None


def coerce_config_value(action: argparse.Action, value: Any) -> Any:
    """A --config_file value as the flag's parsed value; raises ValueError with the reason.

    sd-scripts sets the raw value on its namespace, so a switch also takes 0 / 1 (GUIs write integers), and
    accelerate's spellings of a value (`gui_keys.ACCELERATE_SPELLINGS`) are taken as they are.
    """
    if action.nargs == 0:  # store_true
        if isinstance(value, int) and not isinstance(value, bool) and value in (0, 1):
            value = bool(value)
        if not isinstance(value, bool):
            raise ValueError(f"expected true or false, got {value!r}")
        return True if value else None  # false is the flag's absence
    spelled, value = accelerate_value(action.dest, value)
    if spelled:
        return value
    if action.dest == "resolution" and isinstance(value, list) and len(value) == 2:
        value = f"{value[0]},{value[1]}"
    if action.nargs in ("*", "+"):
        items = value if isinstance(value, list) else [value]
        result = [_coerce_scalar(action, v) for v in items]
    elif isinstance(value, list):
        raise ValueError(f"expected one value, got a list {value!r}")
    else:
        result = _coerce_scalar(action, value)
    for item in result if isinstance(result, list) else [result]:
        if action.choices is not None and item not in action.choices and action.dest not in IGNORED_FOR_FLUX:
            allowed = ", ".join(str(c) for c in action.choices if c is not None)
            raise ValueError(f"{item!r} is not one of {allowed}")
    return result


class ConfigFile(NamedTuple):
    """What a --config_file holds: the flag values, and the keys that are no flag (with a hint each)."""

    values: dict[str, Any]
    unknown: list[str]  # "unknown key epochs (did you mean ...?)": warnings, errors under --strict


def _unknown_key(key: str, known: list[str]) -> str:
    if key in MOVED_KEYS:
        return f"unknown key {key}: it is no flag of flux_train_network.py; write {MOVED_KEYS[key]} instead"
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]}?" if close else "keys are flag names without --"
    return f"unknown key {key} ({hint})"


def read_config_file(value: str | Path, parser: FluxArgumentParser | None = None) -> ConfigFile:
    """Read a --config_file TOML into {flag dest: parsed value} plus its unknown keys.

    Keys GUIs are known to write (`gui_keys.GUI_KEYS`) are dropped silently. A malformed file, a duplicated key,
    a wrongly typed value or a key that sets the config file itself is a ConfigError listing every such problem.
    """
    path = config_path(value)
    if not path.is_file():
        raise ConfigError(f"--config_file {path} does not exist; check the path", path=path, key="--config_file")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"--config_file {path} is not valid TOML: {err}", path=path, key="--config_file") from None
    flat, problems = _flatten(data, path)
    actions = flag_actions(parser or build_parser())
    values: dict[str, Any] = {}
    unknown: list[str] = []
    first_key = None
    for key, item in flat.items():
        if key in GUI_KEYS:
            continue
        if key not in actions:
            unknown.append(_unknown_key(key, list(actions)))
            continue
        if key in ("config_file", "output_config"):
            problems.append(f"{key} cannot be set inside a config file")
            first_key = first_key or key
            continue
        try:
            coerced = coerce_config_value(actions[key], item)
        except ValueError as err:
            problems.append(f"{key}: {err}")
            first_key = first_key or key
            continue
        if coerced is not None:
            values[key] = coerced
    if problems:
        raise ConfigError(f"--config_file {path}: " + "; ".join(problems), path=path, key=first_key)
    return ConfigFile(values, [f"--config_file {path}: {u}" for u in unknown])


def load_config_file(value: str | Path, parser: FluxArgumentParser | None = None) -> dict[str, Any]:
    """The flag values of a --config_file (see `read_config_file`; its unknown keys are left to the caller)."""
    return read_config_file(value, parser).values


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, (str, Path)):
        text = str(value)
        escaped = "".join(
            {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\t": "\\t", "\r": "\\r"}.get(ch)
            or (f"\\u{ord(ch):04x}" if ord(ch) < 0x20 or ord(ch) == 0x7F else ch)
            for ch in text
        )
        return f'"{escaped}"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def dumps_toml(values: Mapping[str, Any]) -> str:
    """Flat `key = value` TOML for strings, numbers, booleans and lists of them (all --output_config needs)."""
    return "".join(f"{key} = {_toml_value(value)}\n" for key, value in values.items())


def write_output_config(argv: Sequence[str]) -> Path:
    """`--output_config`: write the flags given on the command line to the --config_file path; never overwrite.

    Returns the written path. Secrets (wandb_api_key, huggingface_token) are left out.
    """
    parser = build_parser()
    given = parse_given(argv, parser)
    if "config_file" not in given:
        raise ConfigError("--output_config needs --config_file PATH to write to", key="--output_config")
    path = config_path(given["config_file"])
    if path.exists():
        raise ConfigError(
            f"--output_config: {path} already exists; choose another --config_file or delete it first",
            path=path, key="--config_file",
        )
    values = {k: v for k, v in given.items() if k not in _NOT_WRITTEN}
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "x", encoding="utf-8") as f:  # "x": a file that appeared meanwhile is not overwritten
        f.write(dumps_toml(values))
    return path


def maybe_write_output_config(argv: Sequence[str]) -> Path | None:
    """If argv has --output_config, write the file and return its path (the caller then exits); else None."""
    if "--output_config" not in argv:
        return None
    return write_output_config(argv)
