r"""Sample images during training (spec §8): when, where, with which RNG, plus a labelled grid and tracker logging.

- When: `sampling_due` — before the first step with `--sample_at_first`, after every `--sample_every_n_steps`
  optimizer steps, or at the end of every `--sample_every_n_epochs` epochs (which then replaces the step rule).
- Files, named exactly as sd-scripts names them (GUIs parse these names: fluxgym's gallery and model card read
  `_(\d+)_(\d+)_(\d+)\.png$` as step, prompt index, time stamp):
  `<output_dir>/sample/{output_name_}{eNNNNNN | NNNNNN}_{idx:02d}_{YYYYmmddHHMMSS}{_seed}.png` — `e` + epoch for
  epoch-end and first samples, else the global step; `_{seed}` only when the prompt sets one (`--d`). The seed
  actually used is in the PNG's text chunks either way, so every sample can be regenerated.
- With `--sample_grid`, also `<output_dir>/sample_grid/{output_name_}{eNNNNNN | NNNNNN}_{YYYYmmddHHMMSS}_grid.png`
  holding every prompt of the event side by side, labelled: outside `sample/`, where GUI galleries would show it.
- Sampling never changes the training trajectory: noise comes from its own generator, seeds without a value come from
  the OS, CPU/CUDA/python/numpy RNG states are saved and restored anyway, and every module's train/eval flag is put
  back exactly as it was.
- Trackers: `tensorboard_image_logger(writer)` or `accelerate_image_logger(accelerator)` give an `ImageLogger`
  (images logged as `sample_{i}` and `sample_grid`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import textwrap
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import nn

from fluxlora.families.base import ModelFamily, ModelInfo
from fluxlora.inference.prompts import SamplePrompt
from fluxlora.inference.sampler import EncodeFn, encode_texts, generate_images, save_png

logger = logging.getLogger(__name__)

SAMPLE_FOLDER = "sample"
GRID_FOLDER = "sample_grid"
LABEL_LINES = 3
LINE_HEIGHT = 12
CHAR_WIDTH = 6  # of PIL's default bitmap font


class ImageLogger(Protocol):
    def __call__(self, images: Mapping[str, Image.Image], step: int) -> None: ...


# ------------------------------------------------------------------------------------------ schedule


def sampling_due(*, step: int, epoch: int | None, every_n_steps: int | None, every_n_epochs: int | None,
                 at_first: bool) -> bool:
    """Whether to sample now. Call with step 0 before training, with `epoch=None` after each optimizer step and with
    the finished epoch's number (1-based) at each epoch end. `every_n_epochs` replaces the step rule (sd-scripts)."""
    if step == 0 and epoch in (None, 0):
        return at_first
    if every_n_epochs is not None and every_n_epochs > 0:
        return epoch is not None and epoch % every_n_epochs == 0
    if every_n_steps is not None and every_n_steps > 0:
        return epoch is None and step % every_n_steps == 0
    return False


# ------------------------------------------------------------------------------------------ file names


def _prefix(output_name: str | None, *, step: int, epoch: int | None) -> str:
    name = f"{output_name}_" if output_name else ""
    return f"{name}e{epoch:06d}" if epoch is not None else f"{name}{step:06d}"


def sample_image_path(output_dir: str | Path, output_name: str | None, *, step: int, epoch: int | None, index: int,
                      seed: int | None, timestamp: str) -> Path:
    """`<output_dir>/sample/{output_name_}{eNNNNNN | NNNNNN}_{index:02d}_{timestamp}{_seed}.png` (sd-scripts' name;
    `seed` is the prompt's own seed, None when it sets none)."""
    suffix = "" if seed is None else f"_{seed}"
    stem = f"{_prefix(output_name, step=step, epoch=epoch)}_{index:02d}_{timestamp}{suffix}"
    return Path(output_dir) / SAMPLE_FOLDER / f"{stem}.png"


def sample_grid_path(output_dir: str | Path, output_name: str | None, *, step: int, epoch: int | None,
                     timestamp: str) -> Path:
    """`<output_dir>/sample_grid/{output_name_}{eNNNNNN | NNNNNN}_{timestamp}_grid.png`."""
    return Path(output_dir) / GRID_FOLDER / f"{_prefix(output_name, step=step, epoch=epoch)}_{timestamp}_grid.png"


# ------------------------------------------------------------------------------------ state keeping


