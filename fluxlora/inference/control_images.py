"""A sample prompt's control images (`--ci` / `--mi`) as the model's image conditioning.

FLUX.1 Kontext reads a reference image, FLUX.1 Fill an image and a mask (`ModelFamily.control_kind`). Each is
cover-resized to the prompt's size and centre-cropped (a pair of the same aspect ratio covers the same region), the
mask binarised at 50 %, and encoded with the AE, as training sees its pairs (`fluxlora.data.pairs`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from fluxlora.data.buckets import plan_resize
from fluxlora.data.images import load_image
from fluxlora.data.pairs import masked_image, pair_conditioning, prepare_control
from fluxlora.errors import ConfigError
from fluxlora.inference.prompts import SamplePrompt


def _fitted(path: str, size: tuple[int, int], kind: str) -> Tensor:
    image = load_image(Path(path))
    plan = plan_resize(image.size, size, random_crop=False, rng=None)
    return prepare_control(image, plan, flipped=False, interpolation=None, kind=kind)[None]


def prompt_conditioning(prompt: SamplePrompt, control_kind: str | None, ae: nn.Module, *, title: str
                        ) -> dict[str, Tensor]:
    """The prompt's image conditioning for a model reading `control_kind` pairs (empty when it reads none and the
    prompt gives none); ConfigError naming the prompt when they do not fit the model."""
    where = f"prompt {prompt.prompt[:40]!r}"
    given = [flag for flag, value in (("--ci", prompt.control_image), ("--mi", prompt.mask_image)) if value]
    if control_kind is None:
        if given:
            raise ConfigError(f"{where}: {' and '.join(given)} given, but {title} reads no control image; remove "
                              "them, or choose FLUX.1 Kontext / Fill with --model_type", key=given[0])
        return {}
    if control_kind == "reference":
        if prompt.mask_image:
            raise ConfigError(f"{where}: --mi is for FLUX.1 Fill; {title} reads only a reference image (--ci)",
                              key="--mi")
        if not prompt.control_image:
            return {}  # Kontext without a reference: text to image
    elif not (prompt.control_image and prompt.mask_image):
        raise ConfigError(f"{where}: {title} paints into an image: give the image with --ci PATH and the mask (white "
                          "= paint) with --mi PATH", key="--ci" if not prompt.control_image else "--mi")
    size = (prompt.width, prompt.height)
    parameter = next(ae.parameters())

    @torch.no_grad()
    def encode(pixels: Tensor) -> Tensor:
        return ae.encode(pixels.to(device=parameter.device, dtype=parameter.dtype)).float()

    pixels = _fitted(prompt.control_image, size, "reference")
    if control_kind == "reference":
        return pair_conditioning({"control_images": pixels}, encode)
    mask = _fitted(prompt.mask_image, size, "mask")
    return pair_conditioning({"masks": mask, "masked_images": masked_image(pixels, mask)}, encode)
