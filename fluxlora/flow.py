"""Rectified-flow training maths for FLUX.1: packing, noise levels, noising, targets and losses.

Every function here is pure: tensors in, tensors out, randomness only through an explicit
``torch.Generator``. σ, noise and losses are computed in float32 whatever the input dtype
(sd-scripts quantises σ to the weight dtype, spec §12.2; we do not). The inference sampler shares
``time_shift``, ``shift_sigma`` and ``flux_shift_mu``.

Shapes: latents ``[B, C, h, w]`` (C=16 for FLUX), packed tokens ``[B, h/2 · w/2, C·4]``, σ ``[B]``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from fluxlora.errors import ConfigError

__all__ = [
    "NUM_TRAIN_TIMESTEPS",
    "TIMESTEP_SAMPLING_MODES",
    "PREDICTION_TYPES",
    "LOSS_TYPES",
    "HUBER_SCHEDULES",
    "pack_latents",
    "unpack_latents",
    "image_ids",
    "text_ids",
    "time_shift",
    "shift_sigma",
    "flux_shift_mu",
    "discrete_sigma_table",
    "sample_density",
    "sample_sigmas",
    "sample_noise",
    "ip_noise_strength",
    "noisy_latents",
    "flow_target",
    "apply_prediction_type",
    "loss_weighting",
    "huber_c",
    "elementwise_loss",
    "latent_mask",
    "per_sample_loss",
    "reduce_loss",
]

NUM_TRAIN_TIMESTEPS = 1000
TIMESTEP_SAMPLING_MODES = ("sigma", "uniform", "sigmoid", "shift", "flux_shift")
PREDICTION_TYPES = ("raw", "additive", "sigma_scaled")
LOSS_TYPES = ("l2", "l1", "huber", "smooth_l1")
HUBER_SCHEDULES = ("constant", "exponential", "snr")

# flux_shift's μ line (BFL get_schedule): 0.5 at 256 packed tokens, 1.15 at 4096 (1024² images).
FLUX_BASE_SEQ_LEN, FLUX_MAX_SEQ_LEN = 256, 4096
FLUX_BASE_SHIFT, FLUX_MAX_SHIFT = 0.5, 1.15


# --------------------------------------------------------------------------------------------- packing


def pack_latents(x: Tensor) -> Tensor:
    """2×2-patchify latents ``[B, C, h, w]`` into tokens ``[B, (h/2)(w/2), C·4]`` (row-major, feature c·4+py·2+px)."""
    if x.ndim != 4 or x.shape[2] % 2 or x.shape[3] % 2:
        raise ValueError(
            f"pack_latents needs [B, C, h, w] latents with even h and w, got shape {tuple(x.shape)}"
        )
    return rearrange(x, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=2, pw=2)


def unpack_latents(x: Tensor, height: int, width: int) -> Tensor:
    """Inverse of :func:`pack_latents`: tokens ``[B, L, C·4]`` back to latents ``[B, C, height, width]``.

    ``height`` and ``width`` are the latent sides (not pixels), both even, with L = height/2 · width/2.
    """
    if height % 2 or width % 2 or x.ndim != 3 or x.shape[1] != (height // 2) * (width // 2) or x.shape[2] % 4:
        raise ValueError(
            f"unpack_latents: tokens of shape {tuple(x.shape)} do not fit latent size {height}x{width} "
            "(need even sides, L = height/2 * width/2 and a feature size divisible by 4)"
        )
    return rearrange(x, "b (h w) (c ph pw) -> b c (h ph) (w pw)", h=height // 2, w=width // 2, ph=2, pw=2)


def image_ids(
    batch: int,
    h2: int,
    w2: int,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Position ids ``[B, h2·w2, 3]`` of the packed image tokens: ``(0, row, col)`` in row-major order."""
    rows = torch.arange(h2, device=device, dtype=dtype)
    cols = torch.arange(w2, device=device, dtype=dtype)
    ids = torch.zeros(h2, w2, 3, device=device, dtype=dtype)
    ids[..., 1] = rows[:, None]
    ids[..., 2] = cols[None, :]
    return rearrange(ids, "h w c -> (h w) c").unsqueeze(0).expand(batch, -1, -1).contiguous()


