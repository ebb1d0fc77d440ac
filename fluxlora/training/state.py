"""Training state folders: save and resume exactly.

A state folder holds everything a resumed run needs to continue as if it had never stopped:

    <name>-state/
      network.safetensors   trainable LoRA parameters, full precision, by parameter name
      optimizer.pt          optimizer state (tensors and plain containers; read with weights_only=True)
      scheduler.pt          LR scheduler state (same)
      scaler.pt             fp16 grad-scaler state, when used
      rng.pt                python / numpy / torch / cuda RNG states of process 0 (the only one in one process)
      rng_<i>.pt            the same for process i >= 1 of a multi-process (DDP) run
      train_state.json      counters (epoch, batch in epoch, global step), the run fingerprint, format version
      COMPLETE              written last: a folder without it is an interrupted save and is never resumed

The folder is written under a temporary name and renamed into place, so a crash during a save leaves the
previous state intact. Data order and every per-step random draw are pure functions of (seed, epoch,
batch index), so the counters are enough to continue the data stream at the exact batch.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fluxlora.errors import CheckpointError
from fluxlora.files import save_safetensors, write_text

FORMAT_VERSION = 1
COMPLETE_MARKER = "COMPLETE"


@dataclass
class TrainCounters:
    """Where the run is. `epoch` is 0-based; `batch_in_epoch` counts micro-batches already consumed in it."""

    epoch: int = 0
    batch_in_epoch: int = 0
    global_step: int = 0  # optimizer steps taken so far (absolute, never reset by a resume)
    nan_streak: int = 0
    loss_history: list[float] = field(default_factory=list)


def capture_rng() -> dict[str, Any]:
    """RNG states of this process in weights_only-loadable containers."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of capture_rng."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _torch_save_atomic(obj: Any, path: Path) -> None:
    from fluxlora.files import atomic_write

    with atomic_write(path) as handle:
        torch.save(obj, handle)


def save_state(
    directory: str | Path,
    *,
    network_params: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    counters: TrainCounters,
    fingerprint: dict[str, Any],
    scaler: Any | None = None,
    rng_states: list[dict[str, Any]] | None = None,
) -> Path:
    """Write a complete state folder atomically (temporary folder, COMPLETE marker, rename).

    `rng_states` are the RNG states of every process (index = process index, from `capture_rng` on each);
    None means this process only.
    """
    rng_states = rng_states or [capture_rng()]
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o777 & ~mask)  # mkdtemp makes 0700; state folders get the usual permissions
    try:
        save_safetensors(tmp / "network.safetensors", {k: v.detach().float() if v.is_floating_point() else v
                                                       for k, v in network_params.items()})
        _torch_save_atomic(optimizer.state_dict(), tmp / "optimizer.pt")
        _torch_save_atomic(scheduler.state_dict(), tmp / "scheduler.pt")
        if scaler is not None:
            _torch_save_atomic(scaler.state_dict(), tmp / "scaler.pt")
        for index, rng in enumerate(rng_states):
            _torch_save_atomic(rng, tmp / rng_file_name(index))
        info = {"format_version": FORMAT_VERSION, "counters": asdict(counters), "fingerprint": fingerprint,
                "num_processes": len(rng_states),
                # sd-scripts' keys, so its tools can read our folders (1-based epoch, global step)
                "current_epoch": counters.epoch + 1, "current_step": counters.global_step}
        write_text(tmp / "train_state.json", json.dumps(info, indent=2, sort_keys=True))
        write_text(tmp / COMPLETE_MARKER, "ok\n")
        old = None
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            directory.rename(old)
        tmp.rename(directory)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


@dataclass
class LoadedState:
    directory: Path
    network_params: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    scaler: dict[str, Any] | None
    rng: dict[str, Any]
    counters: TrainCounters
    fingerprint: dict[str, Any]
    rng_by_process: list[dict[str, Any]] = field(default_factory=list)

    def rng_of(self, process_index: int) -> dict[str, Any]:
        """The RNG state saved by process `process_index` (process 0's when the saved run had fewer)."""
        states = self.rng_by_process or [self.rng]
        return states[process_index] if process_index < len(states) else states[0]


def rng_file_name(process_index: int) -> str:
    return "rng.pt" if process_index == 0 else f"rng_{process_index}.pt"


def _load_pt(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # weights_only=True refused the file without running anything in it; never suggest weights_only=False
        raise CheckpointError(
            f"--resume {path.parent}: {path.name} holds objects other than tensors and plain containers (a damaged "
            "or tampered file; refused without unpickling it); resume from another state",
            path=path, key="--resume") from err


def load_state(directory: str | Path) -> LoadedState:
    """Read a state folder written by save_state; refuse incomplete or foreign folders with a clear message."""
    from safetensors.torch import load_file

    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"--resume {directory}: no such state folder", path=directory, key="--resume")
    if not (directory / COMPLETE_MARKER).is_file():
        raise CheckpointError(
            f"--resume {directory}: the folder has no {COMPLETE_MARKER} marker — it is an interrupted save or not a "
            "fluxlora state folder; resume from an earlier complete state",
            path=directory, key="--resume",
        )
    try:
        info = json.loads((directory / "train_state.json").read_text(encoding="utf-8"))
        if info.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(
                f"--resume {directory}: state format {info.get('format_version')} is not supported "
                f"(this fluxlora writes {FORMAT_VERSION})", path=directory, key="--resume")
        scaler_path = directory / "scaler.pt"
        rngs = [_load_pt(directory / rng_file_name(i)) for i in range(int(info.get("num_processes", 1)))]
        return LoadedState(
            directory=directory,
            network_params=load_file(str(directory / "network.safetensors")),
            optimizer=_load_pt(directory / "optimizer.pt"),
            scheduler=_load_pt(directory / "scheduler.pt"),
            scaler=_load_pt(scaler_path) if scaler_path.exists() else None,
            rng=rngs[0],
            counters=TrainCounters(**info["counters"]),
            fingerprint=info["fingerprint"],
            rng_by_process=rngs,
        )
    except CheckpointError:
        raise
    except (OSError, KeyError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"--resume {directory}: state folder is damaged ({err}); resume from another state",
                              path=directory, key="--resume") from err


def fingerprint_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Settings that differ between a saved state and this run, as 'key: saved -> now' lines."""
    keys = sorted(set(saved) | set(current))
    return [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)]
