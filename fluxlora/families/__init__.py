"""Model families: the registry. Each family lives in its own folder and registers one `ModelFamily` instance.

`resolve_family` picks the family of a run: `--model_type` when it names one, otherwise the family that claims the
transformer file's header. Built-in families are imported on first use, so importing this package stays cheap.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from fluxlora.errors import ConfigError
from fluxlora.families.base import ModelFamily, ModelInfo

BUILTIN = ("fluxlora.families.flux1.family", "fluxlora.families.flux2.family", "fluxlora.families.chroma.family",
           "fluxlora.families.fill.family", "fluxlora.families.kontext.family")
_REGISTRY: dict[str, ModelFamily] = {}
_loaded = False


def register(family: ModelFamily) -> ModelFamily:
    """Add a family (a later one with the same name replaces the earlier: tests register toy families)."""
    _REGISTRY[family.name] = family
    return family


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def _load_builtin() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for module in BUILTIN:
            importlib.import_module(module)


def families() -> list[ModelFamily]:
    _load_builtin()
    return list(_REGISTRY.values())


def family_named(name: str) -> ModelFamily:
    """The family registered as `name` (a ModelInfo's `family`)."""
    _load_builtin()
    if name not in _REGISTRY:
        raise ConfigError(f"unknown model family {name!r}; known: {', '.join(sorted(_REGISTRY))}", key="--model_type")
    return _REGISTRY[name]


def model_types() -> list[str]:
    """Every `--model_type` value some family accepts."""
    return sorted({t for f in families() for t in f.model_types})


def resolve_family(path: Path, model_type: str | None, *, flag: str) -> tuple[ModelFamily, ModelInfo]:
    """The family and info of the transformer at `path`: the family `model_type` selects (its `inspect` then checks
    the file), or the one whose `claims` accepts the header."""
    from fluxlora.models.checkpoints import read_header

    known = families()
    if model_type is not None:
        chosen = [f for f in known if model_type in f.model_types]
        if not chosen:
            raise ConfigError(f"--model_type {model_type}: not a known model type; use one of "
                              f"{', '.join(model_types())}", key="--model_type")
        return chosen[0], chosen[0].inspect(Path(path), flag=flag)
    header_path = Path(path)
    if header_path.is_dir():  # a diffusers folder: its families inspect it themselves
        for family in known:
            try:
                return family, family.inspect(header_path, flag=flag)
            except Exception:  # noqa: BLE001 - try the next family; the first family's error is reported below
                continue
        return known[0], known[0].inspect(header_path, flag=flag)
    header = read_header(header_path, flag=flag)
    for family in known:
        if family.claims(header):
            return family, family.inspect(header_path, flag=flag)
    return known[0], known[0].inspect(header_path, flag=flag)  # its error names what is wrong with the file


__all__ = ["ModelFamily", "ModelInfo", "families", "family_named", "model_types", "register", "resolve_family",
           "unregister"]
