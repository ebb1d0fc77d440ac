"""Build a `Run` from a validated config and its preflight: load models, create and attach the LoRA, build the
optimizer and scheduler, fill the caches, and restore a `--resume` state.
"""

from __future__ import annotations

import logging
import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fluxlora.config.train_config import TrainConfig
from fluxlora.data.caches import file_fingerprint
from fluxlora.data.loader import StepClock
from fluxlora.errors import ConfigError
from fluxlora.inference.training_samples import EncodedPrompts, encode_sample_prompts
from fluxlora.network.lora import create_network, create_network_from_weights
from fluxlora.training.components import (
    LatentEncodeFn,
    Precision,
    TextEncodeFn,
    load_models,
    precision_for,
    residency_for,
)
from fluxlora.training.launch import launched_world_size
from fluxlora.training.logs import tracker_dir  # cfg: moved so preflight can count the run steps
from fluxlora.training.metadata import RunFacts
from fluxlora.training.optim import build_optimizer
from fluxlora.training.outputs import OutputNames, save_every_n_epochs
from fluxlora.training.preflight import Preflight
from fluxlora.training.run import Run
from fluxlora.training.schedulers import scheduler_from_spec
from fluxlora.training.state import TrainCounters, fingerprint_differences, load_state, restore_rng

logger = logging.getLogger(__name__)


def make_accelerator(cfg: TrainConfig) -> Any:
    """The run's Accelerator; under `accelerate launch` / torchrun with several processes it joins the process
    group (gloo on CPU-only machines, so `accelerate launch --multi_gpu` also works there)."""
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    kwargs: dict[str, Any] = {}
    if cfg.logging.log_with:
        kwargs["log_with"] = cfg.logging.log_with
        kwargs["project_dir"] = (str(tracker_dir(cfg.logging.logging_dir, cfg.logging.log_prefix))  # cfg: sd-scripts'
                                 if cfg.logging.logging_dir else None)                           # folder name
    if cfg.memory.ddp_timeout:
        kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(timeout=timedelta(minutes=cfg.memory.ddp_timeout))]
    world_size = launched_world_size()
    if world_size > 1 and not torch.cuda.is_available():
        kwargs["cpu"] = True  # accelerate only forms a CPU (gloo) process group when told it runs on CPU
    accelerator = Accelerator(**kwargs)
    if accelerator.num_processes != world_size:
        raise ConfigError(f"the launcher started {world_size} processes but accelerate joined "
                          f"{accelerator.num_processes}; check the `accelerate launch` flags / accelerate config "
                          "(each process would otherwise train alone and write the same files)", key="accelerate")
    if cfg.memory.ddp_static_graph:
        logger.info("--ddp_static_graph: fluxlora's gradient all-reduce always covers the same tensors (every "
                    "trainable LoRA parameter, a missing gradient as zeros), which is what a static graph declares")
    if world_size == 1 and (cfg.memory.ddp_gradient_as_bucket_view or cfg.memory.ddp_static_graph):
        logger.info("--ddp_* flags only matter with several processes (accelerate launch --num_processes N)")
    return accelerator


def run_fingerprint(cfg: TrainConfig, pre: Preflight, num_processes: int = 1) -> dict[str, Any]:
    """Settings that, changed, would make a resumed run a different run (refused without --resume_force)."""
    n, o, d = cfg.network, cfg.optim, pre.data
    return {
        "network_dim": n.network_dim, "network_alpha": n.network_alpha, "network_args": list(n.network_args),
        "network_train_unet_only": n.network_train_unet_only,
        "network_train_text_encoder_only": n.network_train_text_encoder_only,
        "optimizer_type": o.optimizer_type, "optimizer_args": list(o.optimizer_args),
        "gradient_accumulation_steps": cfg.training.gradient_accumulation_steps, "seed": pre.seed,
        "model_variant": pre.flux_info.variant,
        # the process count sets the data shards and the steps per epoch (absent for one process: older states)
        **({"num_processes": num_processes} if num_processes > 1 else {}),
        "dataset": {"train_images": d.num_train_images, "reg_images": d.num_reg_images,
                    "batches_per_epoch": d.num_batches_per_epoch},
        "dataset_images": dataset_digest(pre),
    }


