"""The job queue: each job is an ordinary `fluxlora train` (or `generate`) process, one per device by default.

Processes are started from an argv list (never a shell), in their own session (a Ctrl-C or kill of the UI does not
reach them), with stdout and stderr going to the job's log file. The UI learns what a run does from its event log
(`fluxlora.training.control`) and steers it through its control folder, so a UI that restarts finds its running jobs
again by pid (and the pid's start time) and reads their outcome from the event log.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fluxlora.training.control import events_path, read_events, send_command
from fluxlora.ui.store import ACTIVE, ENDED, Job, JobStore

logger = logging.getLogger(__name__)

DEFAULT_DEVICE = "default"  # no CUDA_VISIBLE_DEVICES set: the process sees what the UI sees
TICK_S = 0.5
LIFECYCLE = ("loading", "training", "finished", "failed")


def process_start_time(pid: int) -> float | None:
    """When process `pid` started (None if it is gone or a zombie)."""
    import psutil

    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return None
        return process.create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def log_tail(path: str | Path, lines: int = 40, max_bytes: int = 64 * 1024) -> list[str]:
    """The last `lines` lines of a log file (tqdm's carriage-return updates folded to their last state)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - max_bytes))
            data = handle.read()
    except OSError:
        return []
    text = data.decode("utf-8", errors="replace")
    folded = [line.rsplit("\r", 1)[-1] for line in text.split("\n")]
    while folded and not folded[-1].strip():
        folded.pop()
    return folded[-lines:]


def newest_state(output_dir: str | Path) -> Path | None:
    """The newest complete state folder (`*-state` with its COMPLETE marker) of a run's output folder."""
    folder = Path(output_dir)
    states = [p for p in folder.glob("*-state") if (p / "COMPLETE").is_file()] if folder.is_dir() else []
    return max(states, key=lambda p: (p / "COMPLETE").stat().st_mtime) if states else None


class JobManager:
    """Starts queued jobs on free devices, follows running ones, records how they ended."""

    def __init__(self, store: JobStore, state_dir: Path, *, devices: list[str] | None = None,
                 jobs_per_device: int = 1, python: str = sys.executable, env: Mapping[str, str] | None = None):
        self.store = store
        self.state_dir = state_dir
        self.devices = devices or [DEFAULT_DEVICE]
        self.jobs_per_device = jobs_per_device
        self.python = python
        self.env = dict(os.environ if env is None else env)
        self.children: dict[int, subprocess.Popen] = {}  # job id -> the process this UI started
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- lifecycle of the manager -------------------------------------------------------------------------------
    def start(self) -> None:
        """Re-attach to the jobs a previous UI left running, then follow the queue in a background thread."""
        self.tick()
        self._thread = threading.Thread(target=self._loop, name="fluxlora-ui-jobs", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop following; the running processes go on (a new UI re-attaches)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.wait(TICK_S):
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - the loop must survive anything one job does
                logger.exception("job monitor")

    # ---- submitting and steering --------------------------------------------------------------------------------
    def submit(self, *, kind: str, name: str, argv: list[str], output_dir: Path, output_name: str | None,
               extra: dict[str, Any] | None = None) -> Job:
        with self._lock:
            job = self.store.add(kind=kind, name=name, argv=argv, output_dir=str(output_dir), output_name=output_name,
                                 device="", extra=extra)
            log = self.state_dir / "jobs" / f"{job.id:05d}" / "log.txt"
            log.parent.mkdir(parents=True, exist_ok=True)
            job = self.store.update(job.id, log_path=str(log))
        self.tick()
        return self.store.get(job.id)

    def command(self, job_id: int, command: str) -> dict[str, Any]:
        """sample / save / stop a job: through the control folder once it trains, by signal while it loads."""
        with self._lock:
            job = self.store.get(job_id)
            if command == "stop" and job.status == "queued":
                self.store.update(job_id, status="cancelled", ended=time.time())
                return {"ok": True, "message": "removed from the queue"}
            if job.status not in ACTIVE or job.kind != "train":
                return {"ok": False, "message": f"the job is {job.status}: there is no running trainer to {command}"}
            if command == "stop" and job.status == "starting" and self._owns_pid(job):
                self.store.update(job_id, extra={**job.extra, "stopped_while_loading": True})
                os.kill(job.pid, signal.SIGINT)  # not training yet: nothing to save, the loading just stops
                return {"ok": True, "message": "stopping while loading"}
            command_id = send_command(job.output_dir, job.output_name, command)
            return {"ok": True, "id": command_id, "message": f"{command} sent; the trainer acts after its current step"}

    def resume(self, job_id: int) -> Job:
        """Queue a stopped (or failed) run again, from its newest complete state."""
        with self._lock:
            job = self.store.get(job_id)
            if job.kind != "train" or job.status not in ("stopped", "failed", "lost"):
                raise ValueError(f"job {job_id} is {job.status}; only a stopped or failed run can be resumed")
            state = newest_state(job.output_dir)
            if state is None:
                raise ValueError(f"{job.output_dir}: no complete state folder to resume from (runs started here "
                                 "save one on stop; start the run again instead)")
            extra = {**job.extra, "resume": str(state)}
            extra.pop("stopped_while_loading", None)
            self.store.update(job_id, status="queued", extra=extra, exit_code=None, error=None, ended=None)
        self.tick()
        return self.store.get(job_id)

    # ---- the monitor --------------------------------------------------------------------------------------------
    def tick(self) -> None:
        with self._lock:
            for job in self.store.with_status(*ACTIVE):
                self._follow(job)
            self._start_queued()

    def _owns_pid(self, job: Job) -> bool:
        if job.pid is None:
            return False
        if job.id in self.children:
            return self.children[job.id].poll() is None
        started = process_start_time(job.pid)
        return started is not None and job.pid_started is not None and abs(started - job.pid_started) < 1.0

    def _events_since_launch(self, job: Job) -> list[dict[str, Any]]:
        if job.kind != "train":
            return []
        events, _ = read_events(events_path(job.output_dir, job.output_name), int(job.extra.get("events_offset", 0)))
        return events

    def _follow(self, job: Job) -> None:
        lifecycle = [e for e in self._events_since_launch(job) if e.get("event") in LIFECYCLE]
        last = lifecycle[-1] if lifecycle else None
        child = self.children.get(job.id)
        code = child.poll() if child is not None else None
        alive = code is None if child is not None else self._owns_pid(job)
        if alive:
            if last is not None and last["event"] == "training" and job.status != "training":
                self.store.update(job.id, status="training")
            return
        self.children.pop(job.id, None)
        if last is not None and last["event"] in ("finished", "failed"):
            code = int(last.get("exit_code", 1)) if code is None else code
            status = "finished" if last["event"] == "finished" and code == 0 else \
                "stopped" if last.get("interrupted") else "failed"
            error = last.get("error")
        elif job.extra.get("stopped_while_loading"):  # Stop sent SIGINT before training started
            status, error = "stopped", "stopped before training started"
        elif code is not None:  # a process of ours that wrote no outcome (bad flags, a crash before the log)
            status = "finished" if code == 0 else "failed"
            tail = [line for line in log_tail(job.log_path, 20) if line.strip()]
            error = next((line for line in reversed(tail) if line.startswith("error:")), tail[-1] if tail else None)
            if code < 0:
                error = f"killed by {signal.Signals(-code).name}" + (f"; last log line: {error}" if error else "")
        else:
            status, error = "lost", "the process is gone and wrote no outcome (killed, or the machine restarted)"
        self.store.update(job.id, status=status, exit_code=code, error=error, ended=time.time())
        logger.info("job %d %s (exit code %s)", job.id, status, code)

    def _start_queued(self) -> None:
        busy: dict[str, int] = {d: 0 for d in self.devices}
        for job in self.store.with_status(*ACTIVE):
            busy[job.device] = busy.get(job.device, 0) + 1
        for job in self.store.with_status("queued"):
            free = [d for d in self.devices if busy.get(d, 0) < self.jobs_per_device]
            if not free:
                return
            device = min(free, key=lambda d: busy.get(d, 0))
            self._launch(job, device)
            busy[device] = busy.get(device, 0) + 1

    def _launch(self, job: Job, device: str) -> None:
        argv = list(job.argv)
        if job.extra.get("resume"):
            argv += ["--resume", job.extra["resume"]]
        command = [self.python, "-m", "fluxlora.cli", "generate" if job.kind == "generate" else "train", *argv]
        env = dict(self.env, PYTHONUNBUFFERED="1")
        if device != DEFAULT_DEVICE:
            env["CUDA_VISIBLE_DEVICES"] = device
        offset = 0
        if job.kind == "train":
            Path(job.output_dir).mkdir(parents=True, exist_ok=True)  # so the event log starts with `loading`
            with contextlib.suppress(OSError):
                offset = events_path(job.output_dir, job.output_name).stat().st_size
        with open(job.log_path, "ab") as log:
            log.write(f"\n$ fluxlora {'generate' if job.kind == 'generate' else 'train'} ... "
                      f"(launch {job.launches + 1}, device {device})\n".encode())
            log.flush()
            process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                       env=env, cwd=self.state_dir, start_new_session=True)
        self.children[job.id] = process
        self.store.update(job.id, status="starting", device=device, pid=process.pid,
                          pid_started=process_start_time(process.pid), launch_argv=argv, started=time.time(),
                          launches=job.launches + 1, exit_code=None, error=None, ended=None,
                          extra={**job.extra, "events_offset": offset})
        logger.info("job %d started: pid %d on device %s", job.id, process.pid, device)


__all__ = ["DEFAULT_DEVICE", "ENDED", "JobManager", "log_tail", "newest_state", "process_start_time"]
