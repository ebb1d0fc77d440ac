"""SIGINT / SIGTERM during training: stop after the current step, save, exit 130 / 143 with a message saying how to
resume; resuming gives the run an uninterrupted one would have given, bit for bit. A second signal during the save
never leaves a broken file under a final name.

Runs the trainer's real `main(argv)` in forked children of `reliability_harness.py` (one subprocess for all cases).
"""

from __future__ import annotations

import torch
from safetensors.torch import load_file
from test_crash_saves import run_harness

from fluxlora.training.state import load_state


def test_sigint_sigterm_save_exit_codes_and_exact_resume(argv_for, tmp_path):
    total = ["--max_train_steps=6"]
    dirs = {name: tmp_path / name for name in ("int", "term", "double", "ref")}
    for d in dirs.values():
        d.mkdir()
    work = tmp_path / "work"
    cases = [
        # SIGINT with --save_state: a state to resume from, then the resume must equal the reference
        {"argv": argv_for(*total, "--save_state", out=dirs["int"] / "out"), "out": str(dirs["int"] / "out"),
         "work": str(dirs["int"]), "signal": "SIGINT", "at_step": 2, "resume": True,
         "resume_argv": argv_for(*total, "--save_state", out=dirs["int"] / "out"),
         "reference_argv": argv_for(*total, "--save_state", out=dirs["ref"] / "out")},
        # SIGTERM without --save_state: still a LoRA with the -interrupted suffix
        {"argv": argv_for(*total, out=dirs["term"] / "out"), "out": str(dirs["term"] / "out"),
         "work": str(dirs["term"]), "signal": "SIGTERM", "at_step": 1},
        # two SIGINTs, the second one inside the (slowed) save: whatever is left under a final name loads
        {"argv": argv_for(*total, "--save_state", "--save_every_n_steps=1", out=dirs["double"] / "out"),
         "out": str(dirs["double"] / "out"), "work": str(dirs["double"]), "signal": "SIGINT", "at_step": 1,
         "repeat": 2, "gap": 0.45, "fault": "slow_write=0.1"},
    ]
    work.mkdir()
    first, term, double = run_harness({"mode": "signal", "cases": cases}, tmp_path)

    assert first["exit_code"] == 130, first["stderr"]
    assert "interrupted by SIGINT at step" in first["stderr"] and "resume with --resume" in first["stderr"]
    assert first["problems"] == []
    out = dirs["int"] / "out"
    stopped_at = load_state(out / "lora-state").counters.global_step
    assert stopped_at >= 2
    load_file(str(out / "lora-interrupted.safetensors"))
    assert first["resume_exit_code"] == 0, first["resume_log"]
    assert first["reference_exit_code"] == 0
    a, b = load_file(str(out / "lora.safetensors")), load_file(str(dirs["ref"] / "out" / "lora.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (load_state(out / "lora-state").counters.loss_history
            == load_state(dirs["ref"] / "out" / "lora-state").counters.loss_history)

    assert term["exit_code"] == 143, term["stderr"]
    assert "interrupted by SIGTERM" in term["stderr"] and "add --save_state" in term["stderr"]
    load_file(str(dirs["term"] / "out" / "lora-interrupted.safetensors"))
    assert not (dirs["term"] / "out" / "lora.safetensors").exists()

    assert double["exit_code"] != 0
    assert double["problems"] == [], double
