"""Fault injection for the reliability tests, through the product's hooks (nothing of this ships in the package).

A fault spec holds `;`-separated `name=value` entries (the same strings the subprocess harness passes around):

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

A subprocess gets them with `python tests/reliability/faults.py SPEC <training flags>` (the trainer's command
line with the spec's hooks installed).

`Faults(spec)` turns a spec into the hooks: `write` for `fluxlora.files.WRITE_HOOKS`, `loss` for the trainer's
`loss_hook`, `step` for its step callbacks. `installed(spec)` adds the write hook for the duration of a block.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import torch

from fluxlora import files

ENV = "FLUXLORA_FAULT"  # how the subprocess harness hands a spec to its children


def parse(spec: str | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in (spec or "").split(";"):
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


class Faults:
    """The hooks of one fault spec (each is a no-op for the faults the spec does not name)."""

    def __init__(self, spec: str | None) -> None:
        self.settings = parse(spec)

    def loss(self, loss: torch.Tensor, attempt: int) -> torch.Tensor:
        """The loss, or NaN (keeping the graph, so the gradients are NaN too) when `nan_loss` names `attempt`."""
        spec = self.settings.get("nan_loss")
        if spec and attempt in _steps(spec):
            return loss * float("nan")
        return loss

    def write(self, path: Path, handle: IO) -> None:
        """After an atomic write's bytes, before its flush and rename."""
        target = self.settings.get("disk_full")
        if target and (target == "*" or target in path.name):
            handle.flush()
            os.ftruncate(handle.fileno(), max(0, handle.tell() // 2))  # a partial write, as a full disk leaves it
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        delay = self.settings.get("slow_write")
        if delay:
            time.sleep(float(delay))

    def step(self, _run: Any, step: int) -> None:
        """Record the global step in `step_file` (written in place: only tests read it)."""
        target = self.settings.get("step_file")
        if target:
            Path(target).write_text(str(step), encoding="utf-8")
        delay = self.settings.get("step_delay")
        if delay:
            time.sleep(float(delay))


@contextlib.contextmanager
def installed(spec: str | None) -> Iterator[Faults]:
    """The spec's write hook installed in `fluxlora.files` while the block runs."""
    faults = Faults(spec)
    files.WRITE_HOOKS.append(faults.write)
    try:
        yield faults
    finally:
        files.WRITE_HOOKS.remove(faults.write)


def train_main(argv: list[str], spec: str | None) -> int:
    """The command line's `main(argv)` with the faults of `spec` injected (what a harness child runs)."""
    from fluxlora.errors import guarded
    from fluxlora.training.cli import train

    def command() -> int:
        with installed(spec) as faults:
            train(argv, configure_logging=True, callbacks=[faults.step], loss_hook=faults.loss)
        return 0

    return guarded(command)


if __name__ == "__main__":
    import sys

    sys.exit(train_main(sys.argv[2:], sys.argv[1]))