def text_ids(
    batch: int, length: int, *, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Position ids ``[B, length, 3]`` of the text tokens: all zeros (FLUX gives text no position)."""
    return torch.zeros(batch, length, 3, device=device, dtype=dtype)


# --------------------------------------------------------------------------------------- noise levels


def time_shift(mu: float, sigma: float, t: Tensor) -> Tensor:
    """BFL's resolution shift ``e^μ / (e^μ + (1/t − 1)^sigma)``; with sigma=1 it is ``shift_sigma(e^μ, t)``."""
    t = t.float()
    return math.exp(mu) / (math.exp(mu) + (1.0 / t - 1.0) ** sigma)


def shift_sigma(shift: float, u: Tensor) -> Tensor:
    """Flow shift ``S·u / (1 + (S − 1)·u)``: S > 1 moves noise levels towards 1 (more noise)."""
    u = u.float()
    return shift * u / (1.0 + (shift - 1.0) * u)


def flux_shift_mu(
    seq_len: int,
    *,
    base_seq_len: int = FLUX_BASE_SEQ_LEN,
    max_seq_len: int = FLUX_MAX_SEQ_LEN,
    base_shift: float = FLUX_BASE_SHIFT,
    max_shift: float = FLUX_MAX_SHIFT,
) -> float:
    """μ of the FLUX resolution shift: linear in the packed token count, 0.5 @ 256 → 1.15 @ 4096 tokens."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return base_shift + slope * (seq_len - base_seq_len)


def discrete_sigma_table(shift: float, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> Tensor:
    """The 1000 discrete noise levels of ``sigma`` sampling: ``σ_i = shift_S((T − i)/T)``, i = 0..T−1 (float32)."""
    u = (num_train_timesteps - torch.arange(num_train_timesteps, dtype=torch.float64)) / num_train_timesteps
    return (shift * u / (1.0 + (shift - 1.0) * u)).float()


def sample_density(
    weighting_scheme: str | None,
    batch: int,
    *,
    generator: torch.Generator,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
) -> Tensor:
    """SD3 timestep density u in [0, 1] per sample: ``logit_normal``, ``mode``, anything else uniform.

    Same draws as diffusers' ``compute_density_for_timestep_sampling`` (which sd-scripts calls); written out
    here because importing ``diffusers.training_utils`` costs seconds at start-up.
    """
    device = generator.device
    if weighting_scheme == "logit_normal":
        n = torch.normal(mean=logit_mean, std=logit_std, size=(batch,), device=device, generator=generator)
        return torch.sigmoid(n).float()
    r = torch.rand(batch, device=device, generator=generator)
    if weighting_scheme == "mode":
        return (1 - r - mode_scale * (torch.cos(math.pi * r / 2) ** 2 - 1 + r)).float()
    return r.float()


def sample_sigmas(
    mode: str,
    batch: int,
    *,
    generator: torch.Generator,
    sigmoid_scale: float = 1.0,
    discrete_flow_shift: float = 3.0,
    seq_len: int | None = None,
    weighting_scheme: str | None = "uniform",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
) -> Tensor:
    """Draw one noise level σ per sample for ``--timestep_sampling mode`` (spec §4.2); float32 ``[B]``.

    Args:
        mode: ``sigma`` (discrete shifted table indexed by the weighting-scheme density), ``uniform``,
            ``sigmoid`` (sigmoid(s·n)), ``shift`` (shift_S(sigmoid(s·n))), ``flux_shift``
            (shift_{e^μ}(sigmoid(s·n)) with μ from ``seq_len``).
        generator: the only source of randomness; samples are drawn on its device.
        sigmoid_scale: s, the scale of the normal draw before the sigmoid.
        discrete_flow_shift: S of ``shift`` and of the ``sigma`` table (ignored by ``flux_shift``).
        seq_len: packed image tokens (h/2 · w/2), required by ``flux_shift``.
        weighting_scheme, logit_mean, logit_std, mode_scale: the density of ``sigma`` mode.
    """
    device = generator.device
    if mode == "uniform":
        return torch.rand(batch, generator=generator, device=device, dtype=torch.float32)
    if mode in ("sigmoid", "shift", "flux_shift"):
        sigma0 = torch.sigmoid(sigmoid_scale * torch.randn(batch, generator=generator, device=device))
        if mode == "sigmoid":
            return sigma0
        if mode == "shift":
            return shift_sigma(discrete_flow_shift, sigma0)
        if seq_len is None or seq_len <= 0:
            raise ValueError("sample_sigmas: flux_shift needs seq_len, the packed token count (h/2)·(w/2)")
        return time_shift(flux_shift_mu(seq_len), 1.0, sigma0)
    if mode == "sigma":
        u = sample_density(
            weighting_scheme,
            batch,
            generator=generator,
            logit_mean=logit_mean,
            logit_std=logit_std,
            mode_scale=mode_scale,
        )
        # `mode` density can reach u = 1 exactly (r = 0): clamp so the index stays inside the table.
        index = (u * NUM_TRAIN_TIMESTEPS).long().clamp(0, NUM_TRAIN_TIMESTEPS - 1)
        return discrete_sigma_table(discrete_flow_shift).to(device)[index]
    raise ConfigError(
        f"--timestep_sampling {mode!r} is not one of {', '.join(TIMESTEP_SAMPLING_MODES)}; pick one of them",
        key="--timestep_sampling",
    )


# ------------------------------------------------------------------------------------------- noising


def sample_noise(
    shape: tuple[int, ...] | torch.Size,
    *,
    generator: torch.Generator,
    device: torch.device | str | None = None,
) -> Tensor:
    """Standard normal noise ε in float32, drawn on the generator's device and moved to ``device``."""
    noise = torch.randn(tuple(shape), generator=generator, device=generator.device, dtype=torch.float32)
    return noise if device is None else noise.to(device)


def ip_noise_strength(gamma: float, random_strength: bool, generator: torch.Generator) -> float:
    """γ' of input perturbation: γ, or γ·U(0,1) drawn once per batch with ``--ip_noise_gamma_random_strength``."""
    if not random_strength:
        return float(gamma)
    return float(gamma) * float(torch.rand(1, generator=generator, device=generator.device).item())


def _per_sample(values: Tensor, like: Tensor) -> Tensor:
    """View a ``[B]`` tensor as ``[B, 1, 1, ...]`` so it broadcasts over ``like``'s other dimensions."""
    return values.float().reshape(values.shape[0], *([1] * (like.ndim - 1)))


def noisy_latents(x0: Tensor, noise: Tensor, sigmas: Tensor, *, ip_noise: Tensor | None = None) -> Tensor:
    """``x_t = (1 − σ)·x0 + σ·(ε + γ'ξ)`` in float32; ``ip_noise`` is the already scaled γ'·ξ (or None).

    The training target stays ``ε − x0`` (input perturbation only changes the input).
    """
    s = _per_sample(sigmas, x0)
    eps = noise.float() if ip_noise is None else noise.float() + ip_noise.float()
    return (1.0 - s) * x0.float() + s * eps


def flow_target(x0: Tensor, noise: Tensor) -> Tensor:
    """Rectified-flow velocity target ``ε − x0`` (float32)."""
    return noise.float() - x0.float()


# ------------------------------------------------------------------------------ predictions and loss


def loss_weighting(weighting_scheme: str | None, sigmas: Tensor) -> Tensor | None:
    """SD3 per-sample weight: ``sigma_sqrt`` ⇒ σ⁻², ``cosmap`` ⇒ 2/(π(1−2σ+2σ²)), otherwise None (weight 1)."""
    s = sigmas.float()
    if weighting_scheme == "sigma_sqrt":
        return s**-2.0
    if weighting_scheme == "cosmap":
        return 2.0 / (math.pi * (1.0 - 2.0 * s + 2.0 * s**2))
    return None


def apply_prediction_type(
    kind: str, pred: Tensor, x_t: Tensor, sigmas: Tensor, weighting_scheme: str | None
) -> tuple[Tensor, Tensor | None]:
    """Turn the model output into the value compared to the target (``--model_prediction_type``, spec §4.4).

    ``raw`` ⇒ pred (the proper velocity loss); ``additive`` ⇒ pred + x_t; ``sigma_scaled`` ⇒ x_t − σ·pred plus
    the per-sample weight of ``weighting_scheme`` (``[B]`` or None). All results are float32.
    """
    pred = pred.float()
    if kind == "raw":
        return pred, None
    if kind == "additive":
        return pred + x_t.float(), None
    if kind == "sigma_scaled":
        value = x_t.float() - _per_sample(sigmas, pred) * pred
        return value, loss_weighting(weighting_scheme, sigmas)
    raise ConfigError(
        f"--model_prediction_type {kind!r} is not one of {', '.join(PREDICTION_TYPES)}; use raw (recommended)",
        key="--model_prediction_type",
    )


def huber_c(schedule: str, huber_c: float, huber_scale: float, sigmas: Tensor) -> Tensor:
    """Per-sample Huber threshold c ``[B]`` for ``--huber_schedule`` (only needed by huber / smooth_l1 losses).

    ``constant`` ⇒ huber_c·huber_scale; ``exponential`` ⇒ huber_scale·huber_c^(t/1000) with t = 1000σ.
    """
    s = sigmas.float()
    if schedule == "constant":
        return torch.full_like(s, huber_c * huber_scale)
    if schedule == "exponential":
        if huber_c <= 0:
            raise ConfigError(
                f"--huber_c must be > 0 for --huber_schedule exponential, got {huber_c}", key="--huber_c"
            )
        return huber_scale * torch.exp(math.log(huber_c) * s)
    if schedule == "snr":
        raise ConfigError(
            "--huber_schedule snr needs a noise schedule with alphas_cumprod, which flow matching has not; "
            "use --huber_schedule constant or exponential",
            key="--huber_schedule",
        )
    raise ConfigError(
        f"--huber_schedule {schedule!r} is not one of constant, exponential; pick one of them",
        key="--huber_schedule",
    )


def elementwise_loss(
    kind: str, pred: Tensor, target: Tensor, huber_c_per_sample: Tensor | None = None
) -> Tensor:
    """Element-wise float32 loss (spec §4.6): l2 (p−y)², l1 |p−y|, huber 2c(√((p−y)²+c²) − c),
    smooth_l1 2(√((p−y)²+c²) − c), with c per sample (``[B]``, from :func:`huber_c`)."""
    diff = pred.float() - target.float()
    if kind == "l2":
        return diff**2
    if kind == "l1":
        return diff.abs()
    if kind in ("huber", "smooth_l1"):
        if huber_c_per_sample is None:
            raise ValueError(f"elementwise_loss: loss type {kind} needs huber_c_per_sample (see huber_c)")
        c = _per_sample(huber_c_per_sample, diff)
        core = torch.sqrt(diff**2 + c**2) - c
        return 2.0 * c * core if kind == "huber" else 2.0 * core
    raise ConfigError(
        f"--loss_type {kind!r} is not one of {', '.join(LOSS_TYPES)}; pick one of them", key="--loss_type"
    )


def latent_mask(mask: Tensor, h: int, w: int) -> Tensor:
    """Resize a loss mask ``[B, 1, H, W]`` (values in [0, 1]) to the latent size ``[B, 1, h, w]`` by area averaging."""
    if mask.ndim != 4 or mask.shape[1] != 1:
        raise ValueError(f"latent_mask needs a [B, 1, H, W] mask, got shape {tuple(mask.shape)}")
    return F.interpolate(mask.float(), size=(h, w), mode="area")


def per_sample_loss(
    elementwise: Tensor, *, mask: Tensor | None = None, normalize_mask: bool = True
) -> Tensor:
    """Mean of an element-wise loss ``[B, C, h, w]`` over all but the batch dimension → ``[B]`` (float32).

    With a latent-size mask ``[B, 1, h, w]`` the mean is taken over the masked area, ``Σ l·m / Σ m`` per sample
    (sd-scripts divides by the full area, spec §12.5; ``normalize_mask=False`` reproduces that). A sample whose
    mask is empty contributes 0.
    """
    loss = elementwise.float()
    dims = tuple(range(1, loss.ndim))
    if mask is None:
        return loss.mean(dim=dims)
    m = mask.float().expand_as(loss)
    if not normalize_mask:
        return (loss * m).mean(dim=dims)
    area = m.sum(dim=dims)
    return (loss * m).sum(dim=dims) / area.clamp_min(torch.finfo(torch.float32).tiny)


def reduce_loss(
    elementwise: Tensor,
    *,
    mask: Tensor | None = None,
    sample_weights: Tensor | None = None,
    normalize_mask: bool = True,
) -> Tensor:
    """Scalar training loss: per-sample (masked) mean, × per-sample weights ``[B]``, then the batch mean."""
    loss = per_sample_loss(elementwise, mask=mask, normalize_mask=normalize_mask)
    if sample_weights is not None:
        loss = loss * sample_weights.float()
    return loss.mean()


# --------------------------------------------------------------------------------------- sampling


def flux_schedule(steps: int, image_seq_len: int, *, shift: bool) -> Tensor:
    """The steps + 1 noise levels from 1 to 0 (float32), shifted by the flux_shift μ line when `shift`."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    t = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64).float()
    if shift:
        t = time_shift(flux_shift_mu(image_seq_len), 1.0, t)
    return t
