"""Typed errors. Library code raises these; only the command line turns them into exit codes.

Every message names the file, key or flag at fault and says what to do, on one line.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path


class FluxLoraError(Exception):
    """Base of every error fluxlora raises on purpose (bad input, bad settings, bad files)."""

    def __init__(self, message: str, *, path: str | Path | None = None, key: str | None = None):
        super().__init__(message)
        self.path = str(path) if path is not None else None
        self.key = key


class ConfigError(FluxLoraError):
    """A command-line flag, a --config_file value or a combination of settings is wrong."""


class DatasetError(FluxLoraError):
    """The dataset TOML, an image, a caption or a dataset folder is wrong."""


class CheckpointError(FluxLoraError):
    """A model, LoRA or state file is missing, of the wrong kind, truncated or does not fit."""


class CacheError(FluxLoraError):
    """A cache entry cannot be read or written."""


class TrainingError(FluxLoraError):
    """Training cannot continue (non-finite losses, a failed save, an interrupted run)."""


def guarded(command: Callable[[], int | None]) -> int:
    """Run a command-line entry point: a FluxLoraError becomes its one-line message on stderr and its exit code (2,
    or the error's own `exit_code`, e.g. 130 after SIGINT). The only place errors turn into exit codes."""
    try:
        return int(command() or 0)
    except FluxLoraError as err:
        print(f"error: {err}", file=sys.stderr)
        return int(getattr(err, "exit_code", 2))