def dataset_digest(pre: Preflight) -> str:
    """Digest of what the data stream depends on: each training image's file name, size, bucket, repeats and raw
    caption, and the batch sizes. File names only, so a moved dataset folder still resumes."""
    import hashlib

    digest = hashlib.sha256()
    for dataset in pre.data.datasets:
        digest.update(f"batch {dataset.config.batch_size}\n".encode())
        for e in dataset.entries:
            digest.update(f"{e.path.name}|{e.size}|{e.bucket}|{e.num_repeats}|{e.caption}\n".encode())
    return digest.hexdigest()[:16]


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_run(cfg: TrainConfig, pre: Preflight) -> Run:
    accelerator = make_accelerator(cfg)
    # accelerate names the CPU of a multi-process CPU run "cpu:<index>", which safetensors refuses
    device = torch.device("cpu") if accelerator.device.type == "cpu" else accelerator.device
    precision = precision_for(cfg)
    if precision.compute == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("--mixed_precision bf16: this GPU has no bfloat16 support; use --mixed_precision fp16 "
                          "(with care: FLUX can overflow in fp16) or a newer GPU", key="--mixed_precision")
    _seed_everything(pre.seed)
    n = cfg.network
    train_unet = not n.network_train_text_encoder_only
    train_te = not n.network_train_unet_only
    caches = _CacheBuilder(cfg, pre, accelerator, precision)
    # the caches are filled while only their models are on the device; the DiT comes last (components.load_models)
    models = load_models(cfg, pre.flux_info, pre.t5_max_length, precision, device,
                         with_ae=caches.latents, with_text_encoders=caches.texts)
    # Each process wrote its share of the disk caches and reads the others' files lazily: wait until all exist.
    accelerator.wait_for_everyone()

    generator = torch.Generator().manual_seed(pre.seed)
    te_list = [models.clip, models.t5]
    if n.dim_from_weights:
        network, _ = create_network_from_weights(1.0, n.network_weights, models.flux, te_list,
                                                 network_args=n.network_spec, neuron_dropout=n.network_dropout,
                                                 train_unet=train_unet, train_text_encoder=train_te,
                                                 network_module=n.network_module)  # adapters: LyCORIS args
    else:
        network = create_network(1.0, n.network_dim, n.network_alpha, models.flux, te_list,
                                 network_args=n.network_spec, neuron_dropout=n.network_dropout,
                                 train_unet=train_unet, train_text_encoder=train_te, generator=generator,
                                 network_module=n.network_module)  # adapters: LyCORIS args
    if n.network_weights is not None:
        info = network.load_weights(n.network_weights)
        logger.info("--network_weights: %d modules loaded from %s", info.loaded, n.network_weights)
    network.to(device=device, dtype=precision.lora)
    network.apply_to(models.flux, te_list)
    network.train()
    train_clip = any(m.component == "clip_l" for m in network.loras)
    train_t5 = any(m.component == "t5xxl" for m in network.loras)

    groups = network.prepare_optimizer_params(list(n.text_encoder_lr) or None, n.unet_lr, cfg.optim.learning_rate)
    spec = cfg.optim.optimizer_spec
    optimizer, description = build_optimizer(spec.optimizer_type, groups.groups, learning_rate=spec.learning_rate,
                                              optimizer_args=spec.args)

    per_epoch = StepClock(pre.data.num_batches_per_epoch, cfg.training.gradient_accumulation_steps,
                          accelerator.num_processes).steps_per_epoch
    if cfg.training.max_train_epochs:
        max_steps = cfg.training.max_train_epochs * per_epoch
    else:
        max_steps = cfg.training.max_train_steps
    num_epochs = max(1, math.ceil(max_steps / per_epoch))
    scheduler = scheduler_from_spec(cfg.optim.scheduler_spec, optimizer, num_training_steps=max_steps)
    scaler = torch.amp.GradScaler(device.type) if cfg.precision.mixed_precision == "fp16" else None

    facts = RunFacts(optimizer=description, num_epochs=num_epochs, max_train_steps=max_steps)
    run = Run(cfg=cfg, pre=pre, accelerator=accelerator, device=device, precision=precision, models=models,
              network=network, param_group_names=groups.names, optimizer=optimizer, scheduler=scheduler,
              scaler=scaler, latent_cache=caches.latent_cache, text_cache=caches.text_cache,
              sample_prompts=caches.sample_prompts,
              names=OutputNames(cfg.saving.output_dir, cfg.saving.output_name), facts=facts,
              max_train_steps=max_steps, num_epochs=num_epochs,
              save_every_n_epochs=save_every_n_epochs(cfg.saving, num_epochs),
              fingerprint=run_fingerprint(cfg, pre, accelerator.num_processes), train_clip=train_clip, train_t5=train_t5)
    _start_position(run, per_epoch)
    if cfg.logging.log_with:
        accelerator.init_trackers(cfg.logging.log_tracker_name or "network_train",
                                  config={k: str(v) for k, v in cfg.flat().items() if "api_key" not in k})
    return run


