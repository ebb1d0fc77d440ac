"""Preflight → `RunPlan`: every decision of a run made before a single weight is read.

`build_plan(cfg)` reads the model headers, the dataset TOML and folders, the output and resume folders and the prompt
file once, runs every check (`fluxlora.training.preflight`) and reports all problems together in one error. What it
returns is frozen: the model family and what the transformer file is, the precisions, which encoders are kept or
freed, block swap and checkpointed blocks (`auto` resolved here from the planner), the dataset, the step schedule
(the optimizer and scheduler of the config's typed specs validated by constructing them over a dummy parameter for
the run's real length), the memory plan and the output names. `fluxlora.training.setup` executes it; nothing after this re-reads a TOML or a
header. `fluxlora check` prints it and stops.
"""

from __future__ import annotations

import logging
import math
import os
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from fluxlora.config.dataset import DatasetBlueprint
from fluxlora.config.train_config import TrainConfig
from fluxlora.data.datasets import TrainingData
from fluxlora.errors import FluxLoraError
from fluxlora.families import resolve_family
from fluxlora.families.base import ModelFamily, ModelInfo
from fluxlora.models.checkpoints import SafetensorsHeader
from fluxlora.network.sizes import adapter_params_for  # adapters: planner counts LoKr/LoHa/full/DoRA
from fluxlora.training import planner, preflight
from fluxlora.training.launch import launched_world_size
from fluxlora.training.outputs import OutputNames, save_every_n_epochs
from fluxlora.training.planner import GB, OPTIMIZER_STATES, MemoryPlan, Workload
from fluxlora.training.precision import Precision, precision_for

logger = logging.getLogger(__name__)
T = TypeVar("T")
MODEL_FLAG = "--pretrained_model_name_or_path"


@dataclass(frozen=True)
class Residency:
    """Where the frozen text encoders and AE stay once the caches are built."""

    drop_text_encoders: bool  # outputs cached and no text-encoder LoRA: freed after caching
    ae_off_device: bool  # latents cached: the AE leaves the device (back only to decode samples)
    keep_ae: bool  # False when latents are cached and nothing samples: the AE is freed


def residency_for(cfg: TrainConfig, family: ModelFamily | None = None) -> Residency:
    """sd-scripts caches with the models on the device, then moves them away; we free what nothing reads again."""
    from fluxlora.network.targets import COMPONENT_PREFIXES

    c = cfg.caching
    # A text-encoder LoRA (no --network_train_unet_only) runs its encoder every step, so the encoders stay; encoders
    # the LoRA network has no rules for (FLUX.2's) never carry one. [flux2 hook]
    te_lora = family is None or any(e.component in COMPONENT_PREFIXES for e in family.encoders)
    drop_te = c.cache_text_encoder_outputs and (cfg.network.network_train_unet_only or not te_lora)
    return Residency(drop_text_encoders=drop_te, ae_off_device=c.cache_latents,
                     keep_ae=not c.cache_latents or cfg.sampling.sample_prompts is not None)


@dataclass(frozen=True)
class Schedule:
    """Optimizer steps and epochs of the run (for this number of processes)."""

    steps_per_epoch: int
    max_train_steps: int
    num_epochs: int
    save_every_n_epochs: int | None


