"""Prompt files for sample images (`--sample_prompts`, `fluxlora generate --from_file`), spec §8.

Three formats, chosen by extension:
- `.txt`: one prompt per non-empty line not starting with `#`, with inline flags split on `" --"` (case-insensitive
  names): `--w N` width, `--h N` height, `--d N` seed, `--s N` steps (clamped to 1..1000), `--l F` CFG scale,
  `--g F` embedded guidance, `--n TEXT` negative prompt, `--ci PATH` control image (FLUX.1 Kontext: the reference;
  FLUX.1 Fill: the image to paint into), `--mi PATH` mask image (FLUX.1 Fill: white = paint; musubi-tuner's names).
  `--ss --cn --ctr --rcfg --fs` are read and ignored (they have no meaning for FLUX, as in sd-scripts).
- `.json`: a list whose items are such lines (strings) or tables with the keys below.
- `.toml`: a `[prompt]` table of shared keys and an array `[[prompt.subset]]`; a subset's key overrides the shared
  one (sd-scripts raises there, spec §12.28).
Table keys (sd-scripts names): `prompt`, `negative_prompt`, `width`, `height`, `seed`, `sample_steps`, `scale` (CFG),
`guidance_scale` (embedded guidance), `control_image`, `mask_image`; `controlnet_image` and `sample_sampler` are
ignored. Image paths are relative to the current directory (as sd-scripts reads every path) and must exist.

Unlike sd-scripts, nothing is silently skipped: an unknown flag or key, a bad value, an unknown extension or a file
without prompts is a ConfigError naming the file, the line or item, and the fix.
"""

from __future__ import annotations

import difflib
import json
import logging
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from fluxlora.errors import ConfigError

logger = logging.getLogger(__name__)

FLAG = "--sample_prompts"
DEFAULT_WIDTH = DEFAULT_HEIGHT = 512
DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 3.5
DEFAULT_CFG_SCALE = 1.0
SIZE_MULTIPLE, MIN_SIZE = 16, 64
MAX_STEPS = 1000
EXTENSIONS = (".txt", ".json", ".toml")


@dataclass(frozen=True)
class SamplePrompt:
    """One image to generate. `seed` None means a fresh random seed each time it is sampled."""

    prompt: str
    negative_prompt: str = ""
    width: int = DEFAULT_WIDTH
    height: int = DEFAULT_HEIGHT
    seed: int | None = None
    steps: int = DEFAULT_STEPS
    guidance: float = DEFAULT_GUIDANCE
    cfg_scale: float = DEFAULT_CFG_SCALE
    control_image: str | None = None  # Kontext: the reference image; Fill: the image to paint into
    mask_image: str | None = None  # Fill: white = the region to paint


FIELD_NAMES = tuple(f.name for f in fields(SamplePrompt))


# ------------------------------------------------------------------------------------------ value parsing


def round_size(value: int) -> int:
    """Round an image side down to a multiple of 16, at least 64 (spec §8)."""
    return max(MIN_SIZE, value - value % SIZE_MULTIPLE)


def clamp_steps(value: int) -> int:
    return max(1, min(MAX_STEPS, value))


def _as_int(value: Any, what: str, where: str) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"{where}: {what} {value!r} is not a whole number", key=what)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
        return int(value.strip())
    raise ConfigError(f"{where}: {what} {value!r} is not a whole number; write e.g. 512", key=what)


def _as_float(value: Any, what: str, where: str) -> float:
    if isinstance(value, bool):
        raise ConfigError(f"{where}: {what} {value!r} is not a number", key=what)
    try:
        result = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {what} {value!r} is not a number; write e.g. 3.5", key=what) from None
    if result != result or result in (float("inf"), float("-inf")):
        raise ConfigError(f"{where}: {what} {value!r} must be a finite number", key=what)
    return result