class _CacheBuilder:
    """The latent and text caches (and the sample prompts' conditioning), filled by `load_models` while the AE and
    then the text encoders are on the device."""

    def __init__(self, cfg: TrainConfig, pre: Preflight, accelerator: Any, precision: Precision) -> None:
        self.cfg, self.pre, self.accelerator, self.precision = cfg, pre, accelerator, precision
        self.latent_cache: Any | None = None
        self.text_cache: Any | None = None
        self.sample_prompts: EncodedPrompts | None = None

    def latents(self, encode: LatentEncodeFn) -> None:
        cfg, c, acc = self.cfg, self.cfg.caching, self.accelerator
        if not c.cache_latents:
            return
        from fluxlora.data.latent_cache import build_latent_cache

        self.latent_cache, stats = build_latent_cache(
            self.pre.data.latent_items(), encode,
            ae_fingerprint=f"{file_fingerprint(Path(cfg.model.ae))}:{self.precision.ae}", batch_size=c.vae_batch_size,
            to_disk=c.cache_latents_to_disk, cache_dir=c.cache_dir, flip_aug=any(
                s.flip_aug for d in self.pre.blueprint.datasets for s in d.subsets),
            progress=acc.is_main_process, rank=acc.process_index,
            world_size=acc.num_processes if c.cache_latents_to_disk else 1)
        logger.info("latent cache: %s", stats)

    def texts(self, encode: TextEncodeFn) -> None:
        cfg, c, acc = self.cfg, self.cfg.caching, self.accelerator
        if c.cache_text_encoder_outputs:
            from fluxlora.data.text_cache import build_text_cache

            te_fp = [file_fingerprint(Path(cfg.model.clip_l)), file_fingerprint(Path(cfg.model.t5xxl)),
                     str(self.precision.weight)]
            self.text_cache, stats = build_text_cache(
                self.pre.data.text_items(), encode, te_fingerprint=te_fp, t5_max_length=self.pre.t5_max_length,
                apply_t5_attn_mask=cfg.flow.apply_t5_attn_mask,
                batch_size=c.text_encoder_batch_size or cfg.dataset_flags.train_batch_size,
                to_disk=c.cache_text_encoder_outputs_to_disk, cache_dir=c.cache_dir,
                progress=acc.is_main_process, rank=acc.process_index,
                world_size=acc.num_processes if c.cache_text_encoder_outputs_to_disk else 1)
            logger.info("text-encoder cache: %s", stats)
        if residency_for(cfg).drop_text_encoders and cfg.sampling.sample_prompts is not None:
            # sd-scripts does the same: the encoders are about to go, so sampling gets its conditioning now
            from fluxlora.inference.prompts import load_prompt_file

            prompts = load_prompt_file(cfg.sampling.sample_prompts, flag="--sample_prompts")
            self.sample_prompts = encode_sample_prompts(prompts, encode, process_index=acc.process_index,
                                                        num_processes=acc.num_processes)


def _start_position(run: Run, per_epoch: int) -> None:
    """Counters from --resume (exact) or --initial_step / --initial_epoch."""
    cfg = run.cfg
    accum = cfg.training.gradient_accumulation_steps
    if cfg.saving.resume is not None:
        state = load_state(cfg.saving.resume)
        diffs = fingerprint_differences(state.fingerprint, run.fingerprint)
        if diffs and not cfg.saving.resume_force:
            raise ConfigError(f"--resume {cfg.saving.resume}: this run differs from the saved one in "
                              + "; ".join(diffs) + " — resuming would not continue the same run; use the same "
                              "settings or add --resume_force", path=cfg.saving.resume, key="--resume")
        run.network.load_state_dict(state.network_params, strict=True)
        run.optimizer.load_state_dict(state.optimizer)
        run.scheduler.load_state_dict(state.scheduler)
        if run.scaler is not None and state.scaler is not None:
            run.scaler.load_state_dict(state.scaler)
        restore_rng(state.rng_of(run.accelerator.process_index))
        run.counters = state.counters
        logger.info("resumed from %s at step %d (epoch %d, batch %d)", cfg.saving.resume, run.counters.global_step,
                    run.counters.epoch, run.counters.batch_in_epoch)
    step = cfg.saving.initial_step
    if step is None and cfg.saving.initial_epoch is not None:
        step = (cfg.saving.initial_epoch - 1) * per_epoch
    if step is not None:
        # Data order is a pure function of (seed, epoch, batch): starting at a step skips exactly its batches.
        run.counters = TrainCounters(epoch=step // per_epoch + 1, batch_in_epoch=(step % per_epoch) * accum,
                                     global_step=step)
    if run.counters.global_step >= run.max_train_steps:
        raise ConfigError(f"the run starts at step {run.counters.global_step} but --max_train_steps/epochs ends at "
                          f"{run.max_train_steps}; raise the total to train further", key="--max_train_steps")
