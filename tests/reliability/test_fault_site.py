"""The fault site (tests/reliability/fault_site/sitecustomize.py) injects a fault spec into training processes a test
does not start itself — as the browser test does for the runs the web UI launches."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

FAULT_SITE = Path(__file__).with_name("fault_site")


def test_a_training_process_started_elsewhere_gets_the_faults(argv_for, tmp_path):
    step_file = tmp_path / "step.txt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FLUXLORA_TEST_FAULTS": f"step_file={step_file}",
           "PYTHONPATH": os.pathsep.join(p for p in (str(FAULT_SITE), os.environ.get("PYTHONPATH")) if p)}
    argv = argv_for("--max_train_steps=2", out=tmp_path / "out")
    proc = subprocess.run([sys.executable, "-m", "fluxlora.cli", "train", *argv], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert step_file.read_text(encoding="utf-8") == "2"  # the step hook ran after each step, the last wrote 2
    # a process that does not train is left alone (no trainer import at start-up)
    other = subprocess.run([sys.executable, "-c", "import sys; print('fluxlora.training.trainer' in sys.modules)"],
                           env=env, capture_output=True, text=True, timeout=60)
    assert other.stdout.strip() == "False"
