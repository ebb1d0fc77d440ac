"""Fault injection for the reliability tests: the `FLUXLORA_FAULT` environment variable.

Unset (always, outside tests) every hook returns at once and changes nothing. Set, it holds `;`-separated
`name=value` entries that make failures happen at named points, reproducibly and without mocks, also inside a
training subprocess:

    nan_loss=3,5-7       the loss of optimizer-step attempts 3, 5, 6 and 7 is NaN, so its gradients are NaN too
                         (the NaN guard must skip them); attempt n = steps taken + skipped attempts of the current
                         non-finite streak + 1, so `nan_loss=3` spoils one attempt and `nan_loss=3-9` a streak
    slow_write=0.05      every atomic file write sleeps this many seconds after writing its bytes and before the
                         rename into place, so a kill at a random moment lands inside a save
    disk_full=optimizer  an atomic write whose file name contains this text fails with ENOSPC after writing part
                         of its bytes (a full disk); `disk_full=*` fails every write
    step_file=/tmp/x     after each optimizer step (and its saves) the global step is written to this file, so a
                         parent process knows how far a training subprocess got
    step_delay=0.2       each optimizer step sleeps this many seconds at its end, so a browser test can press
                         buttons while a tiny run is still training

The hooks are called from `fluxlora.files.atomic_write` and the training loop (`fluxlora.training.trainer`).
"""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path
from typing import IO

import torch

ENV = "FLUXLORA_FAULT"


def _settings() -> dict[str, str]:
    raw = os.environ.get(ENV)
    if not raw:
        return {}
    out: dict[str, str] = {}
    for part in raw.split(";"):
        name, sep, value = part.strip().partition("=")
        if sep:
            out[name.strip()] = value.strip()
    return out


def _steps(spec: str) -> set[int]:
    steps: set[int] = set()
    for item in spec.split(","):
        first, _, last = item.strip().partition("-")
        if first:
            steps.update(range(int(first), int(last or first) + 1))
    return steps


def loss_for_step(loss: torch.Tensor, attempt: int) -> torch.Tensor:
    """The loss, or NaN (keeping the graph, so the gradients are NaN too) when `nan_loss` names `attempt`."""
    spec = _settings().get("nan_loss")
    if spec and attempt in _steps(spec):
        return loss * float("nan")
    return loss


def on_write(path: Path, handle: IO) -> None:
    """Called by atomic_write after the bytes are written to the temporary file, before flush and rename."""
    settings = _settings()
    if not settings:
        return
    target = settings.get("disk_full")
    if target and (target == "*" or target in path.name):
        handle.flush()
        os.ftruncate(handle.fileno(), max(0, handle.tell() // 2))  # a partial write, as a full disk leaves it
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    delay = settings.get("slow_write")
    if delay:
        time.sleep(float(delay))


def after_step(step: int) -> None:
    """Record the global step in `step_file` (written in place: only tests read it); sleep `step_delay`."""
    settings = _settings()
    target = settings.get("step_file")
    if target:
        Path(target).write_text(str(step), encoding="utf-8")
    delay = settings.get("step_delay")
    if delay:
        time.sleep(float(delay))


__all__ = ["ENV", "after_step", "loss_for_step", "on_write"]