@dataclass(frozen=True)
class RunPlan:
    """Everything decided before any weight is loaded (see the module docstring)."""

    cfg: TrainConfig
    family: ModelFamily
    model: ModelInfo
    encoder_files: Mapping[str, Path]  # component -> file, in the family's order
    headers: Mapping[str, SafetensorsHeader]  # component (and "ae") -> file header, read once
    text_length: int
    precision: Precision
    residency: Residency
    device: torch.device
    num_processes: int
    blocks_to_swap: int
    checkpointed: frozenset[int] | None  # block positions checkpointed while training; None = all; empty = none
    blueprint: DatasetBlueprint
    data: TrainingData
    seed: int
    schedule: Schedule
    workload: Workload
    memory: MemoryPlan
    outputs: OutputNames

    @property
    def guidance(self) -> float | None:
        """The guidance input of training steps (None when the model takes none)."""
        return self.family.training_guidance(self.model, self.cfg.flow.guidance_scale)

    def summary(self) -> str:
        d, m = self.data, self.model
        return (f"{m.title} ({m.double_blocks} double + {m.single_blocks} single blocks, {m.file_dtype}); "
                f"text length {self.text_length}; {d.num_train_images} training images, {d.num_reg_images} "
                f"regularisation, {d.num_validation_images} validation; {d.num_batches_per_epoch} batches per epoch; "
                f"{self.schedule.max_train_steps} steps; seed {self.seed}")

    def memory_lines(self) -> list[str]:
        name, free, ram = machine_memory(self.device)
        return planner.report(self.workload, device_name=name, free=free, ram=ram,
                              checkpoint_flag=self.cfg.memory.checkpoint_blocks)


class Problems:
    """Collects every problem preflight finds, so the user fixes them all in one go."""

    def __init__(self) -> None:
        self.errors: list[FluxLoraError] = []

    def check(self, fn: Callable[[], T]) -> T | None:
        """Run a check; a FluxLoraError is recorded (None returned) instead of stopping preflight."""
        try:
            return fn()
        except FluxLoraError as err:
            self.errors.append(err)
            return None

    def raise_if_any(self) -> None:
        if not self.errors:
            return
        if len(self.errors) == 1:
            raise self.errors[0]
        first = self.errors[0]
        message = f"{len(self.errors)} problems: " + "; ".join(f"({i}) {e}" for i, e in enumerate(self.errors, 1))
        raise type(first)(message, path=first.path, key=first.key)


def training_device() -> torch.device:
    """The device this process will train on (accelerate's choice: the local GPU, else the CPU)."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0") or 0))
    return torch.device("cpu")


def machine_memory(device: torch.device) -> tuple[str, int, int]:
    """(device name, free device bytes, total system RAM bytes). Without a GPU the device is the CPU's RAM."""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return torch.cuda.get_device_name(device), free, ram
    return "CPU", ram, ram


def build_plan(cfg: TrainConfig) -> RunPlan:
    """Run every check that needs no weights and decide the run (module docstring). All problems are reported in
    one error, in the order a user would fix them."""
    problems = Problems()
    resolved = problems.check(lambda: resolve_family(cfg.model.pretrained_model_name_or_path, cfg.model.model_type,
                                                     flag=MODEL_FLAG))
    family, info = resolved if resolved is not None else (None, None)
    headers: dict[str, SafetensorsHeader] = {}
    if family is not None:
        headers = problems.check(lambda: preflight.check_encoder_files(cfg, family)) or {}
        info = problems.check(lambda: family.check_run(cfg, info, headers)) or info  # [flux2 hook: family checks]
        problems.check(lambda: preflight.check_memory_flags(cfg, info))
        problems.check(lambda: preflight.check_checkpoint_blocks(cfg, info))
        problems.check(lambda: preflight.check_network_weights(cfg, family, info))
    text_length = problems.check(lambda: family.text_length(info, cfg.flow.t5xxl_max_token_length)) \
        if family is not None else None
    optimizer_ok = problems.check(lambda: preflight.check_optimizer(cfg) or True)
    problems.check(lambda: preflight.check_output_dir(cfg.saving.output_dir))
    problems.check(lambda: preflight.check_resume_dir(cfg.saving.resume))
    blueprint = problems.check(lambda: preflight.load_blueprint(cfg))
    seed = cfg.training.seed if cfg.training.seed is not None else random.randrange(2**31)
    data = None
    if blueprint is not None:
        data = problems.check(lambda: preflight.check_dataset(
            cfg, blueprint, seed, control_kind=family.control_kind if family is not None else None))
    problems.check(lambda: preflight.check_prompt_file(cfg))
    num_processes = launched_world_size()
    schedule = None
    if data is not None:
        schedule = problems.check(lambda: schedule_for(cfg, data, num_processes))
    # the scheduler is checked for the run's length: known without the dataset unless it is counted in epochs
    steps = schedule.max_train_steps if schedule is not None else \
        (None if cfg.training.max_train_epochs else cfg.training.max_train_steps)
    if steps is not None and optimizer_ok:
        problems.check(lambda: preflight.check_scheduler(cfg, steps))
    problems.raise_if_any()
    assert family is not None and info is not None and blueprint is not None and data is not None
    assert schedule is not None and text_length is not None

    precision = precision_for(cfg)
    residency = residency_for(cfg, family)
    device = training_device()
    encoder_files = {e.component: Path(getattr(cfg.model, e.component)) for e in family.encoders}
    workload = workload_for(cfg, family, info, blueprint, text_length, precision, residency, headers)
    blocks_to_swap, checkpointed = resolve_blocks(cfg, info, workload, device)
    workload = _with(workload, blocks_to_swap=blocks_to_swap,
                     checkpoint_blocks=None if checkpointed is None else len(checkpointed))
    plan = RunPlan(
        cfg=cfg, family=family, model=info, encoder_files=encoder_files, headers=headers, text_length=text_length,
        precision=precision, residency=residency, device=device, num_processes=num_processes,
        blocks_to_swap=blocks_to_swap, checkpointed=checkpointed, blueprint=blueprint, data=data, seed=seed,
        schedule=schedule,
        workload=workload, memory=planner.estimate(workload),
        outputs=OutputNames(cfg.saving.output_dir, cfg.saving.output_name),
    )
    logger.info("preflight: %s", plan.summary())
    return plan


