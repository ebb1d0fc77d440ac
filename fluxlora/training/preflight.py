"""Everything checked before a single weight is loaded: model file headers and kinds, the dataset (every
image header and caption), caching conflicts, the output folder, the resume folder and the prompt file.

`fluxlora check <flags>` runs this and stops; `train` runs it first, so a mistake costs seconds, not the
minutes it takes to read 30 GB of weights.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

from fluxlora.config.dataset import DatasetBlueprint, blueprint_from_flags, load_dataset_config
from fluxlora.config.train_config import TrainConfig, check_caching_conflicts
from fluxlora.data.datasets import TrainingData, build_training_data
from fluxlora.errors import CheckpointError, ConfigError
from fluxlora.models.checkpoints import ModelKind, read_header, require_kind
from fluxlora.models.flux_loading import FluxInfo, inspect_flux
from fluxlora.models.tokenizers import t5_max_length_for
from fluxlora.training.launch import launched_world_size
from fluxlora.training.memory import check_memory_flags
from fluxlora.training.planner import check_checkpoint_blocks
from fluxlora.training.state import COMPLETE_MARKER

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Preflight:
    """What preflight learned: the model variant, the T5 length, the dataset, the run seed."""

    flux_info: FluxInfo
    t5_max_length: int
    blueprint: DatasetBlueprint
    data: TrainingData
    seed: int

    def summary(self) -> str:
        d = self.data
        return (f"FLUX.1-{self.flux_info.variant} ({self.flux_info.params.depth} double + "
                f"{self.flux_info.params.depth_single_blocks} single blocks, {self.flux_info.file_dtype}); "
                f"T5 length {self.t5_max_length}; {d.num_train_images} training images, {d.num_reg_images} "
                f"regularisation, {d.num_validation_images} validation; {d.num_batches_per_epoch} batches per epoch; "
                f"seed {self.seed}")


def check_model_files(cfg: TrainConfig) -> FluxInfo:
    """Read the four model headers; each must be the kind of model its flag expects."""
    m = cfg.model
    info = inspect_flux(m.pretrained_model_name_or_path)
    require_kind(read_header(m.clip_l, flag="--clip_l"), ModelKind.CLIP_L, flag="--clip_l")
    require_kind(read_header(m.t5xxl, flag="--t5xxl"), ModelKind.T5XXL, flag="--t5xxl")
    require_kind(read_header(m.ae, flag="--ae"), ModelKind.AE, flag="--ae")
    return info


def check_network_weights(cfg: TrainConfig, info: FluxInfo) -> None:
    """`--network_weights` must be a readable safetensors LoRA made for the same FLUX variant as the base model."""
    path = cfg.network.network_weights
    if path is None:
        return
    header = read_header(path, flag="--network_weights")
    architecture = header.metadata.get("modelspec.architecture", "")
    trained_on = next((v for v in ("schnell", "dev") if architecture.startswith(f"flux-1-{v}")), None)
    if trained_on is not None and trained_on != info.variant:
        raise CheckpointError(
            f"--network_weights {path}: this LoRA was trained on FLUX.1-{trained_on} (modelspec.architecture "
            f"{architecture}) but --pretrained_model_name_or_path is FLUX.1-{info.variant}; use a base model of the "
            "same variant (dev and schnell LoRAs do not carry over)", path=path, key="--network_weights")


def load_blueprint(cfg: TrainConfig) -> DatasetBlueprint:
    defaults = cfg.dataset_flags  # cfg: the TOML resolves against the command-line values directly
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


def check_training_flags(cfg: TrainConfig, num_training_steps: int) -> None:
    """The optimizer (name, package, --optimizer_args) and the LR scheduler (name, --lr_scheduler_args, warm-up
    within the run, min-LR ratio), each built over a dummy parameter. --network_args are parsed in the config."""
    from fluxlora.training.optim import check_optimizer
    from fluxlora.training.schedulers import check_scheduler

    spec = cfg.optim.optimizer_spec
    check_optimizer(spec.optimizer_type, learning_rate=spec.learning_rate, optimizer_args=spec.args)
    check_scheduler(cfg.optim.scheduler_spec, spec, num_training_steps=num_training_steps)  # cfg: scheduler check


def planned_steps(cfg: TrainConfig, data: TrainingData, num_processes: int) -> int:
    """Optimizer steps of the run: --max_train_epochs x steps per epoch, else --max_train_steps (as setup counts)."""
    from fluxlora.data.loader import StepClock

    if not cfg.training.max_train_epochs:
        return cfg.training.max_train_steps
    per_epoch = StepClock(data.num_batches_per_epoch, cfg.training.gradient_accumulation_steps,
                          num_processes).steps_per_epoch
    return cfg.training.max_train_epochs * per_epoch


def run_preflight(cfg: TrainConfig) -> Preflight:
    """All checks that need no weights, in the order a user would fix them."""
    info = check_model_files(cfg)
    check_memory_flags(cfg, info)
    check_checkpoint_blocks(cfg, info)
    t5_len = t5_max_length_for(info.variant, cfg.flow.t5xxl_max_token_length)
    check_network_weights(cfg, info)
    check_output_dir(cfg.saving.output_dir)
    check_resume_dir(cfg.saving.resume)
    blueprint = load_blueprint(cfg)
    check_caching_conflicts(cfg, [s for d in blueprint.datasets for s in d.subsets])
    seed = cfg.training.seed if cfg.training.seed is not None else random.randrange(2**31)
    data = build_training_data(blueprint, seed=seed, skip_bad_images=cfg.dataset_flags.skip_bad_images)
    problems = data.cache_conflicts(cache_latents=cfg.caching.cache_latents,
                                    cache_text_encoder_outputs=cfg.caching.cache_text_encoder_outputs)
    if problems:
        raise ConfigError("; ".join(problems), key=problems[0].split(":", 1)[0])
    check_training_flags(cfg, planned_steps(cfg, data, launched_world_size()))  # cfg: needs the run length
    if cfg.sampling.sample_prompts is not None:
        from fluxlora.inference.prompts import load_prompt_file

        load_prompt_file(cfg.sampling.sample_prompts)
    pre = Preflight(flux_info=info, t5_max_length=t5_len, blueprint=blueprint, data=data, seed=seed)
    logger.info("preflight: %s", pre.summary())
    return pre
