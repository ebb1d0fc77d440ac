"""Helpers for multi-process tests: launch `accelerate launch` with N CPU (gloo) processes, write a dataset."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
ACCELERATE = Path(sys.executable).with_name("accelerate")


def write_dataset(folder: Path, *, count: int = 4, size: int = 64) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        pixels = (rng.random((size, size, 3)) * 255).astype("uint8")
        pixels[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = (230, 20, 20)
        Image.fromarray(pixels).save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(f"a photo of sks red square {i}", encoding="utf-8")
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def accelerate_launch(script: str | Path, argv: list[str], *, num_processes: int = 2,
                      timeout: float = 300) -> subprocess.CompletedProcess:
    """`accelerate launch --multi_gpu --num_processes N <script> <argv>` forced onto CPU/gloo.

    accelerate's own `--cpu` launcher starts one process unless MPI is set up; `--multi_gpu` (torchrun) with
    ACCELERATE_USE_CPU starts N CPU processes that join a gloo group, also on a machine with a GPU.
    """
    cmd, env = _command(script, argv, num_processes)
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def _command(script: str | Path, argv: list[str], num_processes: int) -> tuple[list[str], dict[str, str]]:
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [str(ACCELERATE), "launch", "--multi_gpu", f"--num_processes={num_processes}", "--num_machines=1",
           "--mixed_precision=no", "--dynamo_backend=no", f"--main_process_port={free_port()}",
           str(script), *argv]
    return cmd, env


def launch_and_interrupt(script: str | Path, argv: list[str], when_exists: Path, *, num_processes: int = 2,
                         timeout: float = 300) -> tuple[int, str]:
    """Launch like `accelerate_launch`, press Ctrl-C (SIGINT to the launcher's whole process group, as a
    terminal does) as soon as `when_exists` appears; returns (exit code, stdout + stderr)."""
    cmd, env = _command(script, argv, num_processes)
    log = when_exists.parent.parent / f"{when_exists.parent.name}.log"
    with open(log, "w+", encoding="utf-8") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        deadline = time.monotonic() + timeout
        try:
            while not when_exists.exists() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGINT)
            code = proc.wait(timeout=max(deadline - time.monotonic(), 1))
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        out.seek(0)
        return code, out.read()
