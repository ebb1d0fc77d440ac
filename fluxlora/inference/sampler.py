"""The FLUX.1 sampler: packed noise, the flow time schedule, Euler steps, guidance, CFG and AE decode (spec §8, §10.4).

- Noise: `[1, (H/16)(W/16), 64]` packed tokens from a CPU `torch.Generator` seeded with the prompt's seed, in fp32,
  then moved to the device. (sd-scripts draws on the device; a CPU draw gives the same image for a seed on every
  machine.)
- Schedule: `t_j = linspace(1, 0, steps + 1)`; for dev shifted by `e^μ / (e^μ + 1/t − 1)` with μ on the flux_shift
  line of the packed token count (`fluxlora.flow`); schnell is not shifted (spec §12.28: sd-scripts' training
  sampler shifts schnell too, its inference script does not).
- Euler: `x ← x + (t_next − t_cur) · v(x, t_cur)`, latents and σ in fp32 whatever the compute dtype (spec §12.2).
- dev gets the embedded guidance value; true CFG (`cfg_scale ≠ 1`, for de-distilled bases) runs the batch
  [negative, positive] and uses `v_neg + s · (v_pos − v_neg)`.
- The T5 mask reaches the DiT only with `apply_t5_attn_mask`.
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
from fluxlora.files import atomic_write
from fluxlora.inference.prompts import SamplePrompt
from fluxlora.flow import flux_shift_mu, image_ids, text_ids, time_shift, unpack_latents

logger = logging.getLogger(__name__)

PATCH = 16  # pixels per packed token side: AE ×8, then 2×2 patches
EncodeFn = Callable[[list[str]], Mapping[str, Tensor]]
ENCODE_CHUNK = 8  # prompts per text-encoder call


# ----------------------------------------------------------------------------------------- pure maths


def schedule_shifted(variant: str) -> bool:
    """dev is sampled on the resolution-shifted schedule, schnell on the plain one."""
    if variant not in ("dev", "schnell"):
        raise ValueError(f"unknown FLUX variant {variant!r}: expected 'dev' or 'schnell'")
    return variant == "dev"


def flux_schedule(steps: int, image_seq_len: int, *, shift: bool) -> Tensor:
    """The steps + 1 noise levels from 1 to 0 (float32), shifted by the flux_shift μ line when `shift`."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    t = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64).float()
    if shift:
        t = time_shift(flux_shift_mu(image_seq_len), 1.0, t)
    return t


