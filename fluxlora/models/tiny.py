"""Tiny checkpoints in the real file formats, for tests and the demo (`fluxlora make-tiny OUTDIR [--seed N]`).

Writes `flux1-dev.safetensors` / `flux1-schnell.safetensors` (BFL keys, width 64, 2 heads of 32, 2 double +
2 single blocks), `clip_l.safetensors` and `t5xxl.safetensors` (ComfyUI layout, real vocabularies) and
`ae.safetensors` (BFL layout). They load through exactly the code that loads the 23 GB files. Weights are
drawn from a seeded generator at a fan-in scale so activations are O(1); files are fp32 so tests can compare
against reference implementations tightly.
"""

from __future__ import annotations

import argparse
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fluxlora.files import save_safetensors
from fluxlora.models.flux import Flux, FluxParams, axes_dim_for

logger = logging.getLogger(__name__)

TOKENIZERS_DIR = Path(__file__).resolve().parents[1] / "assets"  # real clip_l/ and t5xxl/ tokenizers
TINY_HIDDEN, TINY_HEADS = 64, 2
# Per-file seed offsets: each file has its own generator stream, so adding a file never changes another.
_STREAMS = {"flux1-dev": 0, "flux1-schnell": 1, "clip_l": 2, "t5xxl": 3, "ae": 4}


@dataclass(frozen=True)
class TinyPaths:
    flux_dev: Path
    flux_schnell: Path | None  # None when only the dev file was asked for
    clip_l: Path
    t5xxl: Path
    ae: Path
    tokenizers: Path  # folder with clip_l/ and t5xxl/ tokenizer files


def tiny_flux_params(variant: str = "dev") -> FluxParams:
    """The tiny FLUX: vec_in_dim / context_in_dim equal the tiny CLIP hidden size / T5 d_model."""
    from fluxlora.models.text_encoders import tiny_clip_l_config, tiny_t5xxl_config

    return FluxParams(
        in_channels=64,
        vec_in_dim=tiny_clip_l_config().hidden_size,
        context_in_dim=tiny_t5xxl_config().d_model,
        hidden_size=TINY_HIDDEN,
        mlp_ratio=4.0,
        num_heads=TINY_HEADS,
        depth=2,
        depth_single_blocks=2,
        axes_dim=axes_dim_for(TINY_HIDDEN // TINY_HEADS),
        theta=10000,
        qkv_bias=True,
        guidance_embed=(variant == "dev"),
    )


def __getattr__(name: str) -> FluxParams:
    # TINY_FLUX depends on the text-encoder configs; computed on access so importing this module stays light.
    if name == "TINY_FLUX":
        return tiny_flux_params("dev")
    raise AttributeError(name)


@torch.no_grad()
def init_weights_(module: nn.Module, generator: torch.Generator) -> nn.Module:
    """Deterministic O(1)-activation init: matrices N(0, 1/fan_in), biases N(0, 0.02²), norm scales 1 + N(0, 0.1²)."""
    for name, param in sorted(module.named_parameters(), key=lambda item: item[0]):
        if not param.is_floating_point():
            continue
        if param.ndim >= 2:
            fan_in = param[0].numel()
            param.normal_(0.0, 1.0 / math.sqrt(fan_in), generator=generator)
        elif name.endswith("bias"):
            param.normal_(0.0, 0.02, generator=generator)
        else:  # LayerNorm / GroupNorm / RMSNorm / QK-norm scales
            param.normal_(1.0, 0.1, generator=generator)
    return module


def _generator(seed: int, stream: str) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 100 + _STREAMS[stream])


def tiny_flux_state_dict(variant: str, seed: int = 0, params: FluxParams | None = None) -> dict[str, torch.Tensor]:
    """BFL-keyed weights of the tiny FLUX (`variant` "dev" or "schnell"), or of `params` (its guidance embedding
    set by `variant`) for a larger model in the same format."""
    params = tiny_flux_params(variant) if params is None else params.with_variant(variant)
    with torch.device("meta"):
        model = Flux(params)
    init_weights_(model.to_empty(device="cpu"), _generator(seed, f"flux1-{variant}"))
    return model.state_dict()


def random_flux(params: FluxParams, seed: int = 0) -> Flux:
    """A `Flux` with `init_weights_` weights from `seed`, in eval mode (for tests and benchmarks)."""
    with torch.device("meta"):  # skip the default init: every parameter is overwritten below
        model = Flux(params)
    model = model.to_empty(device="cpu")
    init_weights_(model, torch.Generator().manual_seed(seed))
    return model.eval()


