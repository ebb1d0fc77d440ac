"""The run's control channel: commands in (`sample`, `save`, `stop`) and an event log out.

Every run has a control folder next to its outputs, `<output_dir>/.<output_name>.control/` (`last` when there is no
--output_name), holding:

    commands/<time_ns>-<pid>-<id>.json   one file per command, written atomically (temporary name, then rename);
                                         the trainer reads them between optimizer steps, in name order, acts and
                                         deletes them. `fluxlora ctl` and `fluxlora ui` write them.
    events.jsonl                         what the run did, one JSON object per line, appended by the main process:
                                         `loading`, `training`, `step` (loss, avg_loss, lr, s_per_step, eta_s,
                                         memory), `validation`, `files` (saved LoRAs/states, samples), `command`
                                         (what a command did and the files it wrote), then `finished` or `failed`
                                         (exit code, one-line error). A UI tails it; see `read_events`.

Commands act between steps: `sample` samples now with --sample_prompts; `save` writes a step LoRA and a resumable
state now (whatever --save_state says); `stop` takes the SIGINT path (finish the step, save, exit 130; resumable
with --save_state). Commands older than the process are stale (a UI clicked while no trainer ran) and dropped.
Under several processes the main process reads the folder and all processes agree on the commands with one small
all-reduce, so every process samples, saves and stops after the same step.

Nothing here imports torch at module level: `fluxlora ctl` and the UI read and write this folder instantly.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import signal
import sys
import time
import uuid
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fluxlora.config.train_config import TrainConfig
    from fluxlora.training.setup import Run
    from fluxlora.training.trainer import Trainer

logger = logging.getLogger(__name__)

COMMANDS = ("sample", "save", "stop")
EVENTS_FILE = "events.jsonl"
COMMANDS_DIR = "commands"
FILE_SCAN_INTERVAL_S = 1.0  # look for new output files at most this often (and after every command)
SPEED_WINDOW = 20  # steps in the s/step average behind the ETA


# ---- where ----------------------------------------------------------------------------------------------------------
def control_dir(output_dir: str | Path, output_name: str | None) -> Path:
    """`<output_dir>/.<output_name>.control` (the trainer names its files `last*` without --output_name)."""
    return Path(output_dir) / f".{output_name or 'last'}.control"


def events_path(output_dir: str | Path, output_name: str | None) -> Path:
    return control_dir(output_dir, output_name) / EVENTS_FILE


def is_main_process() -> bool:
    """Before accelerate is up: the launcher's RANK (torchrun / accelerate launch); a plain process is rank 0."""
    return os.environ.get("RANK", "0") == "0"


# ---- commands -------------------------------------------------------------------------------------------------------
def send_command(output_dir: str | Path, output_name: str | None, command: str) -> str:
    """Drop `command` into the run's control folder; returns its id (the `command` event carries it back)."""
    if command not in COMMANDS:
        raise ValueError(f"unknown command {command!r}; use one of {', '.join(COMMANDS)}")
    folder = control_dir(output_dir, output_name) / COMMANDS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    command_id = uuid.uuid4().hex[:12]
    name = f"{time.time_ns():020d}-{os.getpid()}-{command_id}.json"
    # A reader must never see half a command: write under a dot-name it ignores, then rename. No fsync: a command
    # lost in a power cut is simply not acted on.
    tmp = folder / f".{name}.tmp"
    tmp.write_text(json.dumps({"command": command, "id": command_id, "sent": time.time()}), encoding="utf-8")
    os.replace(tmp, folder / name)
    return command_id


@dataclass(frozen=True)
class Command:
    name: str
    id: str
    sent: float
    path: Path


