"""Subprocess harness for the kill and signal tests.

Run as `python reliability_harness.py JOB.json RESULT.json`. It imports the trainer once, then forks one child per
training "life": each child runs the real command-line entry point (`fluxlora.training.cli.main`) in a fresh
process image copy, so the parent pays the imports (seconds) once instead of 20 times. Only the children train
(the parent never runs autograd, so forking is safe). The parent kills / signals the children and inspects
what they left on disk with the same readers a user's next run would use.

Jobs ("mode"):
  kill    SIGKILL `kills` children at seeded random moments after each reported its first step (saves are slowed
          with the `slow_write` fault (tests/reliability/faults.py) so most kills land inside a save); before each life the run resumes from
          the newest complete state. After every kill: every file with a final name must load, and the newest
          complete state must be at least as new as before the kill and load. Then one last child finishes the
          run, and a reference child trains the same run without interruption.
  signal  for each of `cases`: send `signal` to a child after it reported step `at_step`, record its exit code and stderr, resume
          from the state it saved to the end, and train a reference run without interruption.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
from pathlib import Path
from typing import Any

STEP_FILE = "step.txt"


def _child(argv: list[str], fault: str, log: Path) -> int:
    """Fork a child running the trainer's command line on `argv` with the faults of `fault` injected; its pid."""
    pid = os.fork()
    if pid == 0:  # child
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            from faults import train_main

            code = train_main(argv, fault)
        except BaseException:  # noqa: BLE001 - the exit code carries the failure to the parent
            import traceback

            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return pid


def _wait_for_step(pid: int, step_file: Path, at_least: int, timeout: float = 120.0) -> int | None:
    """Wait until the child wrote a step >= at_least; None if it exited first (its exit code is then reaped)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            return None
        try:
            if int(step_file.read_text() or 0) >= at_least:
                return int(step_file.read_text())
        except (OSError, ValueError):
            pass
        time.sleep(0.005)
    raise TimeoutError(f"child {pid} made no progress in {timeout} s")


def _exit_code(pid: int) -> int:
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _state_step(state: Path) -> int:
    return int(json.loads((state / "train_state.json").read_text())["counters"]["global_step"])


def newest_complete_state(out: Path) -> Path | None:
    states = [p for p in out.glob("*-state") if (p / "COMPLETE").is_file()]
    return max(states, key=_state_step) if states else None


def check_final_files(out: Path) -> list[str]:
    """Every file or state folder under its final name must load; return the problems found."""
    from safetensors.torch import load_file

    from fluxlora.training.state import load_state

    problems: list[str] = []
    if not out.exists():
        return problems
    for path in sorted(out.iterdir()):
        if path.name.startswith("."):
            continue  # a temporary name: never read by anyone
        try:
            if path.suffix == ".safetensors":
                load_file(str(path))
            elif path.is_dir() and path.name.endswith("-state"):
                if (path / "COMPLETE").is_file():
                    load_state(path)
                else:
                    problems.append(f"{path.name}: a state folder under its final name without COMPLETE")
        except Exception as err:  # noqa: BLE001 - any failure to load is the finding
            problems.append(f"{path.name}: {type(err).__name__}: {err}")
    return problems


def kill_job(job: dict[str, Any]) -> dict[str, Any]:
    out, work = Path(job["out"]), Path(job["work"])
    step_file = work / STEP_FILE
    rng = random.Random(job["seed"])
    lives: list[dict[str, Any]] = []
    for life in range(job["kills"]):
        started = time.monotonic()
        before = newest_complete_state(out)
        before_step = _state_step(before) if before else 0
        argv = list(job["argv"]) + ([f"--resume={before}"] if before else [])
        step_file.unlink(missing_ok=True)
        pid = _child(argv, f"slow_write={job['slow_write']};step_file={step_file}", work / f"life{life}.log")
        if _wait_for_step(pid, step_file, 1) is None:
            lives.append({"life": life, "finished_early": True, "log": (work / f"life{life}.log").read_text()[-2000:]})
            break
        time.sleep(rng.uniform(0.0, job["window"]))
        os.kill(pid, signal.SIGKILL)
        code = _exit_code(pid)
        temp_left = sorted(p.name for p in out.iterdir() if p.name.startswith(".") and p.name != ".lora.control")
        after = newest_complete_state(out)
        lives.append({
            "life": life, "exit_code": code, "resumed_from_step": before_step,
            "newest_state_step": _state_step(after) if after else 0,
            "newest_state_loads": not check_final_files_of(after) if after else False,
            "problems": check_final_files(out), "temp_left": temp_left,
            "seconds": round(time.monotonic() - started, 2),
        })
    last = newest_complete_state(out)
    started = time.monotonic()
    final_code = _exit_code(_child(list(job["argv"]) + ([f"--resume={last}"] if last else []), "", work / "final.log"))
    final_seconds = time.monotonic() - started
    ref_code = _exit_code(_child(list(job["reference_argv"]), "", work / "reference.log"))
    return {"lives": lives, "final_exit_code": final_code, "reference_exit_code": ref_code,
            "seconds": {"final": round(final_seconds, 2), "reference": round(time.monotonic() - started - final_seconds, 2)},
            "final_log": (work / "final.log").read_text()[-3000:], "final_problems": check_final_files(out)}


def check_final_files_of(state: Path) -> list[str]:
    from fluxlora.training.state import load_state

    try:
        load_state(state)
    except Exception as err:  # noqa: BLE001
        return [f"{state.name}: {err}"]
    return []


def signal_job(job: dict[str, Any]) -> dict[str, Any]:
    out, work = Path(job["out"]), Path(job["work"])
    step_file = work / STEP_FILE
    step_file.unlink(missing_ok=True)
    pid = _child(list(job["argv"]), f"step_file={step_file};{job.get('fault', '')}", work / "interrupted.log")
    seen = _wait_for_step(pid, step_file, job["at_step"])
    for _ in range(job.get("repeat", 1)):
        os.kill(pid, getattr(signal, job["signal"]))
        time.sleep(job.get("gap", 0.0))
    code = _exit_code(pid)
    result: dict[str, Any] = {"seen_step": seen, "exit_code": code,
                              "stderr": (work / "interrupted.log").read_text()[-4000:],
                              "problems": check_final_files(out)}
    state = out / "lora-state"
    if job.get("resume") and (state / "COMPLETE").is_file():
        resumed = _child(list(job["resume_argv"]) + [f"--resume={state}"], "", work / "resumed.log")
        result["resume_exit_code"] = _exit_code(resumed)
        result["resume_log"] = (work / "resumed.log").read_text()[-3000:]
        result["reference_exit_code"] = _exit_code(_child(list(job["reference_argv"]), "", work / "reference.log"))
    return result


def main() -> None:
    job = json.loads(Path(sys.argv[1]).read_text())
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    import matplotlib.pyplot  # noqa: F401 - the loss plot at the end of a run

    import fluxlora.training.trainer  # noqa: F401
    from fluxlora.training.cli import prepare
    from fluxlora.training.setup import build_run

    # Warm-up: load the models once here (no autograd: forking stays safe), so every lazy import of the load
    # path (transformers' encoders, accelerate, schedulers) is done once and shared by all children.
    plan = prepare(list(job["argv"] if "argv" in job else job["cases"][0]["argv"]))
    assert plan is not None
    build_run(plan)

    result = kill_job(job) if job["mode"] == "kill" else [signal_job(case) for case in job["cases"]]
    Path(sys.argv[2]).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