def schedule_for(cfg: TrainConfig, data: TrainingData, num_processes: int) -> Schedule:
    """Steps per epoch (n processes train one batch each per micro-step), total steps and epochs."""
    from fluxlora.data.loader import StepClock

    per_epoch = StepClock(data.num_batches_per_epoch, cfg.training.gradient_accumulation_steps,
                          num_processes).steps_per_epoch
    if cfg.training.max_train_epochs:
        max_steps = cfg.training.max_train_epochs * per_epoch
    else:
        max_steps = cfg.training.max_train_steps
    num_epochs = max(1, math.ceil(max_steps / per_epoch))
    return Schedule(steps_per_epoch=per_epoch, max_train_steps=max_steps, num_epochs=num_epochs,
                    save_every_n_epochs=save_every_n_epochs(cfg.saving, num_epochs))


def resolve_blocks(cfg: TrainConfig, info: ModelInfo, workload: Workload,
                   device: torch.device) -> tuple[int, frozenset[int] | None]:
    """--blocks_to_swap and --checkpoint_blocks as numbers (`auto` from the planner and the free device memory;
    without a GPU nothing is swapped and every block is checkpointed), and the checkpointed positions."""
    from fluxlora.training.blocks import checkpointed_positions
    from fluxlora.training.memory import swap_split, swapped_positions_of

    free = machine_memory(device)[1] if device.type == "cuda" else None
    swap = cfg.memory.blocks_to_swap
    if swap == "auto":
        if free is None:
            logger.info("--blocks_to_swap auto: no GPU, nothing to swap")
            swap = 0
        else:
            swap = planner.auto_blocks_to_swap(workload, free)
    swap = int(swap)
    total = info.num_blocks
    swapped = swapped_positions_of(info.double_blocks, info.single_blocks, swap) if swap else []
    if not cfg.memory.gradient_checkpointing:
        return swap, frozenset()
    n = cfg.memory.checkpoint_blocks
    if n == "auto":
        if free is None:
            logger.info("--checkpoint_blocks auto: no GPU, all %d blocks are checkpointed", total)
            n = None
        else:
            n = planner.auto_checkpoint_blocks(_with(workload, blocks_to_swap=swap), free)
    elif n is not None and n < len(swapped):  # only with --blocks_to_swap auto; a fixed swap is checked earlier
        logger.info("--checkpoint_blocks %d: raised to the %d blocks --blocks_to_swap streams", n, sum(swap_split(swap)))
        n = len(swapped)
    return swap, checkpointed_positions(total, n, swapped)


