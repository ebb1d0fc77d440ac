"""Test helper run under `accelerate launch`: trains like `flux_train_network.py`, then writes what only a test
needs to see — every process's own LoRA parameters and losses (`<output_dir>/process<i>.safetensors/.json`).

It also drives the control channel: after step 2 the main process drops a `save` command into the run's control
folder (as `fluxlora ctl` does), which every process must act on after the same step."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from safetensors.torch import save_file

from fluxlora.training.cli import prepare
from fluxlora.training.control import send_command
from fluxlora.training.setup import build_run
from fluxlora.training.trainer import Trainer

SAVE_COMMAND_STEP = 2


def main(argv: list[str]) -> int:
    plan = prepare(argv, configure_logging=True)  # a command-line process, like flux_train_network.py
    assert plan is not None
    cfg = plan.cfg
    cfg.saving.output_dir.mkdir(parents=True, exist_ok=True)
    run = build_run(plan)

    def save_command(run, step: int) -> None:
        if step == SAVE_COMMAND_STEP and run.processes.is_main:
            send_command(cfg.saving.output_dir, cfg.saving.output_name, "save")

    result = Trainer(run, callbacks=[save_command]).train()
    index = run.processes.index
    out = Path(cfg.saving.output_dir)
    save_file({k: v.detach().float().contiguous() for k, v in run.trainable.network.state_dict().items()},
              str(out / f"process{index}.safetensors"))
    (out / f"process{index}.json").write_text(json.dumps(
        {"losses": result.losses, "validation": result.validation, "num_processes": run.processes.count}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
