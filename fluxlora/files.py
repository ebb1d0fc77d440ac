"""Crash-safe writes: every durable file is written to a temporary name in its folder, flushed and renamed.

A reader never sees a half-written file under its final name, and a failed write (full disk, kill -9)
leaves the previous version intact.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO

import torch

from fluxlora.errors import FluxLoraError

WriteHook = Callable[[Path, IO], None]
WRITE_HOOKS: list[WriteHook] = []
"""Called by `atomic_write` as `hook(path, handle)` after the bytes are written to the temporary file, before the
flush and rename. Empty in normal use; reliability tests add hooks that slow a write down or make it fail (a full
disk) at that moment."""


def _fsync_dir(directory: Path) -> None:
    # The rename is only durable once the directory entry is on disk.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside `path`; on success fsync it and rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; final files get the usual permissions
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            for hook in WRITE_HOOKS:
                hook(path, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise FluxLoraError(
            f"could not write {path}: {err.strerror or err}; the previous file (if any) is unchanged — "
            "free disk space or choose another folder",
            path=path,
        ) from err
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_safetensors(path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> None:
    """Write a safetensors file atomically (contiguous CPU copies, string metadata only)."""
    from safetensors.torch import save

    data = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    payload = save(data, metadata=dict(metadata) if metadata else None)
    with atomic_write(path) as handle:
        handle.write(payload)


def write_text(path: str | Path, text: str) -> None:
    """Write a UTF-8 text file atomically."""
    with atomic_write(path, "w") as handle:
        handle.write(text)


def remove_stale_temp_files(directory: str | Path) -> int:
    """Delete leftovers of interrupted atomic writes and state saves (`.<name>.<random>.tmp` files and folders) in
    `directory`; return how many."""
    import shutil

    directory = Path(directory)
    count = 0
    if directory.is_dir():
        for tmp in directory.glob(".*.tmp"):
            with contextlib.suppress(OSError):
                if tmp.is_dir() and not tmp.is_symlink():
                    shutil.rmtree(tmp)
                else:
                    tmp.unlink()
                count += 1
    return count