def random_flux_inputs(params: FluxParams, *, batch: int = 2, grid: tuple[int, int] = (3, 4), txt_len: int = 7,
                       seed: int = 1) -> dict[str, torch.Tensor]:
    """Random `Flux.forward` keyword arguments with the real id layout (img_ids (0, row, col), txt_ids zeros)."""
    g = torch.Generator().manual_seed(seed)
    h, w = grid
    ids = torch.zeros(h * w, 3)
    ids[:, 1] = torch.arange(h * w) // w
    ids[:, 2] = torch.arange(h * w) % w
    return {
        "img": torch.randn(batch, h * w, params.in_channels, generator=g),
        "img_ids": ids[None].expand(batch, -1, -1).clone(),
        "txt": torch.randn(batch, txt_len, params.context_in_dim, generator=g),
        "txt_ids": torch.zeros(batch, txt_len, 3),
        "timesteps": torch.rand(batch, generator=g),
        "y": torch.randn(batch, params.vec_in_dim, generator=g),
        "guidance": torch.full((batch,), 3.5),
    }


def write_tiny_checkpoints(outdir: Path, seed: int = 0, *, flux_params: FluxParams | None = None,
                           t5_overrides: dict[str, Any] | None = None, schnell: bool = True) -> TinyPaths:
    """Write the five tiny checkpoints into `outdir` (atomically, deterministic from `seed`) and return their paths.

    Benchmarks write bigger models in the same formats: `flux_params` replaces the tiny FLUX (its vec_in_dim and
    context_in_dim must equal the CLIP-L width and the T5 d_model), `t5_overrides` go to `tiny_t5xxl_config`
    (e.g. d_model=4096 for the real txt_in width), and `schnell=False` skips the schnell file.
    """
    from fluxlora.models.autoencoder import AutoEncoder, AutoEncoderParams
    from fluxlora.models.text_encoders import (
        build_clip_l,
        build_t5xxl,
        clip_l_file_state_dict,
        t5xxl_file_state_dict,
        tiny_clip_l_config,
        tiny_t5xxl_config,
    )

    clip_config, t5_config = tiny_clip_l_config(), tiny_t5xxl_config(**(t5_overrides or {}))
    if flux_params is not None and (flux_params.vec_in_dim, flux_params.context_in_dim) != (
            clip_config.hidden_size, t5_config.d_model):
        raise ValueError(f"flux_params has vec_in_dim {flux_params.vec_in_dim} and context_in_dim "
                         f"{flux_params.context_in_dim}; the text encoders give {clip_config.hidden_size} and "
                         f"{t5_config.d_model} (set t5_overrides d_model, or the FLUX widths, to match)")
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    meta = {"fluxlora.tiny": f"seed={seed}"}
    paths = TinyPaths(
        flux_dev=outdir / "flux1-dev.safetensors",
        flux_schnell=outdir / "flux1-schnell.safetensors" if schnell else None,
        clip_l=outdir / "clip_l.safetensors",
        t5xxl=outdir / "t5xxl.safetensors",
        ae=outdir / "ae.safetensors",
        tokenizers=TOKENIZERS_DIR,
    )
    save_safetensors(paths.flux_dev, tiny_flux_state_dict("dev", seed, flux_params), meta)
    if paths.flux_schnell is not None:
        save_safetensors(paths.flux_schnell, tiny_flux_state_dict("schnell", seed, flux_params), meta)

    clip = init_weights_(build_clip_l(clip_config), _generator(seed, "clip_l"))
    save_safetensors(paths.clip_l, clip_l_file_state_dict(clip), meta)
    t5 = init_weights_(build_t5xxl(t5_config), _generator(seed, "t5xxl"))
    save_safetensors(paths.t5xxl, t5xxl_file_state_dict(t5), meta)
    ae = init_weights_(AutoEncoder(AutoEncoderParams.tiny()), _generator(seed, "ae"))
    save_safetensors(paths.ae, ae.state_dict(), meta)
    logger.info("wrote tiny checkpoints (seed %d) to %s", seed, outdir)
    return paths


def main(argv: list[str]) -> int:
    """`fluxlora make-tiny OUTDIR [--seed N]`."""
    parser = argparse.ArgumentParser(prog="fluxlora make-tiny", description=__doc__.splitlines()[0])
    parser.add_argument("outdir", type=Path, help="folder to write the checkpoints into (created if missing)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights (default 0)")
    args = parser.parse_args(argv)
    paths = write_tiny_checkpoints(args.outdir, seed=args.seed)
    for name in ("flux_dev", "flux_schnell", "clip_l", "t5xxl", "ae"):
        print(getattr(paths, name))
    print(f"tokenizers: {paths.tokenizers}")
    return 0
