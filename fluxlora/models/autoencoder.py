"""The FLUX autoencoder in the BFL checkpoint layout (`ae.safetensors`), spec §3.4.

Module and parameter names equal the file's keys (`encoder.down.0.block.1.conv2.weight`, ...), so loading is a
strict key-set check plus an `assign=True` copy. Encoder: conv_in, `len(ch_mult)` levels of res blocks with
asymmetric-padded stride-2 downsampling between them, a mid block (res, single-head attention, res), GroupNorm,
swish, conv_out to 2·z_channels (mean ‖ logvar). Decoder mirrors it with one extra res block per level and nearest
×2 upsampling. There are no quant convs.

Latent convention: latents = scale_factor · (z − shift_factor) with 0.3611 / 0.1159; decode inverts it.

Decision (spec §12.8): `encode` returns the posterior MEAN by default, not a sample as sd-scripts does. A cached
latent is then a pure function of the image and the AE weights, so caches are reproducible and a cached run equals
an uncached one. `encode(x, sample=True, generator=g)` draws the sd-scripts-style sample from an explicit generator.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fluxlora.errors import CheckpointError
from fluxlora.models.checkpoints import (
    DTYPES,
    ModelKind,
    check_keys,
    load_tensors,
    module_shapes,
    read_header,
    require_kind,
)

logger = logging.getLogger(__name__)

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


@dataclass(frozen=True)
class AutoEncoderParams:
    """Hyper-parameters of the BFL autoencoder (the defaults are FLUX.1's)."""

    resolution: int = 256
    in_channels: int = 3
    ch: int = 128
    out_ch: int = 3
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 16
    scale_factor: float = 0.3611
    shift_factor: float = 0.1159

    @classmethod
    def flux(cls) -> AutoEncoderParams:
        """The FLUX.1 dev/schnell autoencoder (`ae.safetensors`, 83.8 M parameters)."""
        return cls()

    @classmethod
    def tiny(cls) -> AutoEncoderParams:
        """A small AE for tests: still 4 levels (×8 downsampling) and 16 latent channels, like the real one.

        ch stays 32 because every GroupNorm has 32 groups.
        """
        return cls(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1×1-conv projections (the mid block's `attn_1`)."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.norm = _norm(in_channels)
        self.q = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.k = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.v = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.proj_out = nn.Conv2d(in_channels, in_channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(x)
        q, k, v = self.q(h), self.k(h), self.v(h)
        b, c, height, width = q.shape
        # [B, C, H, W] -> [B, 1, H·W, C]: one head over all pixels.
        q, k, v = (t.reshape(b, 1, c, height * width).transpose(-1, -2) for t in (q, k, v))
        h = F.scaled_dot_product_attention(q, k, v)
        h = h.transpose(-1, -2).reshape(b, c, height, width)
        return x + self.proj_out(h)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = _norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class Downsample(nn.Module):
    def __init__(self, in_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        # Pad right and bottom only (the LDM convention the weights were trained with).
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    def __init__(self, in_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level; a plain container so keys read `down.{i}.block.{j}` / `down.{i}.downsample`."""

    def __init__(self, blocks: list[ResnetBlock]):
        super().__init__()
        self.block = nn.ModuleList(blocks)


class _Mid(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    def __init__(self, p: AutoEncoderParams):
        super().__init__()
        self.conv_in = nn.Conv2d(p.in_channels, p.ch, kernel_size=3, stride=1, padding=1)
        in_ch_mult = (1, *p.ch_mult)
        self.down = nn.ModuleList()
        block_in = p.ch
        for i_level, mult in enumerate(p.ch_mult):
            block_in = p.ch * in_ch_mult[i_level]
            block_out = p.ch * mult
            blocks = []
            for _ in range(p.num_res_blocks):
                blocks.append(ResnetBlock(block_in, block_out))
                block_in = block_out
            level = _Level(blocks)
            if i_level != len(p.ch_mult) - 1:
                level.downsample = Downsample(block_in)
            self.down.append(level)
        self.mid = _Mid(block_in)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * p.z_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, p: AutoEncoderParams):
        super().__init__()
        block_in = p.ch * p.ch_mult[-1]
        self.conv_in = nn.Conv2d(p.z_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = _Mid(block_in)
        levels: list[_Level] = []
        for i_level in reversed(range(len(p.ch_mult))):
            block_out = p.ch * p.ch_mult[i_level]
            blocks = []
            # The decoder has one more res block per level than the encoder.
            for _ in range(p.num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, block_out))
                block_in = block_out
            level = _Level(blocks)
            if i_level != 0:
                level.upsample = Upsample(block_in)
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, p.out_ch, kernel_size=3, stride=1, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


@dataclass(frozen=True)
class LatentPosterior:
    """The encoder's diagonal Gaussian, with `mean` already in the scaled latent convention.

    `mean` = scale·(μ − shift); `logvar` is the unscaled log-variance of z. Both float32.
    """

    mean: Tensor
    logvar: Tensor
    scale_factor: float
    shift_factor: float

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """Draw z ~ N(μ, exp(logvar)) in unscaled space, then scale: scale·(z − shift) = mean + scale·σ·ε."""
        eps = torch.randn(self.mean.shape, generator=generator, dtype=self.mean.dtype, device=self.mean.device)
        return self.mean + self.scale_factor * torch.exp(0.5 * self.logvar) * eps


class AutoEncoder(nn.Module):
    """The BFL FLUX autoencoder. Images are in [-1, 1], latents in the 0.3611 / 0.1159 convention."""

    def __init__(self, params: AutoEncoderParams):
        super().__init__()
        self.params = params
        self.encoder = Encoder(params)
        self.decoder = Decoder(params)

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.encoder.conv_in.weight.device

    def encode_posterior(self, x: Tensor) -> LatentPosterior:
        """Encode images [B,3,H,W] (H, W multiples of 8) into the latent posterior."""
        moments = self.encoder(x.to(device=self.device, dtype=self.dtype)).float()
        mean, logvar = moments.chunk(2, dim=1)
        # Same clamp as LDM/diffusers: keeps exp() finite for degenerate inputs, never active on real images.
        logvar = logvar.clamp(-30.0, 20.0)
        p = self.params
        return LatentPosterior(p.scale_factor * (mean - p.shift_factor), logvar, p.scale_factor, p.shift_factor)

    def encode(self, x: Tensor, *, sample: bool = False, generator: torch.Generator | None = None) -> Tensor:
        """Images [B,3,H,W] in [-1,1] -> latents [B,16,H/8,W/8] float32 (the posterior mean unless `sample`)."""
        posterior = self.encode_posterior(x)
        return posterior.sample(generator) if sample else posterior.mean

    def decode(self, z: Tensor) -> Tensor:
        """Latents [B,16,h,w] -> images [B,3,8h,8w] (float32, nominally in [-1,1])."""
        p = self.params
        z = z.float() / p.scale_factor + p.shift_factor
        return self.decoder(z.to(device=self.device, dtype=self.dtype)).float()

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))


def params_from_shapes(shapes: Mapping[str, tuple[int, ...]]) -> AutoEncoderParams:
    """Derive the AE hyper-parameters from a BFL-layout key -> shape map (so tiny and real files load alike).

    Raises KeyError/ValueError on a map that is not an AE; `load_ae` turns that into a CheckpointError.
    """
    ch, in_channels = shapes["encoder.conv_in.weight"][:2]
    levels = sorted({int(k.split(".")[2]) for k in shapes if k.startswith("encoder.down.")})
    if levels != list(range(len(levels))) or not levels:
        raise ValueError(f"encoder levels {levels} are not 0..n-1")
    num_res_blocks = len({k.split(".")[4] for k in shapes if k.startswith("encoder.down.0.block.")})
    ch_mult = []
    for i in levels:
        out_channels = shapes[f"encoder.down.{i}.block.0.conv1.weight"][0]
        if out_channels % ch:
            raise ValueError(f"level {i} width {out_channels} is not a multiple of ch={ch}")
        ch_mult.append(out_channels // ch)
    z_channels = shapes["encoder.conv_out.weight"][0] // 2
    out_ch = shapes["decoder.conv_out.weight"][0]
    return AutoEncoderParams(
        resolution=256, in_channels=in_channels, ch=ch, out_ch=out_ch, ch_mult=tuple(ch_mult),
        num_res_blocks=num_res_blocks, z_channels=z_channels,
    )


def load_ae(
    path: str | Path,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    flag: str = "--ae",
) -> AutoEncoder:
    """Load a BFL-layout autoencoder strictly: header -> kind check -> meta build -> key/shape check -> assign.

    `dtype` None keeps the file's dtype (fp8 files are up-cast to bfloat16: convolutions do not run in fp8).
    The model is returned frozen in eval mode.
    """
    header = read_header(path, flag=flag)
    require_kind(header, ModelKind.AE, flag=flag)
    try:
        params = params_from_shapes(header.shapes)
    except (KeyError, ValueError, IndexError) as err:
        raise CheckpointError(
            f"{flag} {header.path}: cannot derive the autoencoder layout from its keys ({err}); "
            "is this a BFL ae.safetensors?",
            path=header.path, key=flag,
        ) from None
    with torch.device("meta"):
        model = AutoEncoder(params)
    check_keys(header.shapes, module_shapes(model), path=header.path, what="the FLUX autoencoder (BFL layout)",
               flag=flag)
    if dtype is None:
        counts = header.dtype_counts()
        stored = max(counts, key=counts.__getitem__)
        dtype = DTYPES[stored]
    if dtype in FP8_DTYPES:
        dtype = torch.bfloat16
    state = load_tensors(header, device=device, dtype=dtype, keep_fp8=False)
    model.load_state_dict(state, strict=True, assign=True)
    model.requires_grad_(False).eval()
    logger.info("loaded autoencoder %s (%s, ch=%d, ch_mult=%s)", header.path, dtype, params.ch, params.ch_mult)
    return model
