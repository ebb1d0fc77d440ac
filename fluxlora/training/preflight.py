"""The checks run before a single weight is loaded: model file headers and kinds, the dataset (every image header
and caption), caching conflicts, the training flags (network, optimizer, scheduler built over a dummy parameter),
the output folder, the resume folder and the prompt file. Each raises a FluxLoraError naming what to fix;
`fluxlora.training.plan.build_plan` runs them all and reports every problem at once.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from fluxlora.config.dataset import DatasetBlueprint, blueprint_from_flags, load_dataset_config
from fluxlora.config.train_config import TrainConfig, check_caching_conflicts
from fluxlora.data.datasets import TrainingData, build_training_data
from fluxlora.errors import CheckpointError, ConfigError, FluxLoraError
from fluxlora.families.base import ModelFamily, ModelInfo
from fluxlora.models.checkpoints import SafetensorsHeader, read_header, require_kind
from fluxlora.training.memory import check_memory_flags
from fluxlora.training.state import COMPLETE_MARKER

logger = logging.getLogger(__name__)


def check_encoder_files(cfg: TrainConfig, family: ModelFamily) -> dict[str, SafetensorsHeader]:
    """The text-encoder files the family needs and the AE: each given and of the kind its flag expects. Returns
    their headers by component ("ae" for the autoencoder). Every missing or wrong file is reported."""
    problems: list[FluxLoraError] = []
    headers: dict[str, SafetensorsHeader] = {}
    wanted = [(e.component, e.flag, e.kind) for e in family.encoders] + [("ae", "--ae", family.ae_kind)]
    for component, flag, kind in wanted:
        path = getattr(cfg.model, component)
        if path is None:
            problems.append(ConfigError(f"{flag} is required for {family.name} models: pass its safetensors file",
                                        key=flag))
            continue
        try:
            header = read_header(path, flag=flag)
            require_kind(header, kind, flag=flag)
            headers[component] = header
        except FluxLoraError as err:
            problems.append(err)
    extra = [f"--{name}" for name in ("clip_l", "t5xxl", "text_encoder")
             if getattr(cfg.model, name) is not None and name not in {e.component for e in family.encoders}]
    if extra:
        logger.warning("%s: not used by %s models; ignored", ", ".join(extra), family.name)
    if problems:
        first = problems[0]
        if len(problems) == 1:
            raise first
        raise type(first)("; ".join(str(p) for p in problems), path=first.path, key=first.key)
    return headers


def check_network_weights(cfg: TrainConfig, family: ModelFamily, info: ModelInfo) -> None:
    """`--network_weights` must be a readable safetensors LoRA made for this base model."""
    path = cfg.network.network_weights
    if path is None:
        return
    header = read_header(path, flag="--network_weights")
    why = family.check_lora(info, header.metadata)
    if why is not None:
        raise CheckpointError(f"--network_weights {path}: {why}", path=path, key="--network_weights")


def check_checkpoint_blocks(cfg: TrainConfig, info: ModelInfo) -> None:
    """A numeric --checkpoint_blocks within the model's real block count (from the file header)."""
    n = cfg.memory.checkpoint_blocks
    total = info.num_blocks
    if isinstance(n, int) and n > total:
        raise ConfigError(f"--checkpoint_blocks {n}: this model has {info.double_blocks} double and "
                          f"{info.single_blocks} single blocks, so at most {total} can be checkpointed; "
                          f"use a value from 0 to {total} (or drop the flag to checkpoint all of them)",
                          key="--checkpoint_blocks")


def load_blueprint(cfg: TrainConfig) -> DatasetBlueprint:
    defaults = cfg.dataset_flags  # the TOML resolves against the command-line values directly
    if cfg.dataset_flags.dataset_config is not None:
        return load_dataset_config(cfg.dataset_flags.dataset_config, defaults)
    return blueprint_from_flags(defaults)


# A FLUX LoRA of rank 16-32 in fp32 is 80-300 MB and a state folder about three times that: with less free space
# than this the first save would fail, so say so before loading any weights.
MIN_FREE_BYTES = 256 * 2**20


def check_output_dir(output_dir: Path) -> None:
    """The output folder must be creatable and writable; nothing is created here."""
    probe = output_dir
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"--output_dir {output_dir}: {probe} is a file, not a folder", path=output_dir,
                          key="--output_dir")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"--output_dir {output_dir}: {probe} is not writable; choose a folder you can write to",
                          path=output_dir, key="--output_dir")
    free = shutil.disk_usage(probe).free
    if free < MIN_FREE_BYTES:
        raise ConfigError(f"--output_dir {output_dir}: only {free // 2**20} MiB free on its disk, less than the "
                          f"{MIN_FREE_BYTES // 2**20} MiB a LoRA and its state need; free space or choose another "
                          "folder", path=output_dir, key="--output_dir")


def check_resume_dir(resume: Path | None) -> None:
    if resume is None:
        return
    if not resume.is_dir():
        raise ConfigError(f"--resume {resume}: no such state folder", path=resume, key="--resume")
    if not (resume / COMPLETE_MARKER).is_file():
        raise ConfigError(f"--resume {resume}: not a complete fluxlora state folder (no {COMPLETE_MARKER} marker: an "
                          "interrupted save or a folder from another trainer); resume from a complete state",
                          path=resume, key="--resume")


def check_optimizer(cfg: TrainConfig) -> None:
    """The optimizer (name, package, --optimizer_args) built over a dummy parameter. --network_args and the other
    argument lists were parsed into typed specs with the config."""
    from fluxlora.training.optim import check_optimizer as build_over_dummy

    spec = cfg.optim.optimizer_spec
    build_over_dummy(spec.optimizer_type, learning_rate=spec.learning_rate, optimizer_args=spec.args)


def check_scheduler(cfg: TrainConfig, max_train_steps: int) -> None:
    """The LR scheduler (name, --lr_scheduler_args, warm-up within the run, min-LR ratio) built over a dummy
    optimizer for the run's real length."""
    from fluxlora.training.schedulers import check_scheduler as build_over_dummy

    build_over_dummy(cfg.optim.scheduler_spec, cfg.optim.optimizer_spec, num_training_steps=max_train_steps)


def check_dataset(cfg: TrainConfig, blueprint: DatasetBlueprint, seed: int, control_kind: str | None = None
                  ) -> TrainingData:
    """Caching conflicts, then every image header and caption of the dataset (and its pairs, when the family reads
    `control_kind` files); the dataset, built once."""
    check_caching_conflicts(cfg, [s for d in blueprint.datasets for s in d.subsets])
    data = build_training_data(blueprint, seed=seed, skip_bad_images=cfg.dataset_flags.skip_bad_images,
                               control_kind=control_kind)  # [fam1 hook: the family's pairs]
    problems = data.cache_conflicts(cache_latents=cfg.caching.cache_latents,
                                    cache_text_encoder_outputs=cfg.caching.cache_text_encoder_outputs)
    if problems:
        raise ConfigError("; ".join(problems), key=problems[0].split(":", 1)[0])
    return data


def check_prompt_file(cfg: TrainConfig) -> None:
    if cfg.sampling.sample_prompts is not None:
        from fluxlora.inference.prompts import load_prompt_file

        load_prompt_file(cfg.sampling.sample_prompts)


__all__ = ["check_checkpoint_blocks", "check_dataset", "check_encoder_files", "check_memory_flags",
           "check_network_weights", "check_optimizer", "check_output_dir", "check_prompt_file", "check_resume_dir",
           "check_scheduler", "load_blueprint"]
