"""Everything one training run holds, built once from the config and the preflight: device, models in their
dtypes, the LoRA network, optimizer, scheduler, caches and output names; plus the small operations the loop
calls (encode a batch, backward, optimizer step, save a LoRA, log).
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fluxlora.config.train_config import TrainConfig
from fluxlora.data.datasets import TrainingData
from fluxlora.data.loader import make_dataloader
from fluxlora.models.text_encoders import encode_prompts
from fluxlora.network.lora import LoRANetwork
from fluxlora.training.components import Models, Precision, conditioning_of, latent_encoder, text_encoder
from fluxlora.training.metadata import RunFacts, lora_metadata
from fluxlora.training.optim import eval_mode
from fluxlora.training.outputs import OutputNames
from fluxlora.training.preflight import Preflight
from fluxlora.training.state import TrainCounters, capture_rng
from fluxlora.training.step import Conditioning, StepOutput, training_loss

if TYPE_CHECKING:
    from fluxlora.inference.training_samples import EncodedPrompts

logger = logging.getLogger(__name__)


@dataclass
class Run:
    cfg: TrainConfig
    pre: Preflight
    accelerator: Any
    device: torch.device
    precision: Precision
    models: Models
    network: LoRANetwork
    param_group_names: list[str]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any | None
    latent_cache: Any | None
    text_cache: Any | None
    names: OutputNames
    facts: RunFacts
    max_train_steps: int
    num_epochs: int
    save_every_n_epochs: int | None
    fingerprint: dict[str, Any]
    counters: TrainCounters = field(default_factory=TrainCounters)
    train_clip: bool = False
    train_t5: bool = False
    max_norm_logs: dict[str, float] = field(default_factory=dict)
    # --sample_prompts read and encoded at the start, when the text encoders are freed after caching
    sample_prompts: EncodedPrompts | None = None

    # ---- facts ----------------------------------------------------------------------------------------------------
    @property
    def data(self) -> TrainingData:
        return self.pre.data

    @property
    def seed(self) -> int:
        return self.pre.seed

    @property
    def is_main(self) -> bool:
        return bool(self.accelerator.is_main_process)

    @property
    def guidance(self) -> bool:
        return self.models.flux_info.variant == "dev"

    @property
    def has_validation(self) -> bool:
        return self.data.num_validation_images > 0

    @property
    def validation_seed(self) -> int:
        vs = self.cfg.dataset_flags.validation_seed
        return self.seed if vs is None else vs

    def autocast(self) -> contextlib.AbstractContextManager:
        return self.precision.autocast(self.device)()

    # ---- batch -> model inputs -----------------------------------------------------------------------------------
    def latents_of(self, batch: dict[str, Any]) -> torch.Tensor:
        if "latents" in batch:
            return batch["latents"].to(self.device, torch.float32)
        return latent_encoder(self.models.ae, self.precision, self.device)(batch["images"])

    def conditioning_of(self, batch: dict[str, Any]) -> Conditioning:
        captions = list(batch["captions"])
        if "text" in batch:
            cond = conditioning_of(batch["text"])
            if self.train_clip:  # cached T5, fresh CLIP-L through its LoRA (sd-scripts' partial caching)
                tokens = self.models.tokenizers.tokenize(captions, self.models.t5_max_length)
                with self.autocast():
                    pooled = self.models.clip(input_ids=tokens.clip_ids.to(self.device)).pooler_output.float()
                cond = Conditioning(pooled, cond.t5_out, cond.t5_mask)
            return cond
        tokens = self.models.tokenizers.tokenize(captions, self.models.t5_max_length)
        with self.autocast():
            out = encode_prompts(self.models.clip, self.models.t5, tokens,
                                 apply_t5_attn_mask=self.cfg.flow.apply_t5_attn_mask,
                                 clip_grad=self.train_clip, t5_grad=self.train_t5)
        return Conditioning(out["clip_pooled"].float(), out["t5_out"], out["t5_mask"].bool())

    def score_fixed(self, batch: dict[str, Any], sigmas: torch.Tensor, noise: torch.Tensor) -> StepOutput:
        """The training loss at given σ and noise (validation)."""
        return training_loss(
            self.models.flux, self.latents_of(batch), self.conditioning_of(batch), self.cfg.flow,
            generator=torch.Generator().manual_seed(0), guidance=self.guidance, compute_dtype=self.precision.compute,
            loss_weights=batch["loss_weights"], alpha_masks=batch.get("alpha_masks"), dop=None,
            autocast=self.autocast, sigmas=sigmas, noise=noise,
        )

    def validation_batches(self) -> Iterator[dict[str, Any]]:
        """This process's share of the validation batches (every num_processes-th, no padding)."""
        loader = make_dataloader(self.data, 1, seed=self.seed, split="validation", latent_cache=self.latent_cache,
                                 text_cache=self.text_cache, num_processes=self.num_processes,
                                 process_index=self.process_index)
        yield from loader

    # ---- processes --------------------------------------------------------------------------------------------
    @property
    def num_processes(self) -> int:
        return int(self.accelerator.num_processes)

    @property
    def process_index(self) -> int:
        return int(self.accelerator.process_index)

    def sum_over_processes(self, values: torch.Tensor) -> torch.Tensor:
        """Element-wise sum of a small CPU tensor over all processes (itself with one process)."""
        if self.num_processes == 1:
            return values
        return self.accelerator.reduce(values.to(self.device), reduction="sum").cpu()

    def mean_over_processes(self, value: float) -> float:
        """The mean of a per-process number (a loss) over all processes; NaN anywhere gives NaN everywhere."""
        if self.num_processes == 1:
            return value
        return float(self.sum_over_processes(torch.tensor([value], dtype=torch.float64))[0]) / self.num_processes

    def any_process(self, flag: bool) -> bool:
        """True on every process when it is True on one (a stop signal must stop all at the same step)."""
        if self.num_processes == 1:
            return flag
        return bool(self.sum_over_processes(torch.tensor([float(flag)]))[0] > 0)

    def gather_objects(self, obj: Any) -> list[Any]:
        """`obj` of every process, in process order (each process must call this)."""
        if self.num_processes == 1:
            return [obj]
        from accelerate.utils import gather_object

        return list(gather_object([obj]))

    def gather_rng_states(self) -> list[dict[str, Any]]:
        """`capture_rng()` of every process, in process order (each process must call this). Sent as torch.save
        bytes: tensors pickled by all_gather_object do not load back in every torch version."""
        if self.num_processes == 1:
            return [capture_rng()]
        buffer = io.BytesIO()
        torch.save(capture_rng(), buffer)
        return [torch.load(io.BytesIO(blob), weights_only=True) for blob in self.gather_objects(buffer.getvalue())]

    def average_gradients(self) -> None:
        """DDP's gradient all-reduce, done by hand: the LoRA modules are hooked into the frozen models, so there
        is no single module to wrap (sd-scripts does the same). One flat all-reduce per dtype over every
        trainable parameter (a missing gradient counts as zeros, so every process reduces the same tensors and a
        module unused on one process cannot hang the others). With --ddp_gradient_as_bucket_view the gradients
        become views into the reduced buffer instead of being copied back (one gradient copy less)."""
        params = [p for p in self.network.parameters() if p.requires_grad]
        by_dtype: dict[torch.dtype, list[torch.nn.Parameter]] = {}
        for p in params:
            by_dtype.setdefault(p.dtype, []).append(p)
        for group in by_dtype.values():
            flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in group])
            flat = self.accelerator.reduce(flat, reduction="mean")
            offset = 0
            for p in group:
                view = flat[offset: offset + p.numel()].view_as(p)
                offset += p.numel()
                if self.cfg.memory.ddp_gradient_as_bucket_view:
                    p.grad = view
                elif p.grad is None:
                    p.grad = view.clone()
                else:
                    p.grad.copy_(view)

    @contextlib.contextmanager
    def eval_context(self) -> Iterator[None]:
        """LoRA without dropout, schedule-free averaged weights, no grad; the training RNG left untouched."""
        rng = torch.get_rng_state()
        self.network.eval()
        try:
            with eval_mode(self.optimizer), torch.no_grad():
                yield
        finally:
            self.network.train()
            torch.set_rng_state(rng)

    # ---- optimisation ---------------------------------------------------------------------------------------------
    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def optimizer_step(self, *, finite_loss: bool) -> tuple[bool, float | None]:
        """Clip, check, step, schedule; returns (stepped, grad norm). Skips (and clears) non-finite steps."""
        params = [p for p in self.network.parameters() if p.requires_grad]
        if self.num_processes > 1:
            # before unscaling, so the fp16 scaler sees the same (reduced) inf/NaN on every process and all of
            # them skip or step together
            self.average_gradients()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        max_norm = self.cfg.optim.max_grad_norm
        if max_norm and max_norm > 0:
            norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        else:
            norm = float(torch.linalg.vector_norm(torch.stack(
                [p.grad.detach().float().norm() for p in params if p.grad is not None] or [torch.zeros(())])))
        if not (finite_loss and math.isfinite(norm)):
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.update()
            return False, norm
        self.network.update_norms()
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.cfg.network.scale_weight_norms:
            scaled, mean, largest = self.network.apply_max_norm(self.cfg.network.scale_weight_norms, self.device)
            self.max_norm_logs = {"max_norm/keys_scaled": scaled, "max_norm/average_key_norm": mean,
                                  "max_norm/max_key_norm": largest}
        return True, norm

    def lr_logs(self) -> dict[str, float]:
        return {f"lr/{name}": float(group["lr"])
                for name, group in zip(self.param_group_names, self.optimizer.param_groups, strict=False)}

    # ---- outputs ----------------------------------------------------------------------------------------------------
    def save_lora(self, path: Path, *, steps: int, epoch: int, finished: bool = False) -> Path:
        if not self.is_main:
            return path
        from fluxlora.network.saving import save_dtype

        metadata = lora_metadata(self.cfg, self.pre, self.facts, steps=steps, epoch=epoch,
                                 network_args=dict(self.network.args.raw), finished=finished)
        with eval_mode(self.optimizer):  # schedule-free: save the averaged weights users should run
            self.network.save(path, save_dtype(self.cfg.precision.save_precision), metadata)
        logger.info("saved %s", path)
        return path

    def remove_file(self, path: Path) -> None:
        if self.is_main and path.exists():
            path.unlink()
            logger.info("removed %s (retention)", path)

    def remove_dir(self, path: Path) -> None:
        if self.is_main and path.is_dir():
            # rename first (atomic), then delete: a crash mid-delete never leaves a half-deleted state folder that
            # still looks complete under its final name
            doomed = path.with_name(f".{path.name}.removing.tmp")
            shutil.rmtree(doomed, ignore_errors=True)
            path.rename(doomed)
            shutil.rmtree(doomed)
            logger.info("removed %s (retention)", path)

    def sample(self, *, epoch: int | None, step: int) -> None:
        """Sample images with the prompt file (spec §8); a no-op without --sample_prompts.

        `epoch` names epoch files (0 before training), None step files. With several processes every process
        calls this: prompt i is generated by process i mod n, and the main process gathers and writes every file."""
        if self.cfg.sampling.sample_prompts is None:
            return
        from fluxlora.inference.prompts import load_prompt_file
        from fluxlora.inference.training_samples import accelerate_image_logger, sample_during_training

        if self.sample_prompts is not None:  # the encoders are gone: the prompts were read and encoded up front
            prompts, encode = list(self.sample_prompts.prompts), self.sample_prompts.encode
        else:
            prompts = load_prompt_file(self.cfg.sampling.sample_prompts, flag="--sample_prompts")
            encode = text_encoder(self.models, self.cfg.flow.apply_t5_attn_mask, self.precision, self.device)
        ae = self.models.ae
        home = next(ae.parameters()).device
        ae.to(self.device)  # with cached latents the AE waits on the host: on the device only while sampling
        try:
            with self.eval_context():
                sample_during_training(
                    flux=self.models.flux, ae=ae, encode_fn=encode, prompts=prompts,
                    output_dir=self.cfg.saving.output_dir, output_name=self.cfg.saving.output_name, epoch=epoch,
                    step=step, variant=self.models.flux_info.variant, device=self.device,
                    dtype=self.precision.compute, apply_t5_attn_mask=self.cfg.flow.apply_t5_attn_mask,
                    modules=[self.network, self.models.clip, self.models.t5],
                    tracker=accelerate_image_logger(self.accelerator) if self.tracker is not None else None,
                    process_index=self.process_index, num_processes=self.num_processes, gather=self.gather_objects,
                )
        finally:
            ae.to(home)

    @property
    def tracker(self) -> Any | None:
        return self.accelerator if self.cfg.logging.log_with else None

    def log(self, values: dict[str, float], *, step: int) -> None:
        if self.cfg.logging.log_with:
            self.accelerator.log(values, step=step)

    def end(self) -> None:
        if self.cfg.logging.log_with:
            self.accelerator.end_training()