def _as_text(value: Any, what: str, where: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ConfigError(f"{where}: {what} must be text, got {type(value).__name__} {value!r}", key=what)
    return value


def _size(value: Any, what: str, where: str) -> int:
    n = _as_int(value, what, where)
    if n <= 0:
        raise ConfigError(f"{where}: {what} {n} must be positive", key=what)
    rounded = round_size(n)
    if rounded != n:
        logger.info("%s: %s %d rounded to %d (a multiple of 16, at least 64)", where, what, n, rounded)
    return rounded


def _seed(value: Any, what: str, where: str) -> int:
    n = _as_int(value, what, where)
    if not 0 <= n < 2**64:
        raise ConfigError(f"{where}: {what} {n} must be between 0 and 2**64 - 1", key=what)
    return n


def _image_path(value: Any, what: str, where: str) -> str:
    text = _as_text(value, what, where).strip()
    if not text:
        raise ConfigError(f"{where}: {what} needs an image path", key=what)
    if not Path(text).is_file():
        raise ConfigError(f"{where}: {what} {text}: file not found (relative paths start from the current "
                          "directory)", path=text, key=what)
    return text


# field name -> converter(value, what, where)
_CONVERTERS: dict[str, Callable[[Any, str, str], Any]] = {
    "prompt": _as_text,
    "negative_prompt": _as_text,
    "width": _size,
    "height": _size,
    "seed": _seed,
    "steps": lambda v, what, where: clamp_steps(_as_int(v, what, where)),
    "guidance": _as_float,
    "cfg_scale": _as_float,
    "control_image": _image_path,
    "mask_image": _image_path,
}

# ----------------------------------------------------------------------------------------- inline flags

INLINE_FLAGS = {"w": "width", "h": "height", "d": "seed", "s": "steps", "l": "cfg_scale", "g": "guidance",
                "n": "negative_prompt", "ci": "control_image", "mi": "mask_image"}
IGNORED_INLINE_FLAGS = frozenset({"ss", "cn", "ctr", "rcfg", "fs"})


def split_inline_flags(line: str, separator: str = " --") -> tuple[str, list[tuple[str, str]]]:
    """Split `a cat --w 768 --n blurry` into ("a cat", [("w", "768"), ("n", "blurry")]); flag names lower-cased."""
    parts = line.split(separator)
    flags = []
    for part in parts[1:]:
        name, _, value = part.strip().partition(" ")
        flags.append((name.lower(), value.strip()))
    return parts[0].strip(), flags


def _unknown(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def parse_prompt_line(line: str, *, where: str = "prompt") -> dict[str, Any]:
    """The fields a text prompt line sets: {"prompt": ..., "width": ..., ...} (only those present)."""
    prompt, flags = split_inline_flags(line)
    out: dict[str, Any] = {"prompt": prompt}
    for name, value in flags:
        if name in IGNORED_INLINE_FLAGS:
            logger.info("%s: --%s %s has no effect on FLUX sampling; ignored", where, name, value)
            continue
        if name not in INLINE_FLAGS:
            known = [*INLINE_FLAGS, *IGNORED_INLINE_FLAGS]
            raise ConfigError(
                f"{where}: unknown inline flag --{name}{_unknown(name, known)}; use --w --h --d --s --l --g --n --ci --mi "
                "(write ' - ' instead of ' --' inside prompt text)", key=f"--{name}")
        if name != "n" and not value:
            raise ConfigError(f"{where}: inline flag --{name} needs a value, e.g. --{name} 512", key=f"--{name}")
        field_name = INLINE_FLAGS[name]
        out[field_name] = _CONVERTERS[field_name](value, f"--{name}", where)
    return out


# --------------------------------------------------------------------------------------------- tables

TABLE_KEYS = {"prompt": "prompt", "negative_prompt": "negative_prompt", "width": "width", "height": "height",
              "seed": "seed", "sample_steps": "steps", "scale": "cfg_scale", "guidance_scale": "guidance",
              "control_image": "control_image", "mask_image": "mask_image"}
IGNORED_TABLE_KEYS = frozenset({"controlnet_image", "sample_sampler"})


def parse_prompt_table(table: Mapping[str, Any], *, where: str = "prompt") -> dict[str, Any]:
    """The fields a JSON/TOML prompt table sets, keyed by SamplePrompt field names."""
    out: dict[str, Any] = {}
    for key, value in table.items():
        if key in IGNORED_TABLE_KEYS:
            logger.info("%s: key %r has no effect on FLUX sampling; ignored", where, key)
            continue
        if key not in TABLE_KEYS:
            known = [*TABLE_KEYS, *IGNORED_TABLE_KEYS]
            raise ConfigError(f"{where}: unknown key {key!r}{_unknown(key, known)}; known keys: {', '.join(TABLE_KEYS)}",
                              key=key)
        field_name = TABLE_KEYS[key]
        out[field_name] = _CONVERTERS[field_name](value, key, where)
    if "prompt" not in out:
        raise ConfigError(f"{where}: no 'prompt' key; every prompt table needs prompt = \"...\"", key="prompt")
    return out


# ---------------------------------------------------------------------------------------------- files


def _read_text(path: Path, flag: str) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ConfigError(f"{flag} {path}: file not found; check the path", path=path, key=flag) from None
    except IsADirectoryError:
        raise ConfigError(f"{flag} {path}: is a folder; pass a .txt, .json or .toml prompt file",
                          path=path, key=flag) from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{flag} {path}: not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8",
                          path=path, key=flag) from None
    except OSError as err:
        raise ConfigError(f"{flag} {path}: cannot read ({err.strerror or err})", path=path, key=flag) from None


def _from_txt(path: Path, text: str, flag: str) -> list[dict[str, Any]]:
    items = []
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            items.append(parse_prompt_line(stripped, where=f"{path}:{number}"))
    return items


def _from_json(path: Path, text: str, flag: str) -> list[dict[str, Any]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{flag} {path}: invalid JSON at line {err.lineno} column {err.colno} ({err.msg})",
                          path=path, key=flag) from None
    if not isinstance(data, list):
        raise ConfigError(f"{flag} {path}: the JSON must be a list of prompts (strings or objects), got "
                          f"{type(data).__name__}", path=path, key=flag)
    items = []
    for i, item in enumerate(data):
        where = f"{path}: item {i}"
        if isinstance(item, str):
            items.append(parse_prompt_line(item.strip(), where=where))
        elif isinstance(item, dict):
            items.append(parse_prompt_table(item, where=where))
        else:
            raise ConfigError(f"{where}: expected a string or an object, got {type(item).__name__}",
                              path=path, key=flag)
    return items


def _from_toml(path: Path, text: str, flag: str) -> list[dict[str, Any]]:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{flag} {path}: invalid TOML ({err}); each key may appear only once per table",
                          path=path, key=flag) from None
    extra = sorted(set(data) - {"prompt"})
    if extra:
        raise ConfigError(f"{flag} {path}: unknown top-level key(s) {extra}; put shared keys under [prompt] and each "
                          "image under [[prompt.subset]]", path=path, key=extra[0])
    table = data.get("prompt")
    subsets = table.get("subset") if isinstance(table, dict) else None
    if not isinstance(subsets, list) or not subsets or not all(isinstance(s, dict) for s in subsets):
        raise ConfigError(f"{flag} {path}: needs a [prompt] table and at least one [[prompt.subset]] table "
                          "(one per image)", path=path, key="prompt.subset")
    shared = {k: v for k, v in table.items() if k != "subset"}
    # A subset's key overrides the shared one (sd-scripts raises a TypeError here, spec §12.28).
    return [parse_prompt_table({**shared, **subset}, where=f"{path}: [[prompt.subset]] {i}")
            for i, subset in enumerate(subsets)]


