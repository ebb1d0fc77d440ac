"""The processes of a run (accelerate): which one is the main process, and the few collectives training needs.

With one process every collective is the identity, without touching torch.distributed.
"""

from __future__ import annotations

import io
import logging
import os
from datetime import timedelta
from typing import Any

import torch
from torch import nn

from fluxlora.config.train_config import TrainConfig
from fluxlora.errors import ConfigError
from fluxlora.training.logs import tracker_dir
from fluxlora.training.state import capture_rng

logger = logging.getLogger(__name__)


def make_accelerator(cfg: TrainConfig, num_processes: int) -> Any:
    """The run's Accelerator; under `accelerate launch` / torchrun with several processes it joins the process
    group (gloo on CPU-only machines, so `accelerate launch --multi_gpu` also works there)."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    kwargs: dict[str, Any] = {}
    if cfg.logging.log_with:
        kwargs["log_with"] = cfg.logging.log_with
        # sd-scripts' folder: <logging_dir>/<log_prefix><YYYYmmddHHMMSS>
        kwargs["project_dir"] = (str(tracker_dir(cfg.logging.logging_dir, cfg.logging.log_prefix))
                                 if cfg.logging.logging_dir else None)
    if cfg.memory.ddp_timeout:
        kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(timeout=timedelta(minutes=cfg.memory.ddp_timeout))]
    if num_processes > 1 and not torch.cuda.is_available():
        kwargs["cpu"] = True  # accelerate only forms a CPU (gloo) process group when told it runs on CPU
    accelerator = Accelerator(**kwargs)
    if accelerator.num_processes != num_processes:
        raise ConfigError(f"the launcher started {num_processes} processes but accelerate joined "
                          f"{accelerator.num_processes}; check the `accelerate launch` flags / accelerate config "
                          "(each process would otherwise train alone and write the same files)", key="accelerate")
    if cfg.memory.ddp_static_graph:
        logger.info("--ddp_static_graph: fluxlora's gradient all-reduce always covers the same tensors (every "
                    "trainable LoRA parameter, a missing gradient as zeros), which is what a static graph declares")
    if num_processes == 1 and (cfg.memory.ddp_gradient_as_bucket_view or cfg.memory.ddp_static_graph):
        logger.info("--ddp_* flags only matter with several processes (accelerate launch --num_processes N)")
    return accelerator


class Processes:
    """The run's processes through its Accelerator."""

    def __init__(self, accelerator: Any, *, gradient_as_bucket_view: bool = False) -> None:
        self.accelerator = accelerator
        self.gradient_as_bucket_view = gradient_as_bucket_view

    @property
    def is_main(self) -> bool:
        return bool(self.accelerator.is_main_process)

    @property
    def count(self) -> int:
        return int(self.accelerator.num_processes)

    @property
    def index(self) -> int:
        return int(self.accelerator.process_index)

    @property
    def device(self) -> torch.device:
        # accelerate names the CPU of a multi-process CPU run "cpu:<index>", which safetensors refuses
        device = self.accelerator.device
        return torch.device("cpu") if device.type == "cpu" else device

    def wait(self) -> None:
        self.accelerator.wait_for_everyone()

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """Element-wise sum of a small CPU tensor over all processes (itself with one process)."""
        if self.count == 1:
            return values
        return self.accelerator.reduce(values.to(self.device), reduction="sum").cpu()

    def gather_objects(self, obj: Any) -> list[Any]:
        """`obj` of every process, in process order (each process must call this)."""
        if self.count == 1:
            return [obj]
        from accelerate.utils import gather_object

        return list(gather_object([obj]))

    def gather_rng_states(self) -> list[dict[str, Any]]:
        """`capture_rng()` of every process, in process order (each process must call this). Sent as torch.save
        bytes: tensors pickled by all_gather_object do not load back in every torch version."""
        if self.count == 1:
            return [capture_rng()]
        buffer = io.BytesIO()
        torch.save(capture_rng(), buffer)
        return [torch.load(io.BytesIO(blob), weights_only=True) for blob in self.gather_objects(buffer.getvalue())]

    def average_gradients(self, params: list[nn.Parameter]) -> None:
        """DDP's gradient all-reduce, done by hand: the LoRA modules are hooked into the frozen models, so there
        is no single module to wrap (sd-scripts does the same). One flat all-reduce per dtype over every
        trainable parameter (a missing gradient counts as zeros, so every process reduces the same tensors and a
        module unused on one process cannot hang the others). With --ddp_gradient_as_bucket_view the gradients
        become views into the reduced buffer instead of being copied back (one gradient copy less)."""
        if self.count == 1:
            return
        by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
        for p in params:
            by_dtype.setdefault(p.dtype, []).append(p)
        for group in by_dtype.values():
            flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in group])
            flat = self.accelerator.reduce(flat, reduction="mean")
            offset = 0
            for p in group:
                view = flat[offset: offset + p.numel()].view_as(p)
                offset += p.numel()
                if self.gradient_as_bucket_view:
                    p.grad = view
                elif p.grad is None:
                    p.grad = view.clone()
                else:
                    p.grad.copy_(view)


def launched_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0") or 0)