def workload_for(cfg: TrainConfig, family: ModelFamily, info: ModelInfo, blueprint: DatasetBlueprint, text_length: int,
                 precision: Precision, residency: Residency, headers: Mapping[str, SafetensorsHeader]) -> Workload:
    """What the run puts in memory, from the flags, the transformer info and the encoder / AE headers."""
    shape = family.shape(info)
    datasets = list(blueprint.datasets)
    biggest = max(datasets, key=lambda d: d.batch_size * d.resolution[0] * d.resolution[1])
    pixels = biggest.resolution[0] * biggest.resolution[1]
    image_tokens = int(pixels * shape.tokens_per_pixel) * shape.image_token_factor
    te_bytes, ae_bytes = precision.bytes("weight"), precision.bytes("ae")
    te_loaded = 0
    for component, header in headers.items():
        if component == "ae":
            continue
        keeps_fp8 = precision.fp8_text_encoders
        te_loaded += sum(c * (1 if keeps_fp8 and "F8" in d else te_bytes) for d, c in header.dtype_counts().items())
    ae_loaded = sum(headers["ae"].dtype_counts().values()) * ae_bytes if "ae" in headers else 0
    files = {k: h.file_size for k, h in headers.items()}
    other_device = (0 if residency.drop_text_encoders else te_loaded) + (0 if residency.ae_off_device else ae_loaded)
    c = cfg.caching
    steps: list[tuple[tuple[str, int], ...]] = []
    if c.cache_latents:
        steps.append((("AE", ae_loaded), ("AE encode batch", c.vae_batch_size * family.ae_encode_bytes(pixels, ae_bytes))))
    if c.cache_text_encoder_outputs:
        batch = c.text_encoder_batch_size or cfg.dataset_flags.train_batch_size
        encode = max((family.encode_bytes(e.component, text_length, te_bytes) for e in family.encoders), default=0)
        steps.append((("text encoders", te_loaded), ("AE", 0 if c.cache_latents else ae_loaded),
                      ("text encode batch", batch * encode)))
    caching = max(steps, key=lambda items: sum(b for _, b in items), default=())
    # the transformer's file is read after the text encoders are freed, so their pages need not coexist
    if residency.drop_text_encoders:
        other_host = max(sum(files.values()), files.get("ae", 0) + info.size_bytes)
    else:
        other_host = sum(files.values()) + info.size_bytes
    opt = cfg.optim.optimizer_type.lower().replace("_", "").split(".")[-1] if cfg.optim.optimizer_type else "adamw"
    swap = cfg.memory.blocks_to_swap
    return Workload(
        shape=shape, batch_size=biggest.batch_size, image_tokens=image_tokens, text_tokens=text_length,
        weight_dtype=precision.weight, fp8=precision.fp8, compute_dtype=precision.compute if precision.mixed else None,
        lora_rank=cfg.network.network_dim or 4, lora_dtype=precision.lora,
        adapter_params=adapter_params_for(cfg.network.network_spec.adapter, info.params, cfg.network.network_dim or 4),
        optimizer_states=OPTIMIZER_STATES.get(opt, 2.0), gradient_checkpointing=cfg.memory.gradient_checkpointing,
        checkpoint_blocks=cfg.memory.checkpoint_blocks if isinstance(cfg.memory.checkpoint_blocks, int) else None,
        cpu_offload_checkpointing=cfg.memory.cpu_offload_checkpointing,
        blocks_to_swap=0 if swap == "auto" else int(swap), other_device_bytes=other_device,
        other_host_bytes=other_host, caching_device=caching,
    )


def _with(w: Workload, **changes: Any) -> Workload:
    from dataclasses import replace

    return replace(w, **changes)


__all__ = ["GB", "Problems", "Residency", "RunPlan", "Schedule", "build_plan", "launched_world_size",
           "machine_memory", "residency_for", "schedule_for", "training_device", "workload_for"]