@contextlib.contextmanager
def preserved_rng_state() -> Iterator[None]:
    """Restore the CPU, CUDA, python and numpy RNG states on exit, whatever ran inside."""
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    py = random.getstate()
    npy = np.random.get_state()
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        random.setstate(py)
        np.random.set_state(npy)


@contextlib.contextmanager
def eval_mode(modules: Sequence[nn.Module | None]) -> Iterator[None]:
    """Put every module in eval mode; on exit give each submodule back its own train/eval flag."""
    saved = [(m, m.training) for root in modules if root is not None for m in root.modules()]
    for root in modules:
        if root is not None:
            root.eval()
    try:
        yield
    finally:
        for module, training in saved:
            module.training = training


# -------------------------------------------------------------------------------------------- grid


def label_for(index: int, image: Image.Image) -> str:
    info = image.info
    return f"#{index:02d} seed {info.get('seed', '?')}: {info.get('prompt', '')}"


def make_grid(images: Sequence[Image.Image], labels: Sequence[str]) -> Image.Image:
    """All images side by side (wrapping into rows beyond 4), each above its label, on white."""
    if not images:
        raise ValueError("make_grid needs at least one image")
    cols = len(images) if len(images) <= 4 else math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    cell_w = max(max(im.width for im in images), 96)
    label_h = LABEL_LINES * LINE_HEIGHT + 4
    cell_h = max(im.height for im in images) + label_h
    grid = Image.new("RGB", (cols * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    chars = max(8, cell_w // CHAR_WIDTH - 1)
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        x, y = (i % cols) * cell_w, (i // cols) * cell_h
        grid.paste(image.convert("RGB"), (x, y))
        lines = textwrap.wrap(label, chars)[:LABEL_LINES] or [""]
        for j, line in enumerate(lines):
            draw.text((x + 2, y + image.height + 2 + j * LINE_HEIGHT), line, fill="black", font=font)
    return grid


# ------------------------------------------------------------------------------------------ trackers


def tensorboard_image_logger(writer: Any) -> ImageLogger:
    """An ImageLogger writing to a TensorBoard `SummaryWriter` (or anything with its `add_image`)."""

    def log(images: Mapping[str, Image.Image], step: int) -> None:
        for name, image in images.items():
            writer.add_image(name, np.asarray(image.convert("RGB")), step, dataformats="HWC")
        writer.flush()

    return log


def accelerate_image_logger(accelerator: Any) -> ImageLogger | None:
    """An ImageLogger for the trackers of an accelerate `Accelerator` (tensorboard, wandb); None if it has none."""
    loggers: list[ImageLogger] = []
    for tracker in getattr(accelerator, "trackers", []):
        name = getattr(tracker, "name", "")
        if name == "tensorboard":
            loggers.append(tensorboard_image_logger(tracker.tracker))  # accelerate's accessor: the SummaryWriter
        elif name == "wandb":
            loggers.append(_wandb_logger(tracker))
        else:
            logger.warning("sample images are not logged to the %r tracker (tensorboard and wandb are)", name)
    if not loggers:
        return None

    def log(images: Mapping[str, Image.Image], step: int) -> None:
        for each in loggers:
            each(images, step)

    return log


def _wandb_logger(tracker: Any) -> ImageLogger:
    def log(images: Mapping[str, Image.Image], step: int) -> None:
        import wandb

        # As sd-scripts: no commit, so the images join the step's scalars.
        tracker.tracker.log({name: wandb.Image(image, caption=image.info.get("prompt")) for name, image in images.items()},
                        commit=False)

    return log


# ------------------------------------------------------------------------------- prompts encoded once


@dataclass(frozen=True)
class EncodedPrompts:
    """The `--sample_prompts` file read once and its texts encoded while the text encoders were loaded, for runs
    that free them after caching (sd-scripts does the same). `encode` looks the texts up instead of running them."""

    prompts: tuple[SamplePrompt, ...]
    conds: Mapping[str, Mapping[str, torch.Tensor]]  # text -> its conditioning (batch 1)

    def encode(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """An `EncodeFn` over the stored conditioning (the same tensors the encoders gave)."""
        missing = [t for t in texts if t not in self.conds]
        if missing:
            raise KeyError(f"sample text {missing[0][:40]!r} was not encoded before the text encoders were freed")
        return {k: torch.cat([self.conds[t][k] for t in texts]) for k in self.conds[texts[0]]}


def encode_sample_prompts(prompts: Sequence[SamplePrompt], encode_fn: EncodeFn, *, process_index: int = 0,
                          num_processes: int = 1) -> EncodedPrompts:
    """Encode the texts this process will sample (its share, as in `sample_during_training`), kept on the CPU.

    The texts go through `encode_texts` in the order `generate_images` gives them, so the chunks and therefore
    the tensors are exactly those a run that keeps its encoders computes at each sampling event."""
    mine = list(prompts)[process_index::num_processes]
    texts = [p.prompt for p in mine] + [p.negative_prompt for p in mine if p.cfg_scale != 1.0]
    conds = encode_texts(encode_fn, texts) if texts else {}
    return EncodedPrompts(prompts=tuple(prompts),
                          conds={t: {k: v.cpu() for k, v in c.items()} for t, c in conds.items()})


# ---------------------------------------------------------------------------------------- sampling


def sample_during_training(
    *,
    family: ModelFamily,
    info: ModelInfo,
    model: nn.Module,
    ae: nn.Module,
    encode_fn: EncodeFn,
    prompts: Sequence[SamplePrompt],
    output_dir: str | Path,
    output_name: str | None,
    step: int,
    epoch: int | None,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
    mask_text: bool = False,
    modules: Sequence[nn.Module | None] = (),
    tracker: ImageLogger | None = None,
    process_index: int = 0,
    num_processes: int = 1,
    on_stage: Callable[[str], None] | None = None,
    now: datetime | None = None,
    progress: bool = False,
    gather: Callable[[Any], list[Any]] | None = None,
    grid: bool = False,
) -> list[Path]:
    """Generate the sample images of one event, write them (and the grid with `grid`), log them; return the
    written paths.

    `epoch` is the finished epoch (or 0 before training) for epoch-named files, None for step-named ones. `modules`
    are the other modules to keep in eval mode while sampling (the LoRA network, text encoders); model and ae always
    are. With several processes, prompt i goes to process i mod num_processes (the grid holds this process's
    share; `_grid.png` becomes `_grid_rank{r}.png`). Training state — RNGs, train/eval flags, autograd — is untouched.
    """
    mine = list(enumerate(prompts))[process_index::num_processes]
    if not mine and gather is None:
        return []
    timestamp = (now or datetime.now()).strftime("%Y%m%d%H%M%S")
    images: list[Image.Image] = []
    if mine:
        logger.info("sampling %d image(s) at %s", len(mine), f"epoch {epoch}" if epoch is not None else f"step {step}")
        with preserved_rng_state(), eval_mode([model, ae, *modules]), torch.no_grad():
            images = generate_images(family, info, model, ae, encode_fn, [p for _, p in mine], device=device,
                                     dtype=dtype, mask_text=mask_text, progress=progress,
                                     on_stage=on_stage, extra_info={"step": str(step), "epoch": str(epoch)})
    if gather is not None and num_processes > 1:
        # Every process generated its share; the main process alone writes all files (one set of outputs).
        shares = gather([(index, image) for (index, _), image in zip(mine, images, strict=True)])
        if process_index != 0:
            return []
        pairs = sorted((pair for share in shares for pair in share), key=lambda pair: pair[0])
        mine = [(index, prompts[index]) for index, _ in pairs]
        images = [image for _, image in pairs]
        num_processes = 1  # the grid holds every prompt: no rank suffix
    paths = []
    for (index, prompt), image in zip(mine, images, strict=True):
        path = sample_image_path(output_dir, output_name, step=step, epoch=epoch, index=index, seed=prompt.seed,
                                 timestamp=timestamp)
        paths.append(save_png(image, path))
    labelled = None
    if grid or tracker is not None:
        labelled = make_grid(images, [label_for(index, image) for (index, _), image in zip(mine, images, strict=True)])
    if grid and labelled is not None:
        grid_path = sample_grid_path(output_dir, output_name, step=step, epoch=epoch, timestamp=timestamp)
        if num_processes > 1:
            grid_path = grid_path.with_name(grid_path.stem + f"_rank{process_index}.png")
        paths.append(save_png(labelled, grid_path))
    if tracker is not None:
        logged = {f"sample_{index}": image for (index, _), image in zip(mine, images, strict=True)}
        logged["sample_grid"] = labelled
        tracker(logged, step)
    return paths