def packed_noise(seed: int, height: int, width: int, *, channels: int = 64) -> Tensor:
    """Initial noise `[1, (height/16)(width/16), channels]` in float32 from a CPU generator seeded with `seed`."""
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.randn(1, (height // PATCH) * (width // PATCH), channels, generator=generator, dtype=torch.float32)


def _autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def denoise(
    flux: nn.Module,
    noise: Tensor,
    sigmas: Tensor,
    cond: Mapping[str, Tensor],
    *,
    height: int,
    width: int,
    guidance: float,
    negative: Mapping[str, Tensor] | None = None,
    cfg_scale: float = 1.0,
    apply_t5_attn_mask: bool = False,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    on_step: Callable[[], None] | None = None,
) -> Tensor:
    """Integrate the flow from `noise` (packed, [1, L, 64]) along `sigmas` with Euler steps; returns fp32 latents.

    `cond` / `negative` are {clip_pooled [1, D], t5_out [1, T, C], t5_mask [1, T]}. CFG runs when `negative` is
    given and `cfg_scale != 1`; the guidance value is passed only to guidance-distilled (dev) models.
    """
    device = torch.device(device) if device is not None else next(flux.parameters()).device
    x = noise.to(device=device, dtype=torch.float32)
    do_cfg = negative is not None and cfg_scale != 1.0
    conds = [negative, cond] if do_cfg else [cond]
    txt = torch.cat([c["t5_out"] for c in conds]).to(device=device, dtype=dtype)
    y = torch.cat([c["clip_pooled"] for c in conds]).to(device=device, dtype=dtype)
    mask = torch.cat([c["t5_mask"] for c in conds]).to(device=device, dtype=torch.bool) if apply_t5_attn_mask else None
    batch = txt.shape[0]
    img_ids = image_ids(batch, height // PATCH, width // PATCH, device=device)
    txt_ids = text_ids(batch, txt.shape[1], device=device)
    guidance_vec = None
    if getattr(getattr(flux, "params", None), "guidance_embed", True):
        guidance_vec = torch.full((batch,), float(guidance), device=device, dtype=torch.float32)
    sigmas = sigmas.to(device=device, dtype=torch.float32)
    for i in range(len(sigmas) - 1):
        t_vec = sigmas[i].expand(batch)
        inp = x.expand(batch, -1, -1)
        with _autocast(device, dtype):
            v = flux(img=inp.to(dtype), img_ids=img_ids, txt=txt, txt_ids=txt_ids, timesteps=t_vec, y=y,
                     guidance=guidance_vec, txt_mask=mask).float()
        if do_cfg:
            v_neg, v_pos = v.chunk(2)
            v = v_neg + cfg_scale * (v_pos - v_neg)
        x = x + (sigmas[i + 1] - sigmas[i]) * v
        if on_step is not None:
            on_step()
    return x


@torch.no_grad()
def decode_latents(ae: nn.Module, packed: Tensor, height: int, width: int) -> Tensor:
    """Packed latents [B, L, 64] → images [B, 3, height, width] in [−1, 1] (float32)."""
    latents = unpack_latents(packed.float(), height // 8, width // 8)
    return ae.decode(latents).float().clamp(-1.0, 1.0)


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


def image_settings(prompt: SamplePrompt, variant: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The PNG text chunks of one image: each setting, plus an A1111-style `parameters` line viewers read."""
    shift = "resolution (flux_shift)" if schedule_shifted(variant) else "none"
    info = {
        "prompt": prompt.prompt, "negative_prompt": prompt.negative_prompt, "seed": str(prompt.seed),
        "steps": str(prompt.steps), "width": str(prompt.width), "height": str(prompt.height),
        "guidance": str(prompt.guidance), "cfg_scale": str(prompt.cfg_scale), "sampler": "euler (flow matching)",
        "schedule_shift": shift, "variant": variant, "software": "fluxlora",
    }
    info.update(extra or {})
    info["parameters"] = (
        f"{prompt.prompt}\nNegative prompt: {prompt.negative_prompt}\nSteps: {prompt.steps}, Sampler: Euler, "
        f"CFG scale: {prompt.cfg_scale}, Guidance: {prompt.guidance}, Seed: {prompt.seed}, "
        f"Size: {prompt.width}x{prompt.height}, Model: FLUX.1-{variant}"
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
    """{text: {clip_pooled [1, D], t5_out [1, T, C], t5_mask [1, T]}} for each distinct text, in small batches."""
    unique = list(dict.fromkeys(texts))
    out: dict[str, dict[str, Tensor]] = {}
    for start in range(0, len(unique), ENCODE_CHUNK):
        chunk = unique[start : start + ENCODE_CHUNK]
        encoded = encode_fn(chunk)
        for key in ("clip_pooled", "t5_out"):
            _check_finite(key, encoded[key], chunk)
        for i, text in enumerate(chunk):
            out[text] = {k: encoded[k][i : i + 1] for k in ("clip_pooled", "t5_out", "t5_mask")}
    return out


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="sampling", unit="step", leave=False)


def generate_images(
    flux: nn.Module,
    ae: nn.Module,
    encode_fn: EncodeFn,
    prompts: Sequence[SamplePrompt],
    *,
    variant: str,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
    apply_t5_attn_mask: bool = False,
    progress: bool = False,
    on_stage: Callable[[str], None] | None = None,
    extra_info: Mapping[str, str] | None = None,
) -> list[Image.Image]:
    """Generate one image per prompt: encode every text, then denoise each prompt, then decode (three stages, so
    `on_stage("encode" | "denoise" | "decode")` can move models on and off the device for --offload).

    `encode_fn(texts)` returns {clip_pooled, t5_out, t5_mask} for a list of texts. `dtype` is the DiT's compute
    dtype (autocast when not float32). A prompt without a seed gets a random one; every image's settings (its
    seed included) are in `image.info`. One progress bar covers all steps of all prompts.
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
    channels = getattr(getattr(flux, "params", None), "in_channels", 64)
    bar = _progress_bar(sum(p.steps for p in prompts), progress)
    latents = []
    try:
        for p in prompts:
            seq_len = (p.height // PATCH) * (p.width // PATCH)
            sigmas = flux_schedule(p.steps, seq_len, shift=schedule_shifted(variant))
            negative = cond[p.negative_prompt] if p.cfg_scale != 1.0 else None
            latents.append(denoise(
                flux, packed_noise(p.seed, p.height, p.width, channels=channels), sigmas, cond[p.prompt],
                height=p.height, width=p.width, guidance=p.guidance, negative=negative, cfg_scale=p.cfg_scale,
                apply_t5_attn_mask=apply_t5_attn_mask, dtype=dtype, device=device,
                on_step=bar.update if bar is not None else None))
    finally:
        if bar is not None:
            bar.close()

    stage("decode")
    images = []
    for p, x in zip(prompts, latents, strict=True):
        image = to_pil(decode_latents(ae, x, p.height, p.width))[0]
        image.info.update(image_settings(p, variant, extra_info))
        images.append(image)
    return images
