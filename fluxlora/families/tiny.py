"""Tiny real-layout checkpoints of every family (`fluxlora make-tiny OUTDIR [--seed N]`).

Beside the FLUX.1 dev/schnell, CLIP-L, T5 and AE files of `fluxlora.models.tiny`, writes:
- `chroma.safetensors`: a Chroma transformer in the BFL/ComfyUI layout (width 64, 2 heads, 2 + 2 blocks, a
  5-layer approximator of width 128 as the real model has 5 layers), T5 width from the tiny T5;
- `flux1-kontext-dev.safetensors`: the FLUX.1-dev layout (Kontext differs only in its weights and how it is fed);
- `flux1-fill-dev.safetensors`: FLUX.1-dev with `img_in` reading 384 channels (noisy ‖ masked-image latents ‖
  packed mask) and a 64-channel output.
Each file has its own seeded stream, so adding a file never changes another.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from fluxlora.families.chroma.model import Chroma, ChromaParams
from fluxlora.files import save_safetensors
from fluxlora.models.flux import Flux, FluxParams, axes_dim_for
from fluxlora.models.tiny import (
    TINY_HEADS,
    TINY_HIDDEN,
    TinyPaths,
    init_weights_,
    tiny_flux_params,
    write_tiny_checkpoints,
)

logger = logging.getLogger(__name__)

FILL_IN_CHANNELS = 384  # 64 noisy + 64 masked-image latent channels + 256 packed-mask channels
_STREAMS = {"chroma": 10, "flux1-kontext-dev": 11, "flux1-fill-dev": 12}  # after models.tiny's 0..4


@dataclass(frozen=True)
class TinyFamilyPaths:
    chroma: Path
    kontext: Path
    fill: Path


def _generator(seed: int, stream: str) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 100 + _STREAMS[stream])


def tiny_chroma_params() -> ChromaParams:
    """The tiny Chroma: context_in_dim equals the tiny T5's d_model."""
    from fluxlora.models.text_encoders import tiny_t5xxl_config

    return ChromaParams(in_channels=64, context_in_dim=tiny_t5xxl_config().d_model, hidden_size=TINY_HIDDEN,
                        num_heads=TINY_HEADS, depth=2, depth_single_blocks=2,
                        axes_dim=axes_dim_for(TINY_HIDDEN // TINY_HEADS), approximator_in_dim=64,
                        approximator_depth=5, approximator_hidden_size=128)


def tiny_fill_params() -> FluxParams:
    return replace(tiny_flux_params("dev"), in_channels=FILL_IN_CHANNELS, out_channels=64)


def random_model(model_cls: type[nn.Module], params: object, generator: torch.Generator) -> nn.Module:
    """`model_cls(params)` with `init_weights_` weights from `generator`, in eval mode (no default init first)."""
    with torch.device("meta"):
        model = model_cls(params)
    return init_weights_(model.to_empty(device="cpu"), generator).eval()


def write_tiny_family_checkpoints(outdir: Path, seed: int = 0) -> TinyFamilyPaths:
    """Write the tiny Chroma, Kontext and Fill transformers into `outdir` (atomically, deterministic from `seed`)."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    meta = {"fluxlora.tiny": f"seed={seed}"}
    paths = TinyFamilyPaths(chroma=outdir / "chroma.safetensors", kontext=outdir / "flux1-kontext-dev.safetensors",
                            fill=outdir / "flux1-fill-dev.safetensors")
    save_safetensors(paths.chroma, random_model(Chroma, tiny_chroma_params(), _generator(seed, "chroma")).state_dict(),
                     meta)
    kontext = random_model(Flux, tiny_flux_params("dev"), _generator(seed, "flux1-kontext-dev"))
    save_safetensors(paths.kontext, kontext.state_dict(), meta)
    fill = random_model(Flux, tiny_fill_params(), _generator(seed, "flux1-fill-dev"))
    save_safetensors(paths.fill, fill.state_dict(), meta)
    logger.info("wrote tiny Chroma, Kontext and Fill transformers (seed %d) to %s", seed, outdir)
    return paths


def write_all(outdir: Path, seed: int = 0) -> tuple[TinyPaths, TinyFamilyPaths]:
    """Every tiny file: FLUX.1 dev/schnell, CLIP-L, T5, AE, then Chroma, Kontext and Fill."""
    return write_tiny_checkpoints(outdir, seed=seed), write_tiny_family_checkpoints(outdir, seed=seed)


def main(argv: list[str]) -> int:
    """`fluxlora make-tiny OUTDIR [--seed N]`."""
    parser = argparse.ArgumentParser(prog="fluxlora make-tiny", description=__doc__.splitlines()[0])
    parser.add_argument("outdir", type=Path, help="folder to write the checkpoints into (created if missing)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights (default 0)")
    args = parser.parse_args(argv)
    base, families = write_all(args.outdir, seed=args.seed)
    for name in ("flux_dev", "flux_schnell", "clip_l", "t5xxl", "ae"):
        print(getattr(base, name))
    for name in ("chroma", "kontext", "fill"):
        print(getattr(families, name))
    print(f"tokenizers: {base.tokenizers}")
    return 0
