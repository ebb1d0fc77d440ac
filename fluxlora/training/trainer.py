"""The schedule of a run: epochs, optimizer steps (`step.train_step`), saves, samples, validation and stop signals.

The step itself lives in `step.py`; this module decides when things happen, and nothing else.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fluxlora.data.loader import make_dataloader, set_epoch
from fluxlora.errors import TrainingError
from fluxlora.training.control import RunControl
from fluxlora.training.evaluation import sample_images, validation_loss_of
from fluxlora.training.logs import LossRecorder, plot_losses
from fluxlora.training.outputs import epoch_to_remove, should_save_epoch, should_save_step, step_to_remove
from fluxlora.training.saving import remove_dir, remove_file, save_lora, save_training_state
from fluxlora.training.setup import Run
from fluxlora.training.step import train_step

logger = logging.getLogger(__name__)

SIGNAL_REPEAT_S = 2.0  # under torchrun, a repeated stop signal within this time is the same request
NAN_ADVICE = ("usual causes: --mixed_precision fp16 on FLUX (use bf16), a learning rate that is too high, "
              "or fp8 base weights with Prodigy/D-Adaptation")


class TrainingInterrupted(TrainingError):
    """SIGINT/SIGTERM: the run stopped cleanly after saving; exit code 130/143 like a killed process."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


StepCallback = Callable[[Run, int], None]
"""Called as `callback(run, global_step)` after each optimizer step (after logging and any scheduled save,
sample or validation); its own time is not counted in `TrainResult.step_seconds`."""

LossHook = Callable[[Tensor, int], Tensor]
"""Called as `hook(loss, attempt)` on each micro-batch's loss before backward; returns the loss to use. `attempt`
counts optimizer-step attempts (steps taken + skipped attempts of the current non-finite streak + 1). Tests inject
faults with it (a NaN loss)."""


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)
    validation: list[tuple[int, float]] = field(default_factory=list)
    final_lora: Path | None = None
    global_step: int = 0
    saved: list[Path] = field(default_factory=list)
    # Wall time of each optimizer step of this call, in order: from the end of the previous one (or the start of
    # the loop) to the end of this one, so data loading, forward, backward, clipping, the optimizer, logging and
    # scheduled saves are all in it; step callbacks are not. A skipped (non-finite) step's time goes to the next.
    # On a GPU, work still queued when a step ends is counted in the next step (the next loss read waits for it).
    step_seconds: list[float] = field(default_factory=list)


