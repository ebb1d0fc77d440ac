"""Execute a `RunPlan`: join the processes, load the models phase by phase while the caches fill, create and attach
the LoRA, build the optimizer and scheduler, and restore a `--resume` state. Nothing here decides: the plan did.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fluxlora.data.caches import file_fingerprint
from fluxlora.errors import ConfigError
from fluxlora.families.base import TextEncoders
from fluxlora.inference.training_samples import EncodedPrompts, encode_sample_prompts
from fluxlora.network.lora import create_network, create_network_from_weights
from fluxlora.training.metadata import RunFacts
from fluxlora.training.models import LatentEncodeFn, Models, load_models
from fluxlora.training.optim import build_optimizer
from fluxlora.training.plan import RunPlan
from fluxlora.training.processes import Processes, make_accelerator
from fluxlora.training.schedulers import scheduler_from_spec
from fluxlora.training.state import TrainCounters, fingerprint_differences, load_state, restore_rng
from fluxlora.training.step import Trainable

logger = logging.getLogger(__name__)


@dataclass
class Run:
    """A run in progress: its plan and what executing it built."""

    plan: RunPlan
    processes: Processes
    models: Models
    trainable: Trainable
    latent_cache: Any | None
    text_cache: Any | None
    sample_prompts: EncodedPrompts | None  # encoded up front when the text encoders are freed after caching
    fingerprint: dict[str, Any]
    facts: RunFacts
    counters: TrainCounters = field(default_factory=TrainCounters)


def run_fingerprint(plan: RunPlan) -> dict[str, Any]:
    """Settings that, changed, would make a resumed run a different run (refused without --resume_force)."""
    cfg, d = plan.cfg, plan.data
    n, o = cfg.network, cfg.optim
    return {
        "network_dim": n.network_dim, "network_alpha": n.network_alpha, "network_args": list(n.network_args),
        "network_train_unet_only": n.network_train_unet_only,
        "network_train_text_encoder_only": n.network_train_text_encoder_only,
        "optimizer_type": o.optimizer_type, "optimizer_args": list(o.optimizer_args),
        "gradient_accumulation_steps": cfg.training.gradient_accumulation_steps, "seed": plan.seed,
        "model_variant": plan.model.variant,
        # absent for FLUX.1 (the first family): states saved before families existed resume unchanged
        **({"model_family": plan.model.family} if plan.model.family != "flux1" else {}),
        # the process count sets the data shards and the steps per epoch (absent for one process: older states)
        **({"num_processes": plan.num_processes} if plan.num_processes > 1 else {}),
        "dataset": {"train_images": d.num_train_images, "reg_images": d.num_reg_images,
                    "batches_per_epoch": d.num_batches_per_epoch},
        "dataset_images": dataset_digest(plan),
    }


def dataset_digest(plan: RunPlan) -> str:
    """Digest of what the data stream depends on: each training image's file name, size, bucket, repeats and raw
    caption, and the batch sizes. File names only, so a moved dataset folder still resumes."""
    import hashlib

    digest = hashlib.sha256()
    for dataset in plan.data.datasets:
        digest.update(f"batch {dataset.config.batch_size}\n".encode())
        for e in dataset.entries:
            digest.update(f"{e.path.name}|{e.size}|{e.bucket}|{e.num_repeats}|{e.caption}\n".encode())
    return digest.hexdigest()[:16]


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_run(plan: RunPlan) -> Run:
    cfg = plan.cfg
    processes = Processes(make_accelerator(cfg, plan.num_processes),
                          gradient_as_bucket_view=cfg.memory.ddp_gradient_as_bucket_view)
    device = processes.device
    if plan.precision.compute == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("--mixed_precision bf16: this GPU has no bfloat16 support; use --mixed_precision fp16 "
                          "(with care: FLUX can overflow in fp16) or a newer GPU", key="--mixed_precision")
    _seed_everything(plan.seed)
    caches = _CacheBuilder(plan, processes)
    # the caches are filled while only their models are on the device; the transformer comes last
    models = load_models(plan, device, with_ae=caches.latents, with_text_encoders=caches.texts)
    processes.wait()  # each process wrote its share of the disk caches and reads the others' lazily

    trainable, description = _trainable(plan, models, device)
    run = Run(plan=plan, processes=processes, models=models, trainable=trainable,
              latent_cache=caches.latent_cache, text_cache=caches.text_cache, sample_prompts=caches.sample_prompts,
              fingerprint=run_fingerprint(plan), facts=RunFacts(optimizer=description))
    _start_position(run)
    if cfg.logging.log_with:
        processes.accelerator.init_trackers(cfg.logging.log_tracker_name or "network_train",
                                            config={k: str(v) for k, v in cfg.flat().items() if "api_key" not in k})
    return run


def _lora_text_encoders(text: TextEncoders) -> list[Any]:
    # the LoRA network knows the target rules of CLIP-L (lora_te1) and T5 (lora_te3); other encoders carry none
    return [text.modules.get("clip_l"), text.modules.get("t5xxl")]


def _trainable(plan: RunPlan, models: Models, device: torch.device) -> tuple[Trainable, str]:
    """The LoRA network attached to the models, its optimizer, scheduler and (fp16) gradient scaler."""
    cfg, n = plan.cfg, plan.cfg.network
    train_unet, train_te = not n.network_train_text_encoder_only, not n.network_train_unet_only
    te_list = _lora_text_encoders(models.text)
    if n.dim_from_weights:
        network, _ = create_network_from_weights(1.0, n.network_weights, models.transformer, te_list,
                                                 network_args=n.network_spec, neuron_dropout=n.network_dropout,
                                                 train_unet=train_unet, train_text_encoder=train_te,
                                                 network_module=n.network_module)  # adapters: LyCORIS args
    else:
        network = create_network(1.0, n.network_dim, n.network_alpha, models.transformer, te_list,
                                 network_args=n.network_spec, neuron_dropout=n.network_dropout,
                                 train_unet=train_unet, train_text_encoder=train_te,
                                 generator=torch.Generator().manual_seed(plan.seed),
                                 network_module=n.network_module)  # adapters: LyCORIS args
    if n.network_weights is not None:
        info = network.load_weights(n.network_weights)
        logger.info("--network_weights: %d modules loaded from %s", info.loaded, n.network_weights)
    network.to(device=device, dtype=plan.precision.lora)
    network.apply_to(models.transformer, te_list)
    network.train()
    trained = frozenset(m.component for m in network.loras if m.component != "unet")

    groups = network.prepare_optimizer_params(list(n.text_encoder_lr) or None, n.unet_lr, cfg.optim.learning_rate)
    spec = cfg.optim.optimizer_spec
    optimizer, description = build_optimizer(spec.optimizer_type, groups.groups, learning_rate=spec.learning_rate,
                                              optimizer_args=spec.args)
    scheduler = scheduler_from_spec(cfg.optim.scheduler_spec, optimizer, num_training_steps=plan.schedule.max_train_steps)
    scaler = torch.amp.GradScaler(device.type) if cfg.precision.mixed_precision == "fp16" else None
    return Trainable(network=network, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                     param_group_names=groups.names, trained_encoders=trained), description


class _CacheBuilder:
    """The latent and text caches (and the sample prompts' conditioning), filled by `load_models` while the AE and
    then the text encoders are on the device."""

    def __init__(self, plan: RunPlan, processes: Processes) -> None:
        self.plan, self.processes = plan, processes
        self.latent_cache: Any | None = None
        self.text_cache: Any | None = None
        self.sample_prompts: EncodedPrompts | None = None

    def latents(self, encode: LatentEncodeFn) -> None:
        plan, c, p = self.plan, self.plan.cfg.caching, self.processes
        if not c.cache_latents:
            return
        from fluxlora.data.latent_cache import build_latent_cache

        self.latent_cache, stats = build_latent_cache(
            plan.data.latent_items(), encode,
            ae_fingerprint=f"{file_fingerprint(Path(plan.cfg.model.ae))}:{plan.precision.ae}",
            batch_size=c.vae_batch_size, to_disk=c.cache_latents_to_disk, cache_dir=c.cache_dir,
            flip_aug=any(s.flip_aug for d in plan.blueprint.datasets for s in d.subsets),
            progress=p.is_main, rank=p.index, world_size=p.count if c.cache_latents_to_disk else 1,
            latent_channels=plan.family.latent_channels)  # [flux2 hook: the family's latent channels]
        logger.info("latent cache: %s", stats)

    def texts(self, encoders: TextEncoders) -> None:
        plan, cfg, c, p = self.plan, self.plan.cfg, self.plan.cfg.caching, self.processes
        if c.cache_text_encoder_outputs:
            from fluxlora.data.text_cache import build_text_cache

            te_fp = [*(file_fingerprint(path) for path in plan.encoder_files.values()), str(plan.precision.weight)]
            self.text_cache, stats = build_text_cache(
                plan.data.text_items(), encoders.encode, te_fingerprint=te_fp, t5_max_length=plan.text_length,
                apply_t5_attn_mask=cfg.flow.apply_t5_attn_mask,
                outputs={o.name: o.kind for o in plan.family.text_outputs},
                batch_size=c.text_encoder_batch_size or cfg.dataset_flags.train_batch_size,
                to_disk=c.cache_text_encoder_outputs_to_disk, cache_dir=c.cache_dir,
                progress=p.is_main, rank=p.index, world_size=p.count if c.cache_text_encoder_outputs_to_disk else 1)
            logger.info("text-encoder cache: %s", stats)
        if plan.residency.drop_text_encoders and cfg.sampling.sample_prompts is not None:
            # sd-scripts does the same: the encoders are about to go, so sampling gets its conditioning now
            from fluxlora.inference.prompts import load_prompt_file

            prompts = load_prompt_file(cfg.sampling.sample_prompts, flag="--sample_prompts")
            self.sample_prompts = encode_sample_prompts(prompts, encoders.encode, process_index=p.index,
                                                        num_processes=p.count)


def _start_position(run: Run) -> None:
    """Counters from --resume (exact) or --initial_step / --initial_epoch."""
    cfg, per_epoch = run.plan.cfg, run.plan.schedule.steps_per_epoch
    accum = cfg.training.gradient_accumulation_steps
    t = run.trainable
    if cfg.saving.resume is not None:
        state = load_state(cfg.saving.resume)
        diffs = fingerprint_differences(state.fingerprint, run.fingerprint)
        if diffs and not cfg.saving.resume_force:
            raise ConfigError(f"--resume {cfg.saving.resume}: this run differs from the saved one in "
                              + "; ".join(diffs) + " — resuming would not continue the same run; use the same "
                              "settings or add --resume_force", path=cfg.saving.resume, key="--resume")
        t.network.load_state_dict(state.network_params, strict=True)
        t.optimizer.load_state_dict(state.optimizer)
        t.scheduler.load_state_dict(state.scheduler)
        if t.scaler is not None and state.scaler is not None:
            t.scaler.load_state_dict(state.scaler)
        restore_rng(state.rng_of(run.processes.index))
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
    if run.counters.global_step >= run.plan.schedule.max_train_steps:
        raise ConfigError(f"the run starts at step {run.counters.global_step} but --max_train_steps/epochs ends at "
                          f"{run.plan.schedule.max_train_steps}; raise the total to train further",
                          key="--max_train_steps")
