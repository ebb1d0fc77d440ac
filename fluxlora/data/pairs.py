"""Paired images: each training image's control image from the subset's `conditioning_data_dir` (musubi-tuner:
`control_directory`), matched by file stem as sd-scripts matches ControlNet conditioning images.

What a control image is depends on the model family: a reference image (`"reference"`, FLUX.1 Kontext) or an
inpainting mask (`"mask"`, FLUX.1 Fill: white = the region the model paints). Both are resized and cropped with
their image's plan and flipped with it, so a pair needs the same aspect ratio (sizes may differ: a half-size
reference is fine); everything is checked from headers when the dataset is built, before weights load.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from fluxlora.data.buckets import ResizePlan, apply_plan, resolve_interpolation, to_pixels
from fluxlora.data.images import LoadedImage, check_complete, image_size, list_images
from fluxlora.errors import DatasetError

ControlKind = Literal["reference", "mask"]
CONTROL_KINDS: tuple[str, ...] = ("reference", "mask")
ASPECT_TOLERANCE = 0.01  # relative aspect-ratio difference a pair may have (rounding of resized exports)
Size = tuple[int, int]


class PairError(DatasetError):
    """A missing, ambiguous or mismatched pair: a dataset mistake (never skipped, unlike an unreadable file)."""


def control_index(folder: Path) -> dict[str, list[Path]]:
    """Image files of `folder` by stem (several files may share one stem: an ambiguity reported per image)."""
    index: dict[str, list[Path]] = {}
    for path in list_images(folder):
        index.setdefault(path.stem, []).append(path)
    return index


def find_control(image: Path, size: Size, folder: Path, index: Mapping[str, list[Path]], *,
                 kind: ControlKind) -> Path:
    """The control image of `image` (of header size `size`) in `folder`. PairError naming both files when it is
    missing, ambiguous or of another aspect ratio; DatasetError naming it when it is unreadable."""
    what = "mask" if kind == "mask" else "reference image"
    found = index.get(image.stem, [])
    if not found:
        raise PairError(f"{image}: no {what} named {image.stem}.* in conditioning_data_dir {folder}; add one "
                           "(same file stem) or move the image out of the subset", path=image)
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise PairError(f"{image}: several {what}s match it in {folder} ({names}); keep one", path=image)
    control = found[0]
    control_size = image_size(control)
    check_complete(control)
    if abs(control_size[0] / control_size[1] - size[0] / size[1]) > ASPECT_TOLERANCE * size[0] / size[1]:
        raise PairError(
            f"{image}: its {what} {control} is {control_size[0]}x{control_size[1]} but the image is "
            f"{size[0]}x{size[1]}; a pair must have the same aspect ratio (the {what} is resized and cropped with "
            "the image): re-export one of them", path=control)
    return control


def prepare_control(img: LoadedImage, plan: ResizePlan, *, flipped: bool, interpolation: str | None,
                    kind: ControlKind) -> torch.Tensor:
    """A control image resized and cropped with its image's `plan` and flipped with it: a reference gives pixels
    [3, H, W] in [-1, 1]; a mask gives [1, H, W] float32 of exactly 0 and 1 (luma ≥ 0.5 is 1)."""
    resample = resolve_interpolation(interpolation, img.size, plan.resized_size)
    if kind == "reference":
        rgb = apply_plan(img.rgb, plan, resample)
        rgb = rgb[:, ::-1] if flipped else rgb
        return to_pixels(np.ascontiguousarray(rgb))
    luma = img.rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R 601, as PIL "L"
    luma = np.clip(np.rint(luma), 0, 255).astype(np.uint8)
    mask = apply_plan(luma, plan, resample)
    mask = mask[:, ::-1] if flipped else mask
    return torch.from_numpy((np.ascontiguousarray(mask) >= 128).astype(np.float32)).unsqueeze(0)


def masked_image(pixels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The image [.., 3, H, W] in [-1, 1] with the pixels to paint (mask [.., 1, H, W] = 1) set to 0, as BFL's
    Fill sampling and diffusers' `FluxFillPipeline` blank them."""
    return pixels * (1 - mask)


# Names of the image conditioning a pair gives the model (beside the family's text conditioning).
REFERENCE_LATENTS = "reference_latents"  # [B, C, h, w] latents of the reference images
MASKED_LATENTS = "masked_latents"  # [B, C, h, w] latents of the images with the mask's region blanked
MASK = "mask"  # [B, 1, H, W] 0/1 pixel masks (1 = paint)


def pair_conditioning(batch: Mapping[str, torch.Tensor], encode: Callable[[torch.Tensor], torch.Tensor] | None
                      ) -> dict[str, torch.Tensor]:
    """The image conditioning of a batch with pairs (empty without): reference latents, or the mask with the masked
    image's latents; cached latents are used as they are, pixels go through `encode` (the AE: pixels in [-1, 1] →
    float32 latents)."""

    def latents(cached: str, pixels: str) -> torch.Tensor:
        if cached in batch:
            return batch[cached].float()
        if encode is None:
            raise RuntimeError(f"the batch has {pixels} but no autoencoder to encode them")
        return encode(batch[pixels]).float()

    if "control_latents" in batch or "control_images" in batch:
        return {REFERENCE_LATENTS: latents("control_latents", "control_images")}
    if "masks" in batch:
        return {MASK: batch["masks"].float(), MASKED_LATENTS: latents("masked_latents", "masked_images")}
    return {}
