"""The facts written into every saved LoRA (spec §6.3), gathered from the plan and the run."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from fluxlora.network.metadata import build_metadata
from fluxlora.training.plan import RunPlan


@dataclass
class RunFacts:
    """What sd-scripts records besides the flags: session, times, counts, optimizer description."""

    session_id: int = field(default_factory=lambda: int(time.time_ns() % 2**31))
    training_started_at: float = field(default_factory=time.time)
    optimizer: str = ""


def lora_metadata(plan: RunPlan, facts: RunFacts, *, steps: int, epoch: int, network_args: dict[str, str],
                  finished: bool = False) -> dict[str, str]:
    """Metadata for a LoRA saved at `steps` optimizer steps during 1-based `epoch`."""
    cfg, data = plan.cfg, plan.data
    info: dict[str, Any] = {k: v for k, v in cfg.flat().items() if not k.startswith(("wandb_", "huggingface_"))}
    info.update(
        network_args=network_args or None,
        max_train_steps=plan.schedule.max_train_steps,
        session_id=facts.session_id,
        training_started_at=facts.training_started_at,
        training_finished_at=time.time() if finished else None,
        num_train_images=data.num_train_images,
        num_validation_images=data.num_validation_images,
        num_reg_images=data.num_reg_images,
        num_batches_per_epoch=data.num_batches_per_epoch,
        num_epochs=plan.schedule.num_epochs,
        optimizer=facts.optimizer,
        steps=steps,
        epoch=epoch,
        seed=plan.seed,
        sd_model_name=cfg.model.pretrained_model_name_or_path.name,
        resolution=cfg.dataset_flags.resolution,
        datasets=json.dumps(data.metadata()),
        tag_frequency=json.dumps(data.tag_frequency()),
        dataset_dirs=json.dumps(data.dataset_dirs()),
    )
    architecture = plan.family.architecture(plan.model)  # the model family names its base model
    return build_metadata(info, architecture, detail="minimal" if cfg.saving.no_metadata else "full")
