"""The flow sampler of every family: noise, the σ schedule, Euler steps, guidance, CFG and AE decode (spec §8, §10.4).

- Noise: the family's `initial_noise` (FLUX.1: `[1, (H/16)(W/16), 64]` packed tokens from a CPU `torch.Generator`
  seeded with the prompt's seed, in fp32; sd-scripts draws on the device; a CPU draw gives the same image for a
  seed on every machine).
- Schedule: the family's `sample_sigmas` (FLUX.1: `t_j = linspace(1, 0, steps + 1)`; dev shifted by
  `e^μ / (e^μ + 1/t − 1)` with μ on the flux_shift line of the packed token count; schnell is not shifted, spec
  §12.28: sd-scripts' training sampler shifts schnell too, its inference script does not).
- Euler: `x ← x + (t_next − t_cur) · v(x, t_cur)`, latents and σ in fp32 whatever the compute dtype (spec §12.2);
  v is the family's `predict`, the same call training makes.
- Guidance-distilled models get the guidance value as an input (`sampling_guidance`); true CFG (`cfg_scale ≠ 1`,
  for de-distilled bases) runs the batch [negative, positive] and uses `v_neg + s · (v_pos − v_neg)`.
- The text mask reaches the model only with `apply_t5_attn_mask`.
- Decode with the AE, clamp to [−1, 1], round to uint8. Each PIL image carries its settings in `image.info`, which
  `save_png` writes as PNG text chunks.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from torch import Tensor, nn

from fluxlora.errors import ConfigError
from fluxlora.families.base import ModelFamily, ModelInfo
from fluxlora.files import atomic_write
from fluxlora.flow import flux_schedule  # noqa: F401  (re-exported: the schedule tests and tools import it here)
from fluxlora.inference.control_images import prompt_conditioning
from fluxlora.inference.prompts import SamplePrompt

logger = logging.getLogger(__name__)

PATCH = 16  # pixels per packed token side: AE ×8, then 2×2 patches
EncodeFn = Callable[[list[str]], Mapping[str, Tensor]]
ENCODE_CHUNK = 8  # prompts per text-encoder call


# ----------------------------------------------------------------------------------------- pure maths


def packed_noise(seed: int, height: int, width: int, *, channels: int = 64) -> Tensor:
    """Initial noise `[1, (height/16)(width/16), channels]` in float32 from a CPU generator seeded with `seed`."""
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.randn(1, (height // PATCH) * (width // PATCH), channels, generator=generator, dtype=torch.float32)


def _autocast(device: torch.device, dtype: torch.dtype) -> Callable[[], contextlib.AbstractContextManager]:
    if dtype == torch.float32:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def denoise(
    family: ModelFamily,
    model: nn.Module,
    noise: Tensor,
    sigmas: Tensor,
    cond: Mapping[str, Tensor],
    *,
    guidance: float | None,
    negative: Mapping[str, Tensor] | None = None,
    cfg_scale: float = 1.0,
    mask_text: bool = False,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    on_step: Callable[[], None] | None = None,
) -> Tensor:
    """Integrate the flow from `noise` (latents [1, C, h, w]) along `sigmas` with Euler steps; returns fp32 latents.

    `cond` / `negative` are the family's text conditioning of one prompt (batch 1). CFG runs when `negative` is given
    and `cfg_scale != 1`; `guidance` is the model's guidance input (None when it takes none).
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    x = noise.to(device=device, dtype=torch.float32)
    do_cfg = negative is not None and cfg_scale != 1.0
    conds = [negative, cond] if do_cfg else [cond]
    batch_cond = {k: torch.cat([c[k] for c in conds]).to(device) for k in cond}
    batch = len(conds)
    sigmas = sigmas.to(device=device, dtype=torch.float32)
    autocast = _autocast(device, dtype)
    for i in range(len(sigmas) - 1):
        v = family.predict(model, x.expand(batch, -1, -1, -1), sigmas[i].expand(batch), batch_cond, guidance=guidance,
                           mask_text=mask_text, compute_dtype=dtype, autocast=autocast).to(device)
        if do_cfg:
            v_neg, v_pos = v.chunk(2)
            v = v_neg + cfg_scale * (v_pos - v_neg)
        x = x + (sigmas[i + 1] - sigmas[i]) * v
        if on_step is not None:
            on_step()
    return x


@torch.no_grad()
def decode_latents(ae: nn.Module, latents: Tensor) -> Tensor:
    """Latents [B, C, h, w] → images [B, 3, 8h, 8w] in [−1, 1] (float32)."""
    return ae.decode(latents.float()).float().clamp(-1.0, 1.0)


