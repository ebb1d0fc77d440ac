"""`fluxlora train | check | cache` and `flux_train_network.py`: flags → config → plan (preflight) → run."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from fluxlora.config.config_file import maybe_write_output_config
from fluxlora.config.train_config import TrainConfig, parse_train_config, startup_report
from fluxlora.errors import guarded
from fluxlora.files import remove_stale_temp_files
from fluxlora.training.plan import RunPlan, build_plan

logger = logging.getLogger(__name__)


def _configure_logging(cfg: TrainConfig) -> None:
    level = (cfg.logging.console_log_level or "INFO").upper()
    fmt = "%(message)s" if cfg.logging.console_log_simple else "%(asctime)s %(levelname)s %(name)s: %(message)s"
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if cfg.logging.console_log_file:
        handlers.append(logging.FileHandler(cfg.logging.console_log_file, encoding="utf-8"))
    logging.basicConfig(level=level, format=fmt, handlers=handlers, force=True)


def prepare(argv: list[str], *, configure_logging: bool = False) -> RunPlan | None:
    """Parse and check everything that needs no weights and decide the run; None when --output_config wrote a
    file."""
    written = maybe_write_output_config(argv)
    if written is not None:
        print(f"wrote {written}")
        return None
    cfg = parse_train_config(argv)
    if configure_logging:  # the command line owns the process's logging; library callers keep theirs
        _configure_logging(cfg)
    for level, text in startup_report(cfg):  # after logging is set up: also in --console_log_file
        logger.log(level, "%s", text)
    plan = build_plan(cfg)
    for line in plan.memory_lines():
        logger.info("%s", line)
    return plan


def train(argv: list[str], *, configure_logging: bool = False, callbacks: Sequence = (), loss_hook=None):
    """Run a whole training from command-line flags; returns the TrainResult (None for --output_config / --dry_run).

    `callbacks` are called as `callback(run, global_step)` after each optimizer step (`trainer.StepCallback`);
    `loss_hook(loss, attempt)` sees each micro-batch loss (`trainer.LossHook`)."""
    plan = prepare(argv, configure_logging=configure_logging)
    if plan is None:
        return None
    cfg = plan.cfg
    if cfg.training.dry_run:
        print(f"--dry_run: checks passed; {plan.summary()}")
        return None
    from fluxlora.training.control import record_outcome
    from fluxlora.training.setup import build_run
    from fluxlora.training.trainer import Trainer

    with record_outcome(cfg) as outcome:  # control channel: loading / finished / failed (exit code, error) events
        run = build_run(plan)  # errors found while loading (e.g. a LoRA that does not fit) leave no output folder
        cfg.saving.output_dir.mkdir(parents=True, exist_ok=True)
        if run.processes.is_main:
            remove_stale_temp_files(cfg.saving.output_dir)  # leftovers of saves interrupted by a crash
        result = Trainer(run, callbacks=callbacks, loss_hook=loss_hook).train()
        outcome.finished(steps=result.global_step, lora=result.final_lora)
    print(f"done: {result.global_step} steps; LoRA saved to {result.final_lora}")
    return result


def main(argv: list[str]) -> int:
    def command() -> int:
        train(argv, configure_logging=True)
        return 0

    return guarded(command)


def check_main(argv: list[str]) -> int:
    """`fluxlora check [--vram GB] <training flags>`: every check that needs no weights, then the plan's summary and
    memory; with --vram, what to add for a GPU of that size (`fluxlora.training.presets`)."""
    from fluxlora.training.presets import pop_vram, presets_for

    argv, vram = pop_vram(argv)
    plan = prepare(argv, configure_logging=True)
    if plan is not None:
        print(f"ok: {plan.summary()}")
        for line in plan.memory_lines():
            print(line)
        for preset in presets_for(plan, vram or ()):
            print("\n".join(preset.lines()))
    return 0


def cache_main(argv: list[str]) -> int:
    """`fluxlora cache <training flags>`: fill the latent / text-encoder caches and stop."""
    plan = prepare(argv, configure_logging=True)
    if plan is None:
        return 0
    from fluxlora.training.setup import build_run

    build_run(plan)
    print("caches are ready")
    return 0
