"""The FLUX.2 autoencoder in the BFL / ComfyUI layout (`ae.safetensors`, `flux2-vae.safetensors`), and its loader.

Decision: our own module, not diffusers' `AutoencoderKLFlux2`. The FLUX.2 AE is the FLUX.1 AE
(`fluxlora.models.autoencoder`: same encoder/decoder, same key names) with 32 latent channels, 1×1 quant convs
(`encoder.quant_conv`, `decoder.post_quant_conv`) and batch-norm statistics of the 2×2-patched latent (`bn.running_mean`,
`bn.running_var`, 128 channels, eps 1e-4). Reusing the FLUX.1 blocks keeps one encoder/decoder in the code base, loads
the BFL/ComfyUI file with a plain key-set check, and keeps parameter names = file keys as everywhere else; diffusers'
`vae/` folder loads through an explicit key map (`diffusers_vae_to_bfl`), and `AutoencoderKLFlux2` is the numerical
oracle in the tests.

Latent convention (BFL `flux2` and diffusers' Flux2 pipelines): encode = posterior mean → 2×2 patchify → (z − mean) /
sqrt(var + eps); decode inverts it. The transformer sees [B, 128, H/16, W/16] latents. Like the FLUX.1 AE, `encode`
returns the mean (a cache entry is a pure function of image and weights; spec §12.8).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from fluxlora.errors import CheckpointError
from fluxlora.families.flux2.latents import patchify, unpatchify
from fluxlora.models.autoencoder import AutoEncoderParams, Decoder, Encoder, params_from_shapes
from fluxlora.models.checkpoints import DTYPES, check_keys, load_tensors, module_shapes, read_header
from fluxlora.models.fp8 import FP8_DTYPES

logger = logging.getLogger(__name__)

BN_EPS = 1e-4
PATCH = 2
OPTIONAL_FILE_KEYS = frozenset({"bn.num_batches_tracked"})  # BatchNorm's counter: saved by some tools, never used


class Flux2Encoder(Encoder):
    """FLUX.1's encoder followed by the 1×1 `quant_conv` over (mean ‖ logvar)."""

    def __init__(self, p: AutoEncoderParams):
        super().__init__(p)
        self.quant_conv = nn.Conv2d(2 * p.z_channels, 2 * p.z_channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.quant_conv(super().forward(x))


class Flux2Decoder(Decoder):
    """The 1×1 `post_quant_conv`, then FLUX.1's decoder."""

    def __init__(self, p: AutoEncoderParams):
        super().__init__(p)
        self.post_quant_conv = nn.Conv2d(p.z_channels, p.z_channels, kernel_size=1)

    def forward(self, z: Tensor) -> Tensor:
        return super().forward(self.post_quant_conv(z))


class LatentStats(nn.Module):
    """The batch-norm statistics of the patched latent, as buffers named like the file's `bn.*` keys."""

    def __init__(self, channels: int):
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def std(self) -> Tensor:
        return torch.sqrt(self.running_var.float() + BN_EPS)


def flux2_ae_params(*, ch: int = 128, ch_mult: tuple[int, ...] = (1, 2, 4, 4), num_res_blocks: int = 2,
                    z_channels: int = 32) -> AutoEncoderParams:
    """The FLUX.2 AE (84 M parameters); smaller `ch`/`ch_mult` give the tiny test AE in the same layout."""
    return AutoEncoderParams(ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks, z_channels=z_channels,
                             scale_factor=1.0, shift_factor=0.0)


class Flux2AutoEncoder(nn.Module):
    """Images in [-1, 1] ↔ normalised patched latents [B, 4·z_channels, H/16, W/16]."""

    def __init__(self, params: AutoEncoderParams):
        super().__init__()
        self.params = params
        self.encoder = Flux2Encoder(params)
        self.decoder = Flux2Decoder(params)
        self.bn = LatentStats(PATCH * PATCH * params.z_channels)

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.encoder.conv_in.weight.device

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent token side: the AE's ×8 times the 2×2 patch."""
        return self.params.downsample_factor * PATCH

    def encode(self, x: Tensor) -> Tensor:
        """Images [B,3,H,W] (H, W multiples of 16) → normalised latents [B,128,H/16,W/16] float32 (posterior mean)."""
        moments = self.encoder(x.to(device=self.device, dtype=self.dtype)).float()
        mean = moments[:, : self.params.z_channels]
        z = patchify(mean, PATCH)
        return (z - self.bn.running_mean.float()[None, :, None, None]) / self.bn.std()[None, :, None, None]

    def decode(self, z: Tensor) -> Tensor:
        """Normalised latents [B,128,h,w] → images [B,3,16h,16w] float32 (nominally in [-1, 1])."""
        z = z.float() * self.bn.std()[None, :, None, None] + self.bn.running_mean.float()[None, :, None, None]
        return self.decoder(unpatchify(z, PATCH).to(device=self.device, dtype=self.dtype)).float()


# ---------------------------------------------------------------- diffusers `vae/` layout


def _diffusers_rules(levels: int) -> list[tuple[re.Pattern, object]]:
    """(diffusers key pattern, BFL replacement) pairs; the decoder's up blocks run in reverse order in diffusers."""
    def up(m: re.Match) -> str:
        return f"decoder.up.{levels - 1 - int(m.group(1))}."

    return [
        (re.compile(r"^(encoder|decoder)\.conv_norm_out\."), r"\1.norm_out."),
        (re.compile(r"^quant_conv\."), "encoder.quant_conv."),
        (re.compile(r"^post_quant_conv\."), "decoder.post_quant_conv."),
        (re.compile(r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\."), r"encoder.down.\1.block.\2."),
        (re.compile(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\."), r"encoder.down.\1.downsample."),
        (re.compile(r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\."),
         lambda m: f"decoder.up.{levels - 1 - int(m.group(1))}.block.{m.group(2)}."),
        (re.compile(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\."), lambda m: up(m) + "upsample."),
        (re.compile(r"^(encoder|decoder)\.mid_block\.resnets\.0\."), r"\1.mid.block_1."),
        (re.compile(r"^(encoder|decoder)\.mid_block\.resnets\.1\."), r"\1.mid.block_2."),
        (re.compile(r"^(encoder|decoder)\.mid_block\.attentions\.0\.group_norm\."), r"\1.mid.attn_1.norm."),
        (re.compile(r"^(encoder|decoder)\.mid_block\.attentions\.0\.to_q\."), r"\1.mid.attn_1.q."),
        (re.compile(r"^(encoder|decoder)\.mid_block\.attentions\.0\.to_k\."), r"\1.mid.attn_1.k."),
        (re.compile(r"^(encoder|decoder)\.mid_block\.attentions\.0\.to_v\."), r"\1.mid.attn_1.v."),
        (re.compile(r"^(encoder|decoder)\.mid_block\.attentions\.0\.to_out\.0\."), r"\1.mid.attn_1.proj_out."),
    ]


def is_diffusers_vae(keys) -> bool:
    return any(k.startswith("encoder.down_blocks.") for k in keys)


def diffusers_vae_key_map(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, str]:
    """diffusers `AutoencoderKLFlux2` key → BFL key, for every key of `shapes` (unknown keys map to themselves)."""
    levels = 1 + max(int(k.split(".")[2]) for k in shapes if k.startswith("encoder.down_blocks."))
    rules = _diffusers_rules(levels)
    out = {}
    for key in shapes:
        new = key
        for pattern, repl in rules:
            new, n = pattern.subn(repl, key, count=1)
            if n:
                break
        out[key] = new.replace(".conv_shortcut.", ".nin_shortcut.")
    return out


_ATTN_WEIGHT = re.compile(r"\.mid\.attn_1\.(q|k|v|proj_out)\.weight$")


def _bfl_shape(key: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    return (*shape, 1, 1) if _ATTN_WEIGHT.search(key) and len(shape) == 2 else tuple(shape)


def _conv_attention(key: str, tensor: Tensor) -> Tensor:
    """diffusers' Linear q/k/v/proj_out weights [C, C] are the BFL 1×1 convs [C, C, 1, 1]."""
    if _ATTN_WEIGHT.search(key) and tensor.ndim == 2:
        return tensor[:, :, None, None]
    return tensor


# ---------------------------------------------------------------- loading


def load_flux2_ae(path: str | Path, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                  flag: str = "--ae") -> Flux2AutoEncoder:
    """Load a FLUX.2 AE (BFL/ComfyUI file, or diffusers `vae/diffusion_pytorch_model.safetensors`) strictly.

    A FLUX.1 `ae.safetensors` (16 latent channels, no batch-norm statistics) is refused by name: the two AEs are not
    interchangeable. The model comes back frozen in eval mode; fp8 files compute in bfloat16.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "vae" / "diffusion_pytorch_model.safetensors" if (path / "vae").is_dir() else \
            path / "diffusion_pytorch_model.safetensors"
    header = read_header(path, flag=flag)
    keys = header.shapes
    diffusers = is_diffusers_vae(keys)
    rename = diffusers_vae_key_map(keys) if diffusers else {k: k for k in keys}
    shapes = {rename[k]: _bfl_shape(rename[k], s) for k, s in keys.items()}
    if "encoder.conv_in.weight" not in shapes or "decoder.conv_in.weight" not in shapes:
        raise CheckpointError(f"{flag} {path}: not an autoencoder (no encoder/decoder conv_in); pass the FLUX.2 "
                              "ae.safetensors / flux2-vae.safetensors", path=path, key=flag)
    if "bn.running_mean" not in shapes:
        raise CheckpointError(f"{flag} {path}: this is a FLUX.1 autoencoder (no latent batch-norm statistics); FLUX.2 "
                              "needs its own 32-channel AE (ae.safetensors of FLUX.2, or ComfyUI's flux2-vae."
                              "safetensors)", path=path, key=flag)
    try:
        params = params_from_shapes(shapes)
        params = flux2_ae_params(ch=params.ch, ch_mult=params.ch_mult, num_res_blocks=params.num_res_blocks,
                                 z_channels=params.z_channels)
    except (KeyError, ValueError, IndexError) as err:
        raise CheckpointError(f"{flag} {path}: cannot derive the FLUX.2 autoencoder layout from its keys ({err}); "
                              "is this a FLUX.2 ae.safetensors?", path=path, key=flag) from None
    with torch.device("meta"):
        model = Flux2AutoEncoder(params)
    check_keys({k: s for k, s in shapes.items() if k not in OPTIONAL_FILE_KEYS}, module_shapes(model), path=path,
               what="the FLUX.2 autoencoder", flag=flag)
    if dtype is None:
        counts = header.dtype_counts()
        dtype = DTYPES[max(counts, key=counts.__getitem__)]
    if dtype in FP8_DTYPES:
        dtype = torch.bfloat16
    state = {}
    for file_key, tensor in load_tensors(header, device=device, dtype=dtype, keep_fp8=False).items():
        key = rename[file_key]
        if key in OPTIONAL_FILE_KEYS:
            continue
        tensor = _conv_attention(key, tensor)
        state[key] = tensor.float() if key.startswith("bn.") else tensor  # statistics stay fp32
    model.load_state_dict(state, strict=True, assign=True)
    model.requires_grad_(False).eval()
    logger.info("loaded FLUX.2 autoencoder %s (%s layout, %s)", path, "diffusers" if diffusers else "BFL", dtype)
    return model