_READERS = {".txt": _from_txt, ".json": _from_json, ".toml": _from_toml}


def load_prompt_file(path: str | Path, *, defaults: SamplePrompt | Mapping[str, Any] | None = None,
                     flag: str = FLAG) -> list[SamplePrompt]:
    """Read a .txt / .json / .toml prompt file into SamplePrompts.

    Keys a prompt does not set come from `defaults` (a SamplePrompt or a field mapping; spec §8's 512×512, 20 steps,
    guidance 3.5, CFG 1.0 and a random seed when None). Sizes are rounded down to multiples of 16 (min 64).
    `flag` names the option in error messages.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in _READERS:
        raise ConfigError(f"{flag} {path}: unknown prompt-file extension {path.suffix or '(none)'!r}; use .txt (one "
                          "prompt per line), .json or .toml", path=path, key=flag)
    items = _READERS[suffix](path, _read_text(path, flag), flag)
    if not items:
        raise ConfigError(f"{flag} {path}: holds no prompts (empty lines and # comments are skipped); add at least "
                          "one prompt", path=path, key=flag)
    return [make_prompt(item, defaults) for item in items]


def make_prompt(item: Mapping[str, Any], defaults: SamplePrompt | Mapping[str, Any] | None = None) -> SamplePrompt:
    """A SamplePrompt from parsed fields over `defaults` (whose sizes are rounded like the file's)."""
    if isinstance(defaults, SamplePrompt):
        base = defaults
    else:
        base = SamplePrompt(**{"prompt": "", **dict(defaults or {})})
        base = replace(base, width=round_size(base.width), height=round_size(base.height))
    return replace(base, **dict(item))
