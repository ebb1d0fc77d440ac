"""Crash-safe saves: SIGKILL during saves 20 times, and a full disk, never leave a broken file under a final name.

The kill test runs `reliability_harness.py` in a subprocess: it imports the trainer once and forks one child per
training life (each runs the real `main(argv)`), kills it with SIGKILL at a seeded random moment after its first
step (saves are slowed by the FLUXLORA_FAULT hook so the kills land inside them) and resumes the next life from the
newest complete state. A last life finishes the run; it must equal an uninterrupted run bit for bit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from faults import ENV, Faults
from safetensors.torch import load_file

from fluxlora import files
from fluxlora.errors import FluxLoraError
from fluxlora.training.cli import train
from fluxlora.training.state import load_state

HARNESS = Path(__file__).with_name("reliability_harness.py")


def run_harness(job: dict, tmp_path: Path, timeout: float = 600) -> dict:
    job_file, result_file = tmp_path / "job.json", tmp_path / "result.json"
    job_file.write_text(json.dumps(job))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop(ENV, None)
    proc = subprocess.run([sys.executable, str(HARNESS), str(job_file), str(result_file)], env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(result_file.read_text())


def lora_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def test_sigkill_during_saves_20_times_loses_nothing_and_resume_is_exact(argv_for, tmp_path):
    steps = ["--max_train_steps=30", "--save_every_n_steps=1", "--save_state", "--save_last_n_steps=3"]
    out, ref = tmp_path / "out", tmp_path / "ref"
    work = tmp_path / "work"
    work.mkdir()
    job = {"mode": "kill", "argv": argv_for(*steps, out=out), "out": str(out), "work": str(work), "kills": 20,
           "seed": 1234, "window": 0.6, "slow_write": 0.05,
           "reference_argv": argv_for("--max_train_steps=30", "--save_state", out=ref)}
    result = run_harness(job, tmp_path)
    lives = result["lives"]
    print("seconds per life", [life.get("seconds") for life in lives], result.get("seconds"))
    assert not any(life.get("finished_early") for life in lives), lives[-1]
    assert len(lives) == 20
    for life in lives:
        assert life["exit_code"] == -9  # really killed, not finished
        assert life["problems"] == [], life  # every file under a final name loads
        # the previous checkpoint survived: the newest complete state is never older than the one resumed from
        assert life["newest_state_step"] >= life["resumed_from_step"], life
        assert life["newest_state_loads"], life
    # the kills really landed inside saves: interrupted writes left temporary names behind in several lives
    assert sum(bool(life["temp_left"]) for life in lives) >= 3, [life["temp_left"] for life in lives]
    assert result["final_exit_code"] == 0, result["final_log"]
    assert result["final_problems"] == []
    # leftovers of crashes are cleaned up (the run's control folder, fluxlora.training.control, is no leftover)
    assert [p.name for p in out.iterdir() if p.name.startswith(".") and p.name != ".lora.control"] == []
    # resumed 20 times from whatever survived, the run equals the uninterrupted one, bit for bit
    a, b = lora_tensors(out / "lora.safetensors"), lora_tensors(ref / "lora.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert load_state(out / "lora-state").counters.loss_history == load_state(ref / "lora-state").counters.loss_history


@pytest.mark.parametrize("failing", ["lora-step00000002.safetensors", "optimizer.pt", "COMPLETE"])
def test_full_disk_keeps_previous_files_and_stops_with_a_clear_message(argv_for, tmp_path, monkeypatch, failing):
    out = tmp_path / "out"
    argv = argv_for("--max_train_steps=3", "--save_every_n_steps=1", "--save_state", out=out)
    # step 1 saves normally, then the disk "fills": the write of `failing` at step 2 fails half-way
    full = Faults(f"disk_full={failing}")
    seen: list[str] = []

    def on_write(path, handle):
        seen.append(path.name)
        if path.name == failing and any(n.startswith("lora-step00000002") for n in seen):
            full.write(path, handle)

    monkeypatch.setattr(files, "WRITE_HOOKS", [on_write])
    with pytest.raises(FluxLoraError) as info:
        train(argv)
    message = str(info.value)
    assert "No space left on device" in message and failing in message and "free disk space" in message
    assert "\n" not in message
    # the step-1 checkpoint is intact and loads; nothing from step 2 appears under a final name
    state1 = load_state(out / "lora-step00000001-state")
    assert state1.counters.global_step == 1
    lora_tensors(out / "lora-step00000001.safetensors")
    if failing == "lora-step00000002.safetensors":
        assert not (out / failing).exists()
    assert not (out / "lora-step00000002-state").exists()
    assert not (out / "lora.safetensors").exists()
    # and no half-written temporary files are left behind
    assert [p.name for p in out.iterdir() if p.name.startswith(".") and p.name != ".lora.control"] == []
