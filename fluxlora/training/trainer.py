"""The training loop, and nothing else: get batch, encode (or read cache), loss, backward, step, then save,
sample and validate on schedule. Every piece it calls is a module that is tested on its own.
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

from fluxlora.config.train_config import TrainConfig
from fluxlora.data.loader import make_dataloader, set_epoch
from fluxlora.errors import TrainingError
from fluxlora.training import faults
from fluxlora.training.control import RunControl
from fluxlora.training.logs import LossRecorder, plot_losses
from fluxlora.training.outputs import (
    epoch_to_remove,
    should_save_epoch,
    should_save_step,
    step_to_remove,
)
from fluxlora.training.run import Run
from fluxlora.training.state import TrainCounters, save_state
from fluxlora.training.step import StepOutput, step_generator, step_seed, training_loss
from fluxlora.training.validation import validation_loss

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
    """Runs the loop over a prepared `Run` (models, network, optimizer, data, caches).

    `callbacks` are step-end hooks (`StepCallback`), e.g. a progress reporter or a benchmark's probe."""

    def __init__(self, run: Run, callbacks: Sequence[StepCallback] = ()):
        self.run = run
        self.cfg: TrainConfig = run.cfg
        self.result = TrainResult()
        self.counters: TrainCounters = run.counters
        self.stop_signal: int | None = None
        self._first_signal_at = 0.0  # time.monotonic() of the stop request
        # control channel (fluxlora.training.control): the run's event log, and sample/save/stop commands acted on
        # after each step, as the last step callback (so its time is not a step's)
        self.control = RunControl(self)
        self.callbacks: tuple[StepCallback, ...] = (*callbacks, self.control.after_step)

    # ---- the loop -----------------------------------------------------------------------------------------------
    def train(self) -> TrainResult:
        run, cfg = self.run, self.cfg
        accum = cfg.training.gradient_accumulation_steps
        recorder = LossRecorder(window=max(1, run.data.num_batches_per_epoch))
        self.result.losses = list(self.counters.loss_history)
        loader = make_dataloader(
            run.data, self.counters.epoch or 1, seed=run.seed, num_workers=cfg.dataset_flags.max_data_loader_n_workers,
            persistent_workers=cfg.dataset_flags.persistent_data_loader_workers,
            start_batch=self.counters.batch_in_epoch, latent_cache=run.latent_cache, text_cache=run.text_cache,
            gradient_accumulation_steps=accum, max_train_steps=run.max_train_steps,
            num_processes=run.num_processes, process_index=run.process_index,
        )
        # freeze() left the DiT in eval mode, and Flux only checkpoints blocks (--gradient_checkpointing, and the
        # recompute block swap needs) in training mode; FLUX has no dropout or batch norm, so nothing else changes.
        # Validation and sampling run under no_grad, where no block is checkpointed in either mode.
        run.models.flux.train()
        self._install_signal_handlers()
        progress = _progress(run.max_train_steps, self.counters.global_step, enabled=run.is_main)
        if cfg.sampling.sample_at_first and self.counters.global_step == 0:
            run.sample(epoch=0, step=0)
        micro_losses: list[float] = []
        start_epoch = max(1, self.counters.epoch)
        # With n processes, process p trains batches p, p + n, ... of each epoch's list (padded to whole rows):
        # a "row" of n batches is one micro-step of all processes together.
        n = run.num_processes
        num_batches = run.data.num_batches_per_epoch
        rows = math.ceil(num_batches / n)
        step_start = time.perf_counter()
        try:
            for epoch in range(start_epoch, run.num_epochs + 1):
                if epoch != start_epoch:
                    self.counters.batch_in_epoch = 0
                self.counters.epoch = epoch
                set_epoch(loader, epoch, self.counters.batch_in_epoch)
                first_row = math.ceil(self.counters.batch_in_epoch / n)
                for row, batch in enumerate(loader, start=first_row):
                    out = self._forward(batch, epoch, batch["batch_index"])
                    out.loss = faults.loss_for_step(out.loss, self.counters.global_step + self.counters.nan_streak + 1)
                    run.backward(out.loss / accum)
                    micro_losses.append(float(out.loss.detach()))
                    self.counters.batch_in_epoch = min((row + 1) * n, num_batches)
                    if (row + 1) % accum != 0 and row + 1 != rows:
                        continue
                    stepped = self._optimizer_step(micro_losses, batch, recorder, progress)
                    micro_losses = []
                    if stepped:
                        self.result.step_seconds.append(time.perf_counter() - step_start)
                        for callback in self.callbacks:
                            callback(run, self.counters.global_step)
                        step_start = time.perf_counter()
                    if self.counters.global_step >= run.max_train_steps or self.stop_signal is not None:
                        break
                if self.stop_signal is not None:
                    self._interrupt()
                if self.counters.batch_in_epoch < num_batches:
                    break  # stopped inside the epoch (max steps): it has no end, and a resume continues it
                self._end_of_epoch(epoch, recorder)
                if self.counters.global_step >= run.max_train_steps:
                    break
        finally:
            progress.close()
            self._restore_signal_handlers()
        self._finish()
        return self.result

    def _forward(self, batch: dict[str, Any], epoch: int, index: int) -> StepOutput:
        run = self.run
        # LoRA dropouts draw from torch's global RNG: reseed it per batch so they too depend only on the position.
        torch.manual_seed(step_seed(run.seed, epoch, index, purpose=1))
        return training_loss(
            run.models.flux, run.latents_of(batch), run.conditioning_of(batch), self.cfg.flow,
            generator=step_generator(run.seed, epoch, index), guidance=run.guidance, compute_dtype=run.precision.compute,
            loss_weights=batch["loss_weights"], alpha_masks=batch.get("alpha_masks"), dop=batch.get("dop"),
            set_multiplier=run.network.set_multiplier, autocast=run.autocast,
        )

    def _optimizer_step(self, micro_losses: list[float], batch: dict[str, Any], recorder: LossRecorder,
                        progress: Any) -> bool:
        """Clip, step, log and run the step's schedule; False when the step was skipped (non-finite)."""
        run, cfg, c = self.run, self.cfg, self.counters
        loss = self._agree(sum(micro_losses) / len(micro_losses))
        stepped, grad_norm = run.optimizer_step(finite_loss=math.isfinite(loss))
        if not stepped:
            c.nan_streak += 1
            logger.warning("step %d: non-finite loss or gradient (loss %s, grad norm %s) — optimizer step skipped; "
                           "batch images: %s", c.global_step + 1, loss, grad_norm, ", ".join(batch["image_paths"]))
            if c.nan_streak >= cfg.training.max_nan_steps:
                path = run.save_lora(run.names.last_file("-nan-stopped"), steps=c.global_step, epoch=c.epoch)
                raise TrainingError(
                    f"{c.nan_streak} optimizer steps in a row had a non-finite loss or gradient; stopped at step "
                    f"{c.global_step} and saved the last good LoRA to {path}; {NAN_ADVICE}", key="--max_nan_steps")
            return False
        c.nan_streak = 0
        c.global_step += 1
        c.loss_history.append(loss)
        self.result.losses.append(loss)
        recorder.add(loss)
        logs = {"loss/current": loss, "loss/average": recorder.moving_average, **run.lr_logs()}
        if grad_norm is not None:
            logs["norm/avg_grad_norm"] = grad_norm
        logs.update(run.max_norm_logs)
        run.log(logs, step=c.global_step)
        progress.update(1)
        progress.set_postfix(loss=f"{loss:.4f}", avr_loss=f"{recorder.moving_average:.4f}",
                             lr=f"{next(iter(run.lr_logs().values()), 0.0):.2e}")
        self._on_step_end()
        faults.after_step(c.global_step)  # tests only: tells a parent process how far the run got
        return True

    def _agree(self, loss: float) -> float:
        """One small all-reduce per optimizer step: the loss as the mean over processes (what is logged and
        recorded, equal on every process) and any stop signal, so all processes stop after the same step."""
        run = self.run
        if run.num_processes == 1:
            return loss
        flags = [float(self.stop_signal == sig) for sig in (signal.SIGINT, signal.SIGTERM)]
        total = run.sum_over_processes(torch.tensor([loss, *flags], dtype=torch.float64))
        if self.stop_signal is None and float(total[1:].sum()) > 0:
            self.stop_signal = signal.SIGINT if float(total[1]) > 0 else signal.SIGTERM
            self._first_signal_at = time.monotonic()
            logger.warning("another process received %s: stopping after this step",
                           signal.Signals(self.stop_signal).name)
        return float(total[0]) / run.num_processes

    # ---- schedule: save, sample, validate -------------------------------------------------------------------------
    def _on_step_end(self) -> None:
        run, cfg, step = self.run, self.cfg, self.counters.global_step
        if should_save_step(step, cfg.saving) and step < run.max_train_steps:
            self._save_checkpoint(run.names.step_file(step), run.names.step_state(step))
            old = step_to_remove(step, cfg.saving.save_every_n_steps, cfg.saving.save_last_n_steps)
            if old is not None:
                run.remove_file(run.names.step_file(old))
            old_state = step_to_remove(step, cfg.saving.save_every_n_steps,
                                       cfg.saving.save_last_n_steps_state or cfg.saving.save_last_n_steps)
            if old_state is not None:
                run.remove_dir(run.names.step_state(old_state))
        if cfg.sampling.sample_every_n_steps and not cfg.sampling.sample_every_n_epochs \
                and step % cfg.sampling.sample_every_n_steps == 0:
            run.sample(epoch=None, step=step)
        if cfg.validation.validate_every_n_steps and step % cfg.validation.validate_every_n_steps == 0:
            self._validate(step)

    def _end_of_epoch(self, epoch: int, recorder: LossRecorder) -> None:
        run, cfg = self.run, self.cfg
        run.log({"loss/epoch_average": recorder.end_epoch()}, step=epoch)
        self.counters.batch_in_epoch = run.data.num_batches_per_epoch
        if should_save_epoch(epoch, run.num_epochs, run.save_every_n_epochs):
            # the state of an epoch boundary resumes at the first batch of the next epoch
            self.counters.epoch, self.counters.batch_in_epoch = epoch + 1, 0
            self._save_checkpoint(run.names.epoch_file(epoch), run.names.epoch_state(epoch), epoch=epoch)
            self.counters.epoch, self.counters.batch_in_epoch = epoch, run.data.num_batches_per_epoch
            old = epoch_to_remove(epoch, run.save_every_n_epochs, cfg.saving.save_last_n_epochs)
            if old is not None:
                run.remove_file(run.names.epoch_file(old))
            old_state = epoch_to_remove(epoch, run.save_every_n_epochs,
                                        cfg.saving.save_last_n_epochs_state or cfg.saving.save_last_n_epochs)
            if old_state is not None:
                run.remove_dir(run.names.epoch_state(old_state))
        if cfg.sampling.sample_every_n_epochs and epoch % cfg.sampling.sample_every_n_epochs == 0:
            run.sample(epoch=epoch, step=self.counters.global_step)
        every = cfg.validation.validate_every_n_epochs
        if run.has_validation and (every is None or epoch % every == 0):
            self._validate(self.counters.global_step, epoch=epoch)

    def _validate(self, step: int, epoch: int | None = None) -> None:
        run = self.run
        if not run.has_validation:
            return
        with run.eval_context():
            value = validation_loss(run.validation_batches(), run.score_fixed, run.latents_of,
                                    seed=run.validation_seed, max_batches=self.cfg.validation.max_validation_steps,
                                    reduce_sum=run.sum_over_processes if run.num_processes > 1 else None)
        self.result.validation.append((step, value))
        key = "epoch_average" if epoch is not None else "step_average"
        run.log({f"loss/validation/{key}": value}, step=epoch if epoch is not None else step)
        logger.info("validation loss at step %d: %.6f", step, value)

    # ---- saving ---------------------------------------------------------------------------------------------------
    def _save_checkpoint(self, lora_path: Path, state_dir: Path, *, epoch: int | None = None) -> None:
        run, c = self.run, self.counters
        self.result.saved.append(run.save_lora(lora_path, steps=c.global_step, epoch=epoch or c.epoch))
        if self.cfg.saving.save_state:
            self._save_state(state_dir)

    def _save_state(self, state_dir: Path) -> None:
        """Every process calls this (the RNG states of all are gathered); only the main process writes."""
        run = self.run
        rng_states = run.gather_rng_states()
        if not run.is_main:
            return
        save_state(state_dir, network_params=run.network.state_dict(), optimizer=run.optimizer,
                   scheduler=run.scheduler, counters=self.counters, fingerprint=run.fingerprint, scaler=run.scaler,
                   rng_states=rng_states)
        self.result.saved.append(state_dir)

    def _finish(self) -> None:
        run, cfg, c = self.run, self.cfg, self.counters
        final = run.save_lora(run.names.last_file(), steps=c.global_step, epoch=c.epoch, finished=True)
        self.result.final_lora, self.result.global_step = final, c.global_step
        self.result.saved.append(final)
        if cfg.saving.save_state or cfg.saving.save_state_on_train_end:
            self._save_state(run.names.last_state())
        if run.is_main and self.result.losses:
            plot_losses(cfg.saving.output_dir / "loss.png", self.result.losses, validation=self.result.validation)
        run.end()
        run.accelerator.wait_for_everyone()  # no process leaves before the main one has written everything

    # ---- signals --------------------------------------------------------------------------------------------------
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
        run, c, signum = self.run, self.counters, self.stop_signal or signal.SIGINT
        if self.cfg.saving.save_state:
            state = run.names.last_state()
            self._save_state(state)
            how = f"resume with --resume {state}"
        else:
            how = "add --save_state to be able to resume; the LoRA so far is saved"
        path = run.save_lora(run.names.last_file("-interrupted"), steps=c.global_step, epoch=c.epoch)
        raise TrainingInterrupted(
            f"training interrupted by {signal.Signals(signum).name} at step {c.global_step}; saved {path}; {how}",
            signum)


def _progress(total: int, initial: int, *, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc="steps", smoothing=0.1,
                mininterval=0.5 if sys.stderr.isatty() else 10.0)


def epochs_for(max_train_steps: int, steps_per_epoch: int) -> int:
    return max(1, math.ceil(max_train_steps / max(1, steps_per_epoch)))


__all__ = ["StepCallback", "Trainer", "TrainResult", "TrainingInterrupted", "epochs_for", "torch"]
