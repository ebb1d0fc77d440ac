"""What a run writes: its LoRA with the run's metadata, its resumable state, and the retention deletes (spec §6).
The main process writes; every process takes part in gathering the RNG states of a state save."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from fluxlora.training.metadata import lora_metadata
from fluxlora.training.optim import eval_mode
from fluxlora.training.state import save_state

if TYPE_CHECKING:
    from fluxlora.training.setup import Run

logger = logging.getLogger(__name__)


def save_lora(run: Run, path: Path, *, epoch: int | None = None, finished: bool = False) -> Path:
    """The LoRA as it is now (schedule-free: its averaged weights) with the run's metadata; main process only.
    `epoch` defaults to the current one."""
    if not run.processes.is_main:
        return path
    from fluxlora.network.saving import save_dtype

    c, t = run.counters, run.trainable
    metadata = lora_metadata(run.plan, run.facts, steps=c.global_step, epoch=epoch or c.epoch,
                             network_args=dict(t.network.args.raw), finished=finished)
    with eval_mode(t.optimizer):
        t.network.save(path, save_dtype(run.plan.cfg.precision.save_precision), metadata)
    logger.info("saved %s", path)
    return path


def save_training_state(run: Run, state_dir: Path) -> bool:
    """A resumable state folder. Every process calls this (the RNG states of all are gathered); only the main
    process writes, and says so by returning True."""
    rng_states = run.processes.gather_rng_states()
    if not run.processes.is_main:
        return False
    t = run.trainable
    save_state(state_dir, network_params=t.network.state_dict(), optimizer=t.optimizer, scheduler=t.scheduler,
               counters=run.counters, fingerprint=run.fingerprint, scaler=t.scaler, rng_states=rng_states)
    return True


def remove_file(run: Run, path: Path) -> None:
    """Retention: an older LoRA file goes (main process)."""
    if run.processes.is_main and path.exists():
        path.unlink()
        logger.info("removed %s (retention)", path)


def remove_dir(run: Run, path: Path) -> None:
    """Retention: an older state folder goes (main process). Renamed first (atomic), then deleted: a crash mid-delete
    never leaves a half-deleted folder that still looks complete under its final name."""
    if run.processes.is_main and path.is_dir():
        doomed = path.with_name(f".{path.name}.removing.tmp")
        shutil.rmtree(doomed, ignore_errors=True)
        path.rename(doomed)
        shutil.rmtree(doomed)
        logger.info("removed %s (retention)", path)