class Trainer:
    """Runs the schedule over a built `Run`. `callbacks` are step-end hooks (`StepCallback`), e.g. a progress
    reporter or a benchmark's probe; `loss_hook` (`LossHook`) sees every micro-batch loss."""

    def __init__(self, run: Run, callbacks: Sequence[StepCallback] = (), loss_hook: LossHook | None = None):
        self.run = run
        self.plan = run.plan
        self.cfg = run.plan.cfg
        self.result = TrainResult()
        self.loss_hook = loss_hook
        self.stop_signal: int | None = None
        self._first_signal_at = 0.0  # time.monotonic() of the stop request
        self.recorder = LossRecorder(window=max(1, run.plan.data.num_batches_per_epoch))
        # control channel (fluxlora.training.control): the run's event log, and sample/save/stop commands acted on
        # after each step, as the last step callback (so its time is not a step's)
        self.control = RunControl(self)
        self.callbacks: tuple[StepCallback, ...] = (*callbacks, self.control.after_step)

    @property
    def counters(self):
        return self.run.counters

    # ---- the schedule --------------------------------------------------------------------------------------------
    def train(self) -> TrainResult:
        run, cfg, plan = self.run, self.cfg, self.plan
        c, procs = run.counters, run.processes
        accum = cfg.training.gradient_accumulation_steps
        self.result.losses = list(c.loss_history)
        loader = make_dataloader(
            plan.data, c.epoch or 1, seed=plan.seed, num_workers=cfg.dataset_flags.max_data_loader_n_workers,
            persistent_workers=cfg.dataset_flags.persistent_data_loader_workers, start_batch=c.batch_in_epoch,
            latent_cache=run.latent_cache, text_cache=run.text_cache, gradient_accumulation_steps=accum,
            max_train_steps=plan.schedule.max_train_steps, num_processes=procs.count, process_index=procs.index,
        )
        # freeze() left the transformer in eval mode, and blocks are only checkpointed in training mode; FLUX has no
        # dropout or batch norm, so nothing else changes. Validation and sampling run under no_grad.
        run.models.transformer.train()
        self._install_signal_handlers()
        progress = _progress(plan.schedule.max_train_steps, c.global_step, enabled=procs.is_main)
        if cfg.sampling.sample_at_first and c.global_step == 0:
            self.sample(epoch=0, step=0)
        # With n processes, process p trains batches p, p + n, ... of each epoch's list (padded to whole rows):
        # a "row" of n batches is one micro-step of all processes together; `accum` rows make an optimizer step.
        num_batches = plan.data.num_batches_per_epoch
        rows = math.ceil(num_batches / procs.count)
        start_epoch = max(1, c.epoch)
        step_start = time.perf_counter()
        try:
            for epoch in range(start_epoch, plan.schedule.num_epochs + 1):
                if epoch != start_epoch:
                    c.batch_in_epoch = 0
                c.epoch = epoch
                set_epoch(loader, epoch, c.batch_in_epoch)
                group: list[dict[str, Any]] = []
                for row, batch in enumerate(loader, start=math.ceil(c.batch_in_epoch / procs.count)):
                    group.append(batch)
                    c.batch_in_epoch = min((row + 1) * procs.count, num_batches)
                    if (row + 1) % accum != 0 and row + 1 != rows:
                        continue
                    stepped = self._step(group, epoch, progress)
                    group = []
                    if stepped:
                        self.result.step_seconds.append(time.perf_counter() - step_start)
                        for callback in self.callbacks:
                            callback(run, c.global_step)
                        step_start = time.perf_counter()
                    if c.global_step >= plan.schedule.max_train_steps or self.stop_signal is not None:
                        break
                if self.stop_signal is not None:
                    self._interrupt()
                if c.batch_in_epoch < num_batches:
                    break  # stopped inside the epoch (max steps): it has no end, and a resume continues it
                self._end_of_epoch(epoch)
                if c.global_step >= plan.schedule.max_train_steps:
                    break
        finally:
            progress.close()
            self._restore_signal_handlers()
        self._finish()
        return self.result

    def _step(self, batches: list[dict[str, Any]], epoch: int, progress: Any) -> bool:
        """One optimizer step and what follows it; False when it was skipped (non-finite)."""
        run, cfg, c = self.run, self.cfg, self.run.counters
        on_loss = None
        if self.loss_hook is not None:
            attempt = c.global_step + c.nan_streak + 1
            on_loss = lambda loss: self.loss_hook(loss, attempt)  # noqa: E731
        result = train_step(self.plan, run.models, run.trainable, run.processes, batches, epoch=epoch,
                            agree=self._agree, on_loss=on_loss)
        if not result.stepped:
            c.nan_streak += 1
            paths = [p for batch in batches for p in batch["image_paths"]]
            logger.warning("step %d: non-finite loss or gradient (loss %s, grad norm %s) — optimizer step skipped; "
                           "batch images: %s", c.global_step + 1, result.loss, result.grad_norm, ", ".join(paths))
            if c.nan_streak >= cfg.training.max_nan_steps:
                path = self.save_lora(self.plan.outputs.last_file("-nan-stopped"))
                raise TrainingError(
                    f"{c.nan_streak} optimizer steps in a row had a non-finite loss or gradient; stopped at step "
                    f"{c.global_step} and saved the last good LoRA to {path}; {NAN_ADVICE}", key="--max_nan_steps")
            return False
        c.nan_streak = 0
        c.global_step += 1
        c.loss_history.append(result.loss)
        self.result.losses.append(result.loss)
        self.recorder.add(result.loss)
        self.log({**result.logs, "loss/average": self.recorder.moving_average}, step=c.global_step)
        progress.update(1)
        lr = next(iter(run.trainable.lr_logs().values()), 0.0)
        progress.set_postfix(loss=f"{result.loss:.4f}", avr_loss=f"{self.recorder.moving_average:.4f}", lr=f"{lr:.2e}")
        self._on_step_end()
        return True

    def _agree(self, loss: float) -> float:
        """One small all-reduce per optimizer step: the loss as the mean over processes (what is logged and
        recorded, equal on every process) and any stop signal, so all processes stop after the same step."""
        procs = self.run.processes
        if procs.count == 1:
            return loss
        flags = [float(self.stop_signal == sig) for sig in (signal.SIGINT, signal.SIGTERM)]
        total = procs.sum(torch.tensor([loss, *flags], dtype=torch.float64))
        if self.stop_signal is None and float(total[1:].sum()) > 0:
            self.stop_signal = signal.SIGINT if float(total[1]) > 0 else signal.SIGTERM
            self._first_signal_at = time.monotonic()
            logger.warning("another process received %s: stopping after this step",
                           signal.Signals(self.stop_signal).name)
        return float(total[0]) / procs.count

    def _on_step_end(self) -> None:
        cfg, step, names = self.cfg, self.run.counters.global_step, self.plan.outputs
        saving = cfg.saving
        if should_save_step(step, saving) and step < self.plan.schedule.max_train_steps:
            self._save_checkpoint(names.step_file(step), names.step_state(step))
            old = step_to_remove(step, saving.save_every_n_steps, saving.save_last_n_steps)
            if old is not None:
                remove_file(self.run, names.step_file(old))
            old_state = step_to_remove(step, saving.save_every_n_steps,
                                       saving.save_last_n_steps_state or saving.save_last_n_steps)
            if old_state is not None:
                remove_dir(self.run, names.step_state(old_state))
        if cfg.sampling.sample_every_n_steps and not cfg.sampling.sample_every_n_epochs \
                and step % cfg.sampling.sample_every_n_steps == 0:
            self.sample(epoch=None, step=step)
        if cfg.validation.validate_every_n_steps and step % cfg.validation.validate_every_n_steps == 0:
            self.validate(step)

    def _end_of_epoch(self, epoch: int) -> None:
        cfg, c, names, schedule = self.cfg, self.run.counters, self.plan.outputs, self.plan.schedule
        self.log({"loss/epoch_average": self.recorder.end_epoch()}, step=epoch)
        per_epoch = self.plan.data.num_batches_per_epoch
        c.batch_in_epoch = per_epoch
        if should_save_epoch(epoch, schedule.num_epochs, schedule.save_every_n_epochs):
            # the state of an epoch boundary resumes at the first batch of the next epoch
            c.epoch, c.batch_in_epoch = epoch + 1, 0
            self._save_checkpoint(names.epoch_file(epoch), names.epoch_state(epoch), epoch=epoch)
            c.epoch, c.batch_in_epoch = epoch, per_epoch
            old = epoch_to_remove(epoch, schedule.save_every_n_epochs, cfg.saving.save_last_n_epochs)
            if old is not None:
                remove_file(self.run, names.epoch_file(old))
            old_state = epoch_to_remove(epoch, schedule.save_every_n_epochs,
                                        cfg.saving.save_last_n_epochs_state or cfg.saving.save_last_n_epochs)
            if old_state is not None:
                remove_dir(self.run, names.epoch_state(old_state))
        if cfg.sampling.sample_every_n_epochs and epoch % cfg.sampling.sample_every_n_epochs == 0:
            self.sample(epoch=epoch, step=c.global_step)
        every = cfg.validation.validate_every_n_epochs
        if self.plan.data.num_validation_images > 0 and (every is None or epoch % every == 0):
            self.validate(c.global_step, epoch=epoch)

    # ---- validation, sampling, saving (training/evaluation.py, training/saving.py) ---------------------------------
    def validate(self, step: int, epoch: int | None = None) -> None:
        """The validation loss (spec §9), recorded and logged; every process scores its share."""
        if self.plan.data.num_validation_images == 0:
            return
        value = validation_loss_of(self.run)
        self.result.validation.append((step, value))
        key = "epoch_average" if epoch is not None else "step_average"
        self.log({f"loss/validation/{key}": value}, step=epoch if epoch is not None else step)
        logger.info("validation loss at step %d: %.6f", step, value)

    def sample(self, *, epoch: int | None, step: int) -> None:
        """Sample images with the prompt file (spec §8); a no-op without --sample_prompts."""
        sample_images(self.run, epoch=epoch, step=step)

    def save_lora(self, path: Path, *, epoch: int | None = None, finished: bool = False) -> Path:
        """The LoRA as it is now, with the run's metadata (main process only)."""
        return save_lora(self.run, path, epoch=epoch, finished=finished)

    def _save_checkpoint(self, lora_path: Path, state_dir: Path, *, epoch: int | None = None) -> None:
        self.result.saved.append(self.save_lora(lora_path, epoch=epoch))
        if self.cfg.saving.save_state:
            self.save_training_state(state_dir)

    def save_training_state(self, state_dir: Path) -> None:
        """A resumable state (every process calls this; the main process writes)."""
        if save_training_state(self.run, state_dir):
            self.result.saved.append(state_dir)

    def log(self, values: dict[str, float], *, step: int) -> None:
        if self.cfg.logging.log_with:
            self.run.processes.accelerator.log(values, step=step)

    def _finish(self) -> None:
        run, cfg, c = self.run, self.cfg, self.run.counters
        final = self.save_lora(self.plan.outputs.last_file(), finished=True)
        self.result.final_lora, self.result.global_step = final, c.global_step
        self.result.saved.append(final)
        if cfg.saving.save_state or cfg.saving.save_state_on_train_end:
            self.save_training_state(self.plan.outputs.last_state())
        if run.processes.is_main and self.result.losses:
            plot_losses(cfg.saving.output_dir / "loss.png", self.result.losses, validation=self.result.validation)
        if cfg.logging.log_with:
            run.processes.accelerator.end_training()
        run.processes.wait()  # no process leaves before the main one has written everything

    # ---- signals ---------------------------------------------------------------------------------------------------
    def _install_signal_handlers(self) -> None:
        self._previous: dict[int, Any] = {}

        def handler(signum: int, _frame: Any) -> None:
            now = time.monotonic()
            if self.stop_signal is not None:
                # Under torchrun (accelerate launch) a Ctrl-C reaches a worker twice: from the terminal and
                # forwarded by the launcher. There only a later, second signal means "leave at once".
                window = SIGNAL_REPEAT_S if os.environ.get("TORCHELASTIC_RUN_ID") else 0.0
                if now - self._first_signal_at > window:
                    raise KeyboardInterrupt
                return
            self.stop_signal, self._first_signal_at = signum, now
            logger.warning("received %s: finishing the current step, then saving and stopping",
                           signal.Signals(signum).name)

        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread (e.g. inside a test runner thread)
                pass

    def _restore_signal_handlers(self) -> None:
        for sig, previous in getattr(self, "_previous", {}).items():
            signal.signal(sig, previous)

    def _interrupt(self) -> None:
        c, signum = self.run.counters, self.stop_signal or signal.SIGINT
        if self.cfg.saving.save_state:
            state = self.plan.outputs.last_state()
            self.save_training_state(state)
            how = f"resume with --resume {state}"
        else:
            how = "add --save_state to be able to resume; the LoRA so far is saved"
        path = self.save_lora(self.plan.outputs.last_file("-interrupted"))
        raise TrainingInterrupted(
            f"training interrupted by {signal.Signals(signum).name} at step {c.global_step}; saved {path}; {how}",
            signum)


def _progress(total: int, initial: int, *, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc="steps", smoothing=0.1,
                mininterval=0.5 if sys.stderr.isatty() else 10.0)


__all__ = ["LossHook", "StepCallback", "Trainer", "TrainResult", "TrainingInterrupted"]