def pending_commands(folder: Path) -> list[Command]:
    """Commands waiting in `folder` (the control folder), oldest first; unreadable files are dropped with a warning."""
    found: list[Command] = []
    directory = folder / COMMANDS_DIR
    if not directory.is_dir():
        return found
    for path in sorted(p for p in directory.iterdir() if p.suffix == ".json" and not p.name.startswith(".")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            found.append(Command(str(data["command"]), str(data.get("id", "")), float(data.get("sent", 0)), path))
        except (OSError, ValueError, KeyError, TypeError) as err:
            logger.warning("control: ignoring unreadable command file %s (%s)", path, err)
            path.unlink(missing_ok=True)
    return found


# ---- events ---------------------------------------------------------------------------------------------------------
def _jsonable(value: Any) -> Any:
    """Non-finite floats become null (JSON has no NaN), paths strings."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


class EventLog:
    """Appends one JSON line per event to events.jsonl (main process only; a no-op elsewhere).

    It never creates the output folder (a run that fails while loading leaves none): until that folder exists,
    lines wait in memory and are written with the first line after it does."""

    def __init__(self, path: Path, *, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        self._pending: list[str] = []

    @classmethod
    def shared(cls, path: Path, *, enabled: bool) -> EventLog:
        """The one log object of `path` in this process, so lines waiting for the output folder keep their order
        (the command line's `loading` is written before the trainer's first `training` line)."""
        key = Path(path).absolute()
        log = _LOGS.get(key)
        if log is None or log.enabled != enabled:
            log = _LOGS[key] = cls(key, enabled=enabled)
        return log

    @classmethod
    def for_config(cls, cfg: TrainConfig, *, enabled: bool | None = None) -> EventLog:
        return cls.shared(events_path(cfg.saving.output_dir, cfg.saving.output_name),
                          enabled=is_main_process() if enabled is None else enabled)

    def write(self, event: str, **fields: Any) -> None:
        if not self.enabled:
            return
        self._pending.append(json.dumps(_jsonable({"t": round(time.time(), 3), "event": event, **fields}),
                                        ensure_ascii=False) + "\n")
        if not self.path.parent.parent.is_dir():
            return
        try:
            self.path.parent.mkdir(exist_ok=True)
            # One write of whole lines in append mode: a reader sees whole lines or nothing new.
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write("".join(self._pending))
            self._pending.clear()
        except OSError as err:  # the log is for watching: it must never stop a training run
            logger.warning("control: could not write %s (%s)", self.path, err)


_LOGS: dict[Path, EventLog] = {}


def read_events(path: str | Path, offset: int = 0, limit: int | None = None) -> tuple[list[dict[str, Any]], int]:
    """Whole lines of an event log from byte `offset` (at most `limit` of them): (events, offset after the last
    whole line read). A line still being written is left for the next call."""
    events: list[dict[str, Any]] = []
    try:
        handle = open(path, "rb")
    except FileNotFoundError:
        return events, offset
    with handle:
        handle.seek(offset)
        for raw in handle:
            if not raw.endswith(b"\n") or (limit is not None and len(events) >= limit):
                break
            offset += len(raw)
            with contextlib.suppress(ValueError):
                events.append(json.loads(raw))
    return events, offset


def one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


class RunOutcome:
    """What `record_outcome` yields: the event log, and `finished(result)` for the success path."""

    def __init__(self, events: EventLog):
        self.events = events

    def finished(self, *, steps: int, lora: Path | None) -> None:
        self.events.write("finished", exit_code=0, steps=steps, lora=lora)


@contextlib.contextmanager
def record_outcome(cfg: TrainConfig) -> Iterator[RunOutcome]:
    """Wrap a training process after its flags are parsed: `loading` now, then `failed` with the exit code the
    command line will return and the one-line error when anything escapes (the caller reports `finished`)."""
    from fluxlora.errors import FluxLoraError

    events = EventLog.for_config(cfg)
    events.write("loading", pid=os.getpid(), argv=sys.argv[1:])
    try:
        yield RunOutcome(events)
    except FluxLoraError as err:
        events.write("failed", exit_code=int(getattr(err, "exit_code", 2)), error=one_line(err),
                     interrupted=type(err).__name__ == "TrainingInterrupted")
        raise
    except KeyboardInterrupt:
        events.write("failed", exit_code=130, error="interrupted before training could save", interrupted=True)
        raise
    except BaseException as err:
        events.write("failed", exit_code=1, error=f"{type(err).__name__}: {one_line(err)}")
        raise


# ---- the trainer's side ---------------------------------------------------------------------------------------------
def _process_start_time() -> float:
    import psutil

    return psutil.Process().create_time()


def _memory() -> dict[str, float]:
    """GB in use: the device's allocated and peak (CUDA), and this process's resident RAM."""
    import psutil
    import torch

    out = {"ram_gb": psutil.Process().memory_info().rss / 1e9}
    if torch.cuda.is_available():
        out["device_gb"] = torch.cuda.memory_allocated() / 1e9
        out["device_peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
    return out


def output_files(output_dir: Path) -> dict[str, float]:
    """Relative path -> mtime of what a run writes that a user wants: LoRA files, complete state folders, samples."""
    found: dict[str, float] = {}
    with contextlib.suppress(OSError):
        for entry in os.scandir(output_dir):
            if entry.name.startswith("."):
                continue
            if entry.name.endswith(".safetensors") and entry.is_file():
                found[entry.name] = entry.stat().st_mtime
            elif entry.name.endswith("-state") and entry.is_dir() and os.path.isfile(os.path.join(entry.path, "COMPLETE")):
                found[entry.name] = os.stat(os.path.join(entry.path, "COMPLETE")).st_mtime
    with contextlib.suppress(OSError):
        for entry in os.scandir(output_dir / "sample"):
            if entry.name.endswith(".png") and entry.is_file():
                found[f"sample/{entry.name}"] = entry.stat().st_mtime
    return found


class RunControl:
    """The trainer's end of the channel: one step event per optimizer step, new files and validation losses as they
    appear, and the commands of the control folder acted on between steps (`after_step` is a `StepCallback`)."""

    def __init__(self, trainer: Trainer):
        run, plan = trainer.run, trainer.plan
        self.trainer = trainer
        self.run = run
        self.output_dir = Path(plan.cfg.saving.output_dir)
        self.folder = control_dir(self.output_dir, plan.cfg.saving.output_name)
        self.events = EventLog.shared(self.folder / EVENTS_FILE, enabled=run.processes.is_main)
        self.window = max(1, plan.data.num_batches_per_epoch)  # the trainer's loss/average window
        self._started = _process_start_time()
        self._last_step_at = time.perf_counter()
        self._durations: deque[float] = deque(maxlen=SPEED_WINDOW)
        self._files = output_files(self.output_dir) if run.processes.is_main else {}
        self._last_scan = time.monotonic()
        self._validations = len(trainer.result.validation)
        c = trainer.counters
        self.events.write("training", pid=os.getpid(), step=c.global_step, max_steps=plan.schedule.max_train_steps,
                          epoch=c.epoch, num_epochs=plan.schedule.num_epochs)

    # ---- after every optimizer step -------------------------------------------------------------------------------
    def after_step(self, run: Run, step: int) -> None:
        now = time.perf_counter()
        self._durations.append(now - self._last_step_at)
        if run.processes.is_main:
            self._step_event(step)
            self._validation_events()
            if time.monotonic() - self._last_scan >= FILE_SCAN_INTERVAL_S:
                self._file_events()
        for command in self._agreed_commands():
            self._execute(command, step)
        self._last_step_at = time.perf_counter()  # a command's own time is not a step's

    def _step_event(self, step: int) -> None:
        losses, max_steps = self.trainer.counters.loss_history, self.trainer.plan.schedule.max_train_steps
        recent = losses[-self.window:]
        s_per_step = sum(self._durations) / len(self._durations)
        lrs = self.run.trainable.lr_logs()
        self.events.write(
            "step", step=step, max_steps=max_steps, epoch=self.trainer.counters.epoch,
            loss=losses[-1] if losses else None, avg_loss=sum(recent) / len(recent) if recent else None,
            lr=next(iter(lrs.values()), None), lrs=lrs, s_per_step=s_per_step,
            eta_s=max(0, max_steps - step) * s_per_step, **_memory())

    def _validation_events(self) -> None:
        found = self.trainer.result.validation
        for step, value in found[self._validations:]:
            self.events.write("validation", step=step, loss=value)
        self._validations = len(found)

    def _file_events(self) -> list[str]:
        """Write a `files` event for what appeared or changed since the last look; returns those names."""
        current = output_files(self.output_dir)
        new = sorted(name for name, mtime in current.items() if self._files.get(name) != mtime)
        self._files, self._last_scan = current, time.monotonic()
        if new:
            self.events.write("files", step=self.trainer.counters.global_step, files=new)
        return new

    # ---- commands -------------------------------------------------------------------------------------------------
    def _agreed_commands(self) -> list[Command]:
        procs = self.run.processes
        mine: list[Command] = []
        if procs.is_main:
            for command in pending_commands(self.folder):
                command.path.unlink(missing_ok=True)
                if command.name not in COMMANDS:
                    logger.warning("control: ignoring unknown command %r", command.name)
                    self.events.write("command", command=command.name, id=command.id, ok=False,
                                      message=f"unknown command; use one of {', '.join(COMMANDS)}")
                elif command.sent < self._started:
                    logger.warning("control: dropping a %s command sent before this process started", command.name)
                    self.events.write("command", command=command.name, id=command.id, ok=False,
                                      message="sent before this training process started: dropped")
                else:
                    mine.append(command)
        if procs.count == 1:
            return mine
        import torch

        flags = torch.tensor([float(any(c.name == name for c in mine)) for name in COMMANDS], dtype=torch.float64)
        agreed = procs.sum(flags)
        ids = {c.name: c for c in mine}
        return [ids.get(name) or Command(name, "", 0.0, self.folder) for name, flag in zip(COMMANDS, agreed.tolist(),
                                                                                          strict=True) if flag > 0]

    def _execute(self, command: Command, step: int) -> None:
        trainer, names = self.trainer, self.trainer.plan.outputs
        logger.info("control: %s requested (step %d)", command.name, step)
        message = ""
        if command.name == "sample":
            if trainer.plan.cfg.sampling.sample_prompts is None:
                message = "no --sample_prompts: nothing to sample"
            else:
                trainer.sample(epoch=None, step=step)
        elif command.name == "save":
            # a step LoRA and a resumable state, whatever --save_state says (a user asked for a checkpoint)
            trainer.result.saved.append(trainer.save_lora(names.step_file(step)))
            trainer.save_training_state(names.step_state(step))
        elif command.name == "stop" and trainer.stop_signal is None:
            # the SIGINT path: the loop leaves after this step, saves, and exits 130 (resumable with --save_state)
            trainer.stop_signal, trainer._first_signal_at = signal.SIGINT, time.monotonic()
            logger.warning("control: stop requested: saving and stopping after step %d", step)
            message = "stopping after this step"
        if self.run.processes.is_main:
            files = self._file_events()
            self.events.write("command", command=command.name, id=command.id, ok=True, step=step, files=files,
                              message=message)


# ---- `fluxlora ctl` -------------------------------------------------------------------------------------------------
def find_control_dir(run_dir: Path, output_name: str | None) -> Path:
    """The control folder of `run_dir`: named by --output_name, else the only one there."""
    from fluxlora.errors import ConfigError

    if output_name is not None:
        return control_dir(run_dir, output_name)
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: no such folder; give the --output_dir of a training run", path=run_dir)
    found = sorted(p for p in run_dir.glob(".*.control") if p.is_dir())
    if not found:
        raise ConfigError(f"{run_dir}: no training run has started here (no .NAME.control folder); check the folder "
                          "or pass --output_name", path=run_dir)
    if len(found) > 1:
        names = ", ".join(p.name[1:-len(".control")] for p in found)
        raise ConfigError(f"{run_dir}: several runs trained here ({names}); choose one with --output_name",
                          path=run_dir, key="--output_name")
    return found[0]


def last_state_event(path: Path) -> dict[str, Any] | None:
    """The last lifecycle event of a log (loading / training / finished / failed), or None."""
    events, _ = read_events(path)
    lifecycle = [e for e in events if e.get("event") in ("loading", "training", "finished", "failed")]
    return lifecycle[-1] if lifecycle else None


def ctl_main(argv: list[str]) -> int:
    """`fluxlora ctl RUN_DIR [--output_name N] sample|save|stop [--wait S]`."""
    from fluxlora.errors import ConfigError

    parser = argparse.ArgumentParser(prog="fluxlora ctl", description="Send a command to a running training run: "
                                     "sample now, save a LoRA and a resumable state now, or stop (saves, resumable).")
    parser.add_argument("run_dir", type=Path, help="the run's --output_dir")
    parser.add_argument("command", choices=COMMANDS)
    parser.add_argument("--output_name", default=None, help="the run's --output_name (needed when several runs "
                        "share the folder)")
    parser.add_argument("--wait", type=float, default=0.0, metavar="S",
                        help="wait up to S seconds for the trainer to act, and print what it wrote")
    args = parser.parse_args(argv)
    folder = find_control_dir(args.run_dir, args.output_name)
    log = folder / EVENTS_FILE
    last = last_state_event(log)
    if last is not None and last["event"] in ("finished", "failed"):
        raise ConfigError(f"{args.run_dir}: the run {folder.name[1:-len('.control')]!r} has ended ({last['event']}); "
                          "there is no trainer to act on the command", path=args.run_dir)
    _, offset = read_events(log)
    output_name = folder.name[1:-len(".control")]
    command_id = send_command(args.run_dir, output_name, args.command)
    print(f"sent {args.command} to {folder}; the trainer acts on it after its current step")
    if args.wait <= 0:
        return 0
    deadline = time.monotonic() + args.wait
    while time.monotonic() < deadline:
        events, offset = read_events(log, offset)
        for event in events:
            if event.get("event") == "command" and event.get("id") == command_id:
                files = ", ".join(event.get("files") or []) or "no new files"
                print(f"{args.command} done at step {event.get('step')}: {event.get('message') or files}")
                return 0 if event.get("ok") else 1
            if event.get("event") in ("finished", "failed"):
                print(f"the run ended ({event['event']}) before acting on {args.command}", file=sys.stderr)
                return 1
        time.sleep(0.2)
    print(f"no answer within {args.wait:g} s (is the trainer still loading, or stopped?)", file=sys.stderr)
    return 1


__all__ = ["COMMANDS", "Command", "EventLog", "RunControl", "control_dir", "ctl_main", "events_path",
           "find_control_dir", "output_files", "pending_commands", "read_events", "record_outcome", "send_command"]
