"""The job queue (`fluxlora.ui.jobs`, `fluxlora.ui.store`) with a stand-in trainer (fake_trainer.py: the same event
log and stop handling, no torch): one job per device, outcomes from the event log or the exit code, and a new UI
(a new manager over the same database) that re-attaches to a run the old one started, steers it and sees it end."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from fluxlora.ui.jobs import JobManager
from fluxlora.ui.store import JobStore

FAKE = Path(__file__).with_name("fake_trainer.py")


@pytest.fixture
def python(tmp_path) -> str:
    """An executable that runs fake_trainer.py with the arguments the manager gives `python`."""
    wrapper = tmp_path / "python"
    wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} {FAKE} "$@"\n', encoding="utf-8")
    wrapper.chmod(0o755)
    return str(wrapper)


def _manager(tmp_path: Path, python: str, **env: str) -> JobManager:
    return JobManager(JobStore(tmp_path / "state" / "jobs.sqlite3"), tmp_path / "state", python=python,
                      env={**os.environ, **env})


def _until(manager: JobManager, job_id: int, *statuses: str, timeout: float = 120) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        manager.tick()
        job = manager.store.get(job_id)
        if job.status in statuses:
            return job.as_dict()
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} is {manager.store.get(job_id).as_dict()}, not {statuses}")


def _submit(manager: JobManager, tmp_path: Path, name: str, steps: int = 3):
    out = tmp_path / "out" / name
    return manager.submit(kind="train", name=name, argv=[f"--output_dir={out}", f"--output_name={name}",
                                                         f"--max_train_steps={steps}"], output_dir=out, output_name=name)


def test_one_job_per_device_and_outcomes_from_the_event_log(tmp_path, python):
    manager = _manager(tmp_path, python)
    first, second = _submit(manager, tmp_path, "a"), _submit(manager, tmp_path, "b")
    assert manager.store.get(first.id).status in ("starting", "training")
    assert manager.store.get(second.id).status == "queued"  # the device is busy
    done = _until(manager, first.id, "finished")
    assert done["exit_code"] == 0 and done["error"] is None
    assert _until(manager, second.id, "finished")["exit_code"] == 0
    assert manager.store.get(first.id).ended <= manager.store.get(second.id).started


def test_a_failure_keeps_its_exit_code_and_error_line(tmp_path, python):
    failing = _manager(tmp_path, python, FAKE_EXIT="3")
    job = _until(failing, _submit(failing, tmp_path, "f").id, "failed")
    assert job["exit_code"] == 3 and job["error"] == "boom"
    silent = _manager(tmp_path, python, FAKE_SILENT="1")
    job = _until(silent, _submit(silent, tmp_path, "s").id, "failed")  # no event log: the exit code and the log
    assert job["exit_code"] == 2 and job["error"] == "error: --learning_rate: invalid float value"


def test_a_new_ui_reattaches_steers_and_sees_the_end(tmp_path, python):
    old = _manager(tmp_path, python, FAKE_DELAY="0.2")
    job = _submit(old, tmp_path, "long", steps=400)
    _until(old, job.id, "training")
    old.close()  # the UI goes away; its child goes on
    new = _manager(tmp_path, python)
    pid = _until(new, job.id, "training")["pid"]
    assert job.id not in new.children and new._owns_pid(new.store.get(job.id))  # followed by pid + start time
    answer = new.command(job.id, "stop")
    assert answer["ok"] and "sent" in answer["message"]
    stopped = _until(new, job.id, "stopped")
    assert stopped["exit_code"] == 130 and "interrupted by SIGINT" in stopped["error"]
    old.children[job.id].wait(timeout=30)  # the old UI's child ended (without that UI, init would reap it)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    resumed = new.resume(job.id)
    assert resumed.status in ("starting", "training") and resumed.launches == 2
    assert new.store.get(job.id).launch_argv[-2:] == ["--resume", str(tmp_path / "out" / "long" / "long-state")]
    assert new.command(job.id, "stop")["message"] == "stopping while loading"  # SIGINT: nothing to save yet
    assert _until(new, job.id, "stopped")["error"] in ("stopped before training started",
                                                        "training interrupted by SIGINT at step 4")


def test_a_run_killed_while_no_ui_watched_is_lost(tmp_path, python):
    old = _manager(tmp_path, python, FAKE_DELAY="0.2")
    job = _until(old, _submit(old, tmp_path, "k", steps=400).id, "training")
    old.close()
    os.kill(job["pid"], signal.SIGKILL)
    old.children[job["id"]].wait(timeout=30)  # reaped by its parent, as init would
    new = _manager(tmp_path, python)
    lost = _until(new, job["id"], "lost")
    assert lost["exit_code"] is None and "wrote no outcome" in lost["error"]
    with pytest.raises(ValueError, match="no complete state folder"):
        new.resume(job["id"])


def test_a_queued_job_is_cancelled_by_stop(tmp_path, python):
    manager = _manager(tmp_path, python, FAKE_DELAY="0.2")
    running, queued = _submit(manager, tmp_path, "r", steps=400), _submit(manager, tmp_path, "q")
    assert manager.command(queued.id, "stop") == {"ok": True, "message": "removed from the queue"}
    assert manager.store.get(queued.id).status == "cancelled"
    assert not manager.command(queued.id, "save")["ok"]
    manager.command(running.id, "stop")
    _until(manager, running.id, "stopped")
    assert manager.store.get(queued.id).status == "cancelled"  # never started