def to_pil(images: Tensor) -> list[Image.Image]:
    """Images [B, 3, H, W] in [−1, 1] → RGB PIL images (rounded to the nearest of 256 levels)."""
    pixels = ((images.float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(p.permute(1, 2, 0).cpu().numpy(), mode="RGB") for p in pixels]


# ----------------------------------------------------------------------------------- prompts and seeds


def resolve_seed(prompt: SamplePrompt) -> SamplePrompt:
    """The prompt with a concrete seed: its own, or a fresh 32-bit one from the OS (never the global RNGs)."""
    return prompt if prompt.seed is not None else replace(prompt, seed=secrets.randbits(32))


def check_size(prompt: SamplePrompt) -> None:
    for what, value in (("width", prompt.width), ("height", prompt.height)):
        if value <= 0 or value % PATCH:
            raise ConfigError(f"prompt {prompt.prompt[:40]!r}: {what} {value} must be a positive multiple of 16",
                              key=what)


def image_settings(prompt: SamplePrompt, model: ModelInfo, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The PNG text chunks of one image: each setting, plus an A1111-style `parameters` line viewers read."""
    info = {
        "prompt": prompt.prompt, "negative_prompt": prompt.negative_prompt, "seed": str(prompt.seed),
        "steps": str(prompt.steps), "width": str(prompt.width), "height": str(prompt.height),
        "guidance": str(prompt.guidance), "cfg_scale": str(prompt.cfg_scale), "sampler": "euler (flow matching)",
        "model_family": model.family, "variant": model.variant, "software": "fluxlora",
    }
    for key in ("control_image", "mask_image"):
        if getattr(prompt, key):
            info[key] = str(getattr(prompt, key))
    info.update(extra or {})
    info["parameters"] = (
        f"{prompt.prompt}\nNegative prompt: {prompt.negative_prompt}\nSteps: {prompt.steps}, Sampler: Euler, "
        f"CFG scale: {prompt.cfg_scale}, Guidance: {prompt.guidance}, Seed: {prompt.seed}, "
        f"Size: {prompt.width}x{prompt.height}, Model: {model.title}"
    )
    return info


def save_png(image: Image.Image, path: str | Path) -> Path:
    """Write `image` as PNG (atomically), its string `info` entries as text chunks."""
    path = Path(path)
    meta = PngInfo()
    for key, value in image.info.items():
        if isinstance(key, str) and isinstance(value, str):
            meta.add_text(key, value)
    with atomic_write(path) as handle:
        image.save(handle, format="PNG", pnginfo=meta)
    return path


# ------------------------------------------------------------------------------------------ generation


def _check_finite(name: str, tensor: Tensor, texts: Sequence[str]) -> None:
    if not torch.isfinite(tensor).all():
        raise ConfigError(
            f"the text encoder produced NaN/inf {name} for {texts[0][:40]!r}: its dtype overflows (T5 in float16 "
            "does); run it in bfloat16 or float32 (--t5xxl_dtype / --clip_l_dtype)", key="--t5xxl_dtype")


def encode_texts(encode_fn: EncodeFn, texts: Sequence[str]) -> dict[str, dict[str, Tensor]]:
    """{text: its conditioning, batch 1} for each distinct text, in small batches (FLUX.1: {clip_pooled [1, D],
    t5_out [1, T, C], t5_mask [1, T]})."""
    unique = list(dict.fromkeys(texts))
    out: dict[str, dict[str, Tensor]] = {}
    for start in range(0, len(unique), ENCODE_CHUNK):
        chunk = unique[start : start + ENCODE_CHUNK]
        encoded = encode_fn(chunk)
        for key, value in encoded.items():
            if value.is_floating_point():
                _check_finite(key, value, chunk)
        for i, text in enumerate(chunk):
            out[text] = {k: v[i : i + 1] for k, v in encoded.items()}
    return out


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="sampling", unit="step", leave=False)


def generate_images(
    family: ModelFamily,
    info: ModelInfo,
    model: nn.Module,
    ae: nn.Module,
    encode_fn: EncodeFn,
    prompts: Sequence[SamplePrompt],
    *,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
    mask_text: bool = False,
    progress: bool = False,
    on_stage: Callable[[str], None] | None = None,
    extra_info: Mapping[str, str] | None = None,
) -> list[Image.Image]:
    """Generate one image per prompt: encode every text, then denoise each prompt, then decode (three stages, so
    `on_stage("encode" | "denoise" | "decode")` can move models on and off the device for --offload).

    `encode_fn(texts)` returns the family's text conditioning for a list of texts. `dtype` is the transformer's
    compute dtype (autocast when not float32). The σ schedule and the guidance input are the family's. A prompt
    without a seed gets a random one; every image's settings (its seed included) are in `image.info`. One progress
    bar covers all steps of all prompts.
    """
    device = torch.device(device)
    prompts = [resolve_seed(p) for p in prompts]
    for p in prompts:
        check_size(p)
    stage = on_stage or (lambda name: None)

    stage("encode")
    texts = [p.prompt for p in prompts] + [p.negative_prompt for p in prompts if p.cfg_scale != 1.0]
    cond = encode_texts(encode_fn, texts) if prompts else {}

    stage("denoise")
    bar = _progress_bar(sum(p.steps for p in prompts), progress)
    latents = []
    try:
        for p in prompts:
            sigmas = family.sample_sigmas(info, p.steps, (p.height // PATCH) * (p.width // PATCH))
            images = prompt_conditioning(p, family.control_kind, ae, title=info.title)  # Kontext / Fill inputs
            negative = {**cond[p.negative_prompt], **images} if p.cfg_scale != 1.0 else None
            latents.append(denoise(
                family, model, family.initial_noise(p.seed, p.height, p.width), sigmas, {**cond[p.prompt], **images},
                guidance=family.sampling_guidance(info, p.guidance), negative=negative, cfg_scale=p.cfg_scale,
                mask_text=mask_text, dtype=dtype, device=device, on_step=bar.update if bar is not None else None))
    finally:
        if bar is not None:
            bar.close()

    stage("decode")
    images = []
    for p, x in zip(prompts, latents, strict=True):
        image = to_pil(decode_latents(ae, x))[0]
        image.info.update(image_settings(p, info, extra_info))
        images.append(image)
    return images
