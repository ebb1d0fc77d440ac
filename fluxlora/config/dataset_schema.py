"""The dataset TOML/JSON schema, value types, precedence and file parsing behind `fluxlora.config.dataset`.

The keys, the level each may be set at (general, dataset, subset) and their built-in defaults come from the option
table (`fluxlora.config.dataset_options`); here are the checks that turn one raw TOML/JSON value into its typed value; the lookup of a setting
through subset -> dataset -> general -> command line -> default; and the reading of the file itself with
one-line errors that name the line and column. Problems are collected, not raised one by one, so the user
fixes the whole file in one go.
"""

from __future__ import annotations

import difflib
import json
import re
import tomllib
from pathlib import Path
from typing import Any

from fluxlora.config.dataset_options import (
    DATASET,
    DATASET_OPTIONS,
    FLUX_MULTIPLE,
    GENERAL,
    INTERPOLATIONS,
    SUBSET,
    DatasetFlags,
)
from fluxlora.errors import DatasetError

__all__ = ["DATASET", "FLUX_MULTIPLE", "GENERAL", "INTERPOLATIONS", "SUBSET", "Problems", "Resolver", "parse_file",
           "read_table", "suggest"]

# key -> (kind, levels, built-in default) of every key a dataset TOML may set, from the option table.
_SCHEMA: dict[str, tuple[str, frozenset[str], Any]] = {
    o.name: (o.kind, frozenset(o.levels), o.default) for o in DATASET_OPTIONS if o.levels
}
_SUB = frozenset({SUBSET})
# musubi-tuner's name for the paired-image folder
_ALIASES = {"interpolation_type": "resize_interpolation", "control_directory": "conditioning_data_dir"}
# Keys sd-scripts knows that we refuse, with the reason and what to do instead.
_REFUSED: dict[str, str] = {}
# Settings whose command-line fallback has another name (batch_size <- --train_batch_size); None: no fallback.
_FLAG_NAMES = {o.name: o.fallback_flag for o in DATASET_OPTIONS if o.fallback_flag != o.name}
_EXPECTED = {
    "bool": "true or false", "int": "an integer", "pos_int": "an integer >= 1", "nonneg_int": "an integer >= 0",
    "float": "a number", "nonneg_float": "a number >= 0", "fraction": "a number between 0 and 1",
    "str": "a string", "path": "a path string", "table": "a table",
    "interpolation": "one of " + ", ".join(INTERPOLATIONS),
    "resolution": "an integer or [width, height]", "range": "[low, high] numbers",
}


class Problems:
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


def _coerce(kind: str, value: Any, where: str, problems: Problems) -> Any:
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


def _resolution(value: Any, where: str, problems: Problems, bad: str) -> tuple[int, int] | None:
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


def suggest(key: str, allowed: frozenset[str] | set[str]) -> str:
    """` (did you mean X?)` for the closest allowed key, or an empty string."""
    match = difflib.get_close_matches(key, sorted(allowed), n=1, cutoff=0.6)
    return f" (did you mean {match[0]}?)" if match else ""


def read_table(table: Any, level: str, where: str, problems: Problems) -> dict[str, Any]:
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
        if level == DATASET and raw_key == "subsets":
            continue
        key = _ALIASES.get(raw_key, raw_key)
        if key in _REFUSED:
            problems.add(path, _REFUSED[key])
            continue
        if key not in _SCHEMA:
            problems.add(path, f"unknown key{suggest(raw_key, allowed)}")
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


class Resolver:
    """First value set among the given tables, then the command line, then the built-in default, with its origin."""

    def __init__(self, tables: list[tuple[str, dict[str, Any]]], defaults: DatasetFlags, problems: Problems):
        self.tables, self.defaults, self.problems = tables, defaults, problems

    def get(self, key: str) -> tuple[Any, str]:
        for where, table in self.tables:
            if table.get(key) is not None:
                return table[key], f"{where}.{key}" if where else key
        flag = _FLAG_NAMES.get(key, key)
        value = getattr(self.defaults, flag) if flag is not None else None
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


def parse_file(path: Path) -> dict[str, Any]:
    """The top-level table of a UTF-8 `.toml` or `.json` dataset config; raises DatasetError naming the fault."""
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

