"""Aspect-ratio buckets and image preparation, exactly as sd-scripts computes them (spec §2.5), minus its bugs.

Fixed here: `bucket_no_upscale` never yields a zero-sized bucket (§12.12: a side is clamped to one
`bucket_reso_steps`, and the image is then enlarged just enough to cover it); non-bucket mode is the single
bucket `resolution` with the same cover-resize and crop, cached or not (§12.11); the alpha mask goes through the
same resize, crop and flip as the pixels so it stays aligned (§12.14).

Resizing uses Pillow (OpenCV is not a dependency). sd-scripts uses OpenCV for every filter but lanczos and box;
our `area` is Pillow's BOX filter, which for shrinking is the same pixel-area average as OpenCV's INTER_AREA,
and `bilinear`/`bicubic` are Pillow's antialiased versions (OpenCV's do not antialias when shrinking). Pixel
values can therefore differ from sd-scripts by a few levels; sizes, crops and buckets are identical.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from fluxlora.data.images import LoadedImage
from fluxlora.errors import DatasetError

FLUX_MULTIPLE = 16  # 8x autoencoder downscale, then 2x2 patches

INTERPOLATIONS: dict[str, Image.Resampling] = {
    "lanczos": Image.Resampling.LANCZOS,
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "linear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "cubic": Image.Resampling.BICUBIC,
    "area": Image.Resampling.BOX,
    "box": Image.Resampling.BOX,
}
"""Names accepted by `resize_interpolation` (and the guide's `interpolation_type`)."""

Size = tuple[int, int]


def check_step(step: int) -> None:
    """`bucket_reso_steps` must be a positive multiple of 16 for FLUX."""
    if step <= 0 or step % FLUX_MULTIPLE != 0:
        raise DatasetError(
            f"bucket_reso_steps = {step} is not a positive multiple of {FLUX_MULTIPLE} (FLUX needs sides divisible "
            f"by 16: 8x autoencoder, 2x2 patches); use 16, 32 or 64",
            key="bucket_reso_steps",
        )


def adjust_bucket_limits(resolution: Size, min_reso: int, max_reso: int, step: int) -> tuple[int, int]:
    """sd-scripts' limit adjustment: min floored and max ceiled to `step`, then min <= resolution <= max."""
    check_step(step)
    if min_reso % step:
        min_reso -= min_reso % step
    if max_reso % step:
        max_reso += step - max_reso % step
    if min(resolution) < min_reso:
        raise DatasetError(
            f"min_bucket_reso = {min_reso} is larger than the resolution {resolution}; lower min_bucket_reso",
            key="min_bucket_reso",
        )
    if max(resolution) > max_reso:
        raise DatasetError(
            f"max_bucket_reso = {max_reso} is smaller than the resolution {resolution}; raise max_bucket_reso",
            key="max_bucket_reso",
        )
    return min_reso, max_reso


def make_buckets(resolution: Size, min_reso: int, max_reso: int, step: int) -> list[Size]:
    """The predefined bucket set of sd-scripts (`make_bucket_resolutions`), sorted.

    With area A = W·H of `resolution`: the square floor(sqrt(A)/step)·step, and for every width w from
    `min_reso` to `max_reso` in `step`s, h = min(max_reso, floor((A // w)/step)·step); (w, h) and (h, w) are
    buckets when h >= min_reso.
    """
    check_step(step)
    area = resolution[0] * resolution[1]
    buckets: set[Size] = set()
    side = int(math.sqrt(area) // step) * step
    buckets.add((side, side))
    width = min_reso
    while width <= max_reso:
        height = min(max_reso, int((area // width) // step) * step)
        if height >= min_reso:
            buckets.add((width, height))
            buckets.add((height, width))
        width += step
    return sorted(buckets)


def single_bucket(resolution: Size) -> list[Size]:
    """Non-bucket mode (`enable_bucket = false`): the only bucket is `resolution`, which must suit FLUX."""
    if any(s <= 0 or s % FLUX_MULTIPLE for s in resolution):
        raise DatasetError(
            f"resolution {resolution[0]}x{resolution[1]} is not a multiple of {FLUX_MULTIPLE} on each side; "
            "use e.g. 512, 768 or 1024",
            key="resolution",
        )
    return [(int(resolution[0]), int(resolution[1]))]


def select_bucket(size: Size, buckets: list[Size]) -> Size:
    """The bucket for an image: itself if it is a bucket, else the one with the nearest aspect ratio
    (|bucket_ratio - image_ratio| minimal, first in sorted order on ties)."""
    if size in buckets:
        return size
    ratio = size[0] / size[1]
    errors = np.abs(np.array([w / h for w, h in buckets]) - ratio)
    return buckets[int(errors.argmin())]


def cover_size(size: Size, bucket: Size) -> Size:
    """Smallest aspect-preserving size that covers `bucket` (spec §2.5 rounding: int(x·s + 0.5))."""
    width, height = size
    if width / height > bucket[0] / bucket[1]:
        scale = bucket[1] / height  # wider than the bucket: match heights, crop the sides
    else:
        scale = bucket[0] / width
    return int(width * scale + 0.5), int(height * scale + 0.5)


def _round_to_steps(x: float, step: int) -> int:
    value = int(x + 0.5)
    return value - value % step


def no_upscale_plan(size: Size, resolution: Size, step: int) -> tuple[Size, Size]:
    """(bucket, resized_size) for `bucket_no_upscale`.

    Images larger than the resolution's area are shrunk to that area (of the two step-rounded candidates,
    the one with the smaller aspect error, as sd-scripts); smaller ones keep their size. The bucket is the
    resized size floored to `step` (crop, never pad). Fix of §12.12: a side that would floor to 0 is clamped
    to `step` and the image enlarged just enough to cover that bucket.
    """
    check_step(step)
    width, height = size
    area = resolution[0] * resolution[1]
    ratio = width / height
    if width * height > area:
        target_w = math.sqrt(area * ratio)
        target_h = area / target_w
        w_rounded = _round_to_steps(target_w, step)
        h_in_w = _round_to_steps(w_rounded / ratio, step)
        h_rounded = _round_to_steps(target_h, step)
        w_in_h = _round_to_steps(h_rounded * ratio, step)
        # A candidate that rounds a side to 0 has an infinite (or undefined) aspect error.
        err_w = abs(w_rounded / h_in_w - ratio) if h_in_w else math.inf
        err_h = abs(w_in_h / h_rounded - ratio) if h_rounded else math.inf
        if err_w < err_h:
            resized = (w_rounded, int(w_rounded / ratio + 0.5))
        else:
            resized = (int(h_rounded * ratio + 0.5), h_rounded)
    else:
        resized = (width, height)
    bucket = (max(step, resized[0] - resized[0] % step), max(step, resized[1] - resized[1] % step))
    if bucket[0] > resized[0] or bucket[1] > resized[1]:
        resized = cover_size(size, bucket)
    return bucket, resized


def no_upscale_bucket(size: Size, resolution: Size, step: int) -> Size:
    """The bucket of an image under `bucket_no_upscale` (see `no_upscale_plan`); never 0-sized."""
    return no_upscale_plan(size, resolution, step)[0]


def assign_bucket(
    size: Size,
    *,
    resolution: Size,
    enable_bucket: bool,
    bucket_no_upscale: bool = False,
    buckets: list[Size] | None = None,
    step: int = 64,
) -> tuple[Size, Size]:
    """(bucket, resized_size) for one image under the dataset's settings — the one call the dataset needs.

    `buckets` is `make_buckets(...)` for the predefined mode (ignored otherwise).
    """
    if not enable_bucket:
        bucket = single_bucket(resolution)[0]
        return bucket, cover_size(size, bucket)
    if bucket_no_upscale:
        return no_upscale_plan(size, resolution, step)
    if not buckets:
        raise ValueError("assign_bucket: predefined bucket mode needs the bucket list from make_buckets")
    bucket = select_bucket(size, buckets)
    return bucket, cover_size(size, bucket)


@dataclass(frozen=True)
class ResizePlan:
    """How one image becomes one bucket: resize to `resized_size`, then crop `crop_ltrb` (left, top, right,
    bottom, in resized pixels; right-left and bottom-top equal the bucket)."""

    resized_size: Size
    crop_ltrb: tuple[int, int, int, int]

    @property
    def bucket(self) -> Size:
        left, top, right, bottom = self.crop_ltrb
        return right - left, bottom - top


def plan_resize(
    size: Size, bucket: Size, *, random_crop: bool, rng: random.Random | None, resized_size: Size | None = None
) -> ResizePlan:
    """Cover-resize `size` to the bucket (or to the given `resized_size`), then crop the excess: centred
    (`excess // 2`) or, with `random_crop`, at offsets drawn uniformly in [0, excess] (x first, then y)."""
    resized = resized_size if resized_size is not None else cover_size(size, bucket)
    if resized[0] < bucket[0] or resized[1] < bucket[1]:
        raise ValueError(f"resized size {resized} does not cover bucket {bucket}")
    offsets = []
    for axis in (0, 1):
        excess = resized[axis] - bucket[axis]
        if excess and random_crop:
            if rng is None:
                raise ValueError("plan_resize: random_crop needs an rng")
            offsets.append(rng.randint(0, excess))
        else:
            offsets.append(excess // 2)
    left, top = offsets
    return ResizePlan(resized_size=resized, crop_ltrb=(left, top, left + bucket[0], top + bucket[1]))


def resolve_interpolation(name: str | None, size: Size, resized: Size) -> Image.Resampling:
    """Pillow filter for a `resize_interpolation` name; None = area when shrinking both sides, else lanczos."""
    if name is None:
        name = "area" if size[0] >= resized[0] and size[1] >= resized[1] else "lanczos"
    try:
        return INTERPOLATIONS[name.lower()]
    except KeyError:
        raise DatasetError(
            f"resize_interpolation = {name!r} is not one of {', '.join(INTERPOLATIONS)}",
            key="resize_interpolation",
        ) from None


def apply_plan(array: np.ndarray, plan: ResizePlan, resample: Image.Resampling) -> np.ndarray:
    """Resize then crop a uint8 H×W or H×W×C array with `plan` (the same call for pixels and alpha)."""
    height, width = array.shape[:2]
    if (width, height) != plan.resized_size:
        array = np.asarray(Image.fromarray(array).resize(plan.resized_size, resample=resample))
    left, top, right, bottom = plan.crop_ltrb
    return array[top:bottom, left:right]


def color_augment(rgb: np.ndarray, rng: random.Random) -> np.ndarray:
    """sd-scripts' colour jitter: with p=0.33, either a hue shift uniform in ±8 (of 180) or a gamma uniform in
    [0.95, 1.05].

    The gamma is applied to normalised values, 255·(x/255)^γ; sd-scripts raises the raw 0..255 value to γ,
    which clips or darkens whole images (255^1.05 = 336) — a bug we do not copy.
    """
    if rng.random() > 0.33:
        return rgb
    if rng.random() > 0.5:
        shift = rng.uniform(-8, 8)
        hsv = np.asarray(Image.fromarray(rgb).convert("HSV")).copy()
        # Pillow's hue runs 0..255 for a full turn, OpenCV's (and sd-scripts') 0..180.
        hue = hsv[:, :, 0].astype(np.int32) + int(round(shift * 256 / 180))
        hsv[:, :, 0] = np.mod(hue, 256).astype(np.uint8)
        return np.asarray(Image.fromarray(hsv, mode="HSV").convert("RGB"))
    gamma = rng.uniform(0.95, 1.05)
    out = 255.0 * np.power(rgb.astype(np.float64) / 255.0, gamma)
    return np.clip(np.floor(out + 0.5), 0, 255).astype(np.uint8)


@dataclass
class PreparedImage:
    """A training sample's pixels at bucket size: `pixels` [3,H,W] float32 in [-1, 1], `alpha_mask` [1,H,W]
    float32 in [0, 1] (or None), and how it was made."""

    pixels: torch.Tensor
    alpha_mask: torch.Tensor | None
    plan: ResizePlan
    flipped: bool
    original_size: Size


def _tensor(array: np.ndarray) -> torch.Tensor:
    # Pillow hands out read-only buffers and crops are views: copy only then.
    if not (array.flags.writeable and array.flags.c_contiguous):
        array = np.array(array, copy=True, order="C")
    return torch.from_numpy(array)


def to_pixels(rgb: np.ndarray) -> torch.Tensor:
    """uint8 H×W×3 -> float32 [3,H,W] in [-1, 1] as x/127.5 - 1."""
    return _tensor(rgb).permute(2, 0, 1).float() / 127.5 - 1.0


def prepare_image(
    img: LoadedImage,
    bucket: Size,
    *,
    interpolation: str | None,
    random_crop: bool,
    flip: bool,
    color_aug: bool,
    rng: random.Random,
    alpha_mask: bool,
    flip_aug: bool = False,
    resized_size: Size | None = None,
) -> PreparedImage:
    """Resize, crop, colour-augment and flip one image for its bucket (spec §2.5).

    `flip=True` always flips (a decision the caller drew, e.g. to match a cached flipped latent);
    `flip_aug=True` flips with probability 0.5 drawn from `rng`. `resized_size` overrides the cover-resize
    (pass the one from `no_upscale_plan`). rng draws happen in this order: crop x, crop y, colour, flip.
    The alpha mask (all ones when the image has none) gets the very same resize, crop and flip.
    """
    size = img.size
    plan = plan_resize(size, bucket, random_crop=random_crop, rng=rng, resized_size=resized_size)
    resample = resolve_interpolation(interpolation, size, plan.resized_size)
    rgb = apply_plan(img.rgb, plan, resample)
    mask = None
    if alpha_mask:
        alpha = img.alpha if img.alpha is not None else np.full(img.rgb.shape[:2], 255, np.uint8)
        mask = apply_plan(alpha, plan, resample)
    if color_aug:
        rgb = color_augment(rgb, rng)
    flipped = flip or (flip_aug and rng.random() < 0.5)
    if flipped:
        rgb = rgb[:, ::-1]
        mask = mask[:, ::-1] if mask is not None else None
    mask_tensor = None
    if mask is not None:
        mask_tensor = _tensor(mask).float().div_(255.0).unsqueeze(0)
    return PreparedImage(
        pixels=to_pixels(rgb), alpha_mask=mask_tensor, plan=plan, flipped=flipped, original_size=size
    )
