"""Output file names and retention (spec §6.1), as pure functions of the settings and counters."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fluxlora.config.train_config import SavingSettings


@dataclass(frozen=True)
class OutputNames:
    """Where each kind of file goes; sd-scripts' names so existing scripts find them."""

    output_dir: Path
    output_name: str | None

    def epoch_file(self, epoch: int) -> Path:
        return self.output_dir / f"{self.output_name or 'epoch'}-{epoch:06d}.safetensors"

    def step_file(self, step: int) -> Path:
        return self.output_dir / f"{self.output_name or 'at'}-step{step:08d}.safetensors"

    def last_file(self, suffix: str = "") -> Path:
        return self.output_dir / f"{self.output_name or 'last'}{suffix}.safetensors"

    def epoch_state(self, epoch: int) -> Path:
        return self.output_dir / f"{self.output_name or 'epoch'}-{epoch:06d}-state"

    def step_state(self, step: int) -> Path:
        return self.output_dir / f"{self.output_name or 'at'}-step{step:08d}-state"

    def last_state(self) -> Path:
        return self.output_dir / f"{self.output_name or 'last'}-state"


def epoch_to_remove(epoch: int, every: int | None, keep_last: int | None) -> int | None:
    """The epoch whose file falls out of `--save_last_n_epochs` retention when `epoch` is saved."""
    if not every or not keep_last:
        return None
    old = epoch - every * keep_last
    return old if old > 0 else None


def step_to_remove(step: int, every: int | None, keep_last: int | None) -> int | None:
    """The step whose file falls out of `--save_last_n_steps` retention when `step` is saved (spec §6.1)."""
    if not every or not keep_last:
        return None
    old = step - keep_last - 1
    old -= old % every
    return old if old > 0 else None


def save_every_n_epochs(saving: SavingSettings, num_epochs: int) -> int | None:
    """`--save_every_n_epochs`, or `--save_n_epoch_ratio N` as floor(epochs / N) (at least 1)."""
    if saving.save_n_epoch_ratio:
        return max(1, num_epochs // saving.save_n_epoch_ratio)
    return saving.save_every_n_epochs


def should_save_epoch(epoch: int, num_epochs: int, every: int | None) -> bool:
    """Epoch files for epochs divisible by N, except the last (that one is the final file)."""
    return bool(every) and epoch % every == 0 and epoch < num_epochs


def should_save_step(step: int, saving: SavingSettings) -> bool:
    every = saving.save_every_n_steps
    return bool(every) and step % every == 0
