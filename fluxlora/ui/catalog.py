"""The files under the roots: folder listings for the pickers, and safetensors files identified by their headers
(kind, FLUX variant, dtype; a LoRA's training metadata) with the trainer's own readers. Nothing is loaded.
"""

from __future__ import annotations

import os
import threading
from collections import Counter
from pathlib import Path
from typing import Any

from fluxlora.errors import FluxLoraError
from fluxlora.ui.security import Roots

MAX_DEPTH = 4
MAX_FILES = 2000
LORA_SUMMARY_KEYS = ("ss_output_name", "ss_network_dim", "ss_network_alpha", "ss_steps", "ss_epoch",
                     "ss_learning_rate", "ss_num_train_images", "ss_resolution", "ss_base_model_version",
                     "modelspec.architecture", "modelspec.title", "ss_training_finished_at")

_cache: dict[tuple[str, float, int], dict[str, Any]] = {}
_cache_lock = threading.Lock()


def list_folder(roots: Roots, path: str | None) -> dict[str, Any]:
    """The roots (path None), or one folder's sub-folders and files (hidden names left out)."""
    if not path:
        return {"path": None, "parent": None,
                "entries": [{"name": str(r), "path": str(r), "dir": True} for r in roots.paths]}
    folder = roots.resolve(path, must_exist=True)
    if not folder.is_dir():
        raise FluxLoraError(f"{path}: not a folder", path=path)
    entries = []
    for entry in sorted(os.scandir(folder), key=lambda e: (not e.is_dir(), e.name.lower())):
        if entry.name.startswith("."):
            continue
        full = Path(entry.path)
        if not roots.contains(full):  # a symlink out of the roots is not shown (and would be refused)
            continue
        entries.append({"name": entry.name, "path": str(full), "dir": entry.is_dir(),
                        "size": entry.stat().st_size if entry.is_file() else None})
    parent = str(folder.parent) if folder not in roots.paths and roots.contains(folder.parent) else None
    return {"path": str(folder), "parent": parent, "entries": entries}


def safetensors_files(roots: Roots) -> list[Path]:
    """Every `.safetensors` file under the roots, `MAX_DEPTH` folders deep at most (hidden folders skipped)."""
    found: list[Path] = []
    for root in roots.paths:
        base_depth = len(root.parts)
        for folder, dirs, files in os.walk(root, followlinks=False):
            depth = len(Path(folder).parts) - base_depth
            dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if depth < MAX_DEPTH else []
            for name in sorted(files):
                if name.endswith(".safetensors") and not name.startswith("."):
                    path = Path(folder) / name
                    if roots.contains(path):
                        found.append(path)
                if len(found) >= MAX_FILES:
                    return found
    return found


def identify(path: Path) -> dict[str, Any]:
    """Kind, variant, main dtype and size of one safetensors file, from its header (cached by mtime and size)."""
    stat = path.stat()
    key = (str(path), stat.st_mtime, stat.st_size)
    with _cache_lock:
        if key in _cache:
            return _cache[key]
    from fluxlora.models.checkpoints import ModelKind, detect_kind, read_header
    from fluxlora.models.flux_loading import inspect_flux

    info: dict[str, Any] = {"path": str(path), "name": path.name, "size": stat.st_size}
    try:
        header = read_header(path)
        kind = detect_kind(header.tensors)
        counts = Counter(header.dtype_counts())
        info.update(kind=kind.value, dtype=counts.most_common(1)[0][0] if counts else None,
                    params=header.num_params)
        if kind in (ModelKind.FLUX, ModelKind.FLUX_DIFFUSERS):
            flux = inspect_flux(path, flag=None)
            info.update(variant=flux.variant, family="flux1",
                        blocks=f"{flux.params.depth} double + {flux.params.depth_single_blocks} single")
        if kind is ModelKind.LORA:
            info["metadata"] = {k: header.metadata[k] for k in LORA_SUMMARY_KEYS if k in header.metadata}
    except FluxLoraError as err:
        info.update(kind="unreadable", error=str(err))
    with _cache_lock:
        _cache[key] = info
    return info


def model_catalog(roots: Roots) -> list[dict[str, Any]]:
    return [identify(p) for p in safetensors_files(roots)]


__all__ = ["identify", "list_folder", "model_catalog", "safetensors_files"]
