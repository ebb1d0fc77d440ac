"""FLUX.2 transformer hyper-parameters, the published variants, and how a checkpoint's shapes name them.

FLUX.2 [dev] (32 B) and FLUX.2 [klein] 4B / 9B share one architecture (diffusers `Flux2Transformer2DModel`, BFL
`flux2/model.py`): 128 input channels (32 latent channels in 2×2 patches), no biases anywhere, SwiGLU MLPs of ratio 3,
modulation shared by all blocks of a kind, 4-axis RoPE (t, h, w, l) with θ = 2000. They differ in width, depth, the
text-embedding width (3 stacked hidden layers of the text encoder: Mistral Small 3 5120 → 15360, Qwen3-4B 2560 →
7680, Qwen3-8B 4096 → 12288) and in the guidance embedding, which only the guidance-distilled [dev] has.

Base vs distilled klein: the step-distilled klein files and the klein base files have the same keys and shapes, so
the header cannot tell them apart; `--model_version klein-base-4b|klein-base-9b` (musubi-tuner's spelling) says it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from fluxlora.errors import CheckpointError

_DOUBLE = re.compile(r"^double_blocks\.(\d+)\.")
_SINGLE = re.compile(r"^single_blocks\.(\d+)\.")

# The key only FLUX.2 transformers have (diffusers' own detection uses it too).
FLUX2_MARKER = "single_stream_modulation.lin.weight"
FLUX2_DIFFUSERS_MARKER = "single_stream_modulation.linear.weight"

# --model_version spellings (musubi-tuner) -> (architecture, base).
MODEL_VERSIONS: dict[str, tuple[str, bool]] = {
    "dev": ("dev", False),
    "klein-4b": ("klein-4b", False),
    "klein-9b": ("klein-9b", False),
    "klein-base-4b": ("klein-4b", True),
    "klein-base-9b": ("klein-9b", True),
}


def axes_dim_for(head_dim: int) -> tuple[int, int, int, int]:
    """RoPE split of a head over the 4 position axes (t, h, w, l): equal quarters, BFL's (32, 32, 32, 32) for 128."""
    if head_dim <= 0 or head_dim % 8:
        raise ValueError(f"FLUX.2 head dimension must be a positive multiple of 8 (4 axes of rotation pairs), "
                         f"got {head_dim}")
    return (head_dim // 4,) * 4


@dataclass(frozen=True)
class Flux2Params:
    """Everything that shapes a FLUX.2 transformer. The defaults are FLUX.2 [dev]'s."""

    in_channels: int = 128
    context_in_dim: int = 15360
    hidden_size: int = 6144
    num_heads: int = 48
    depth: int = 8
    depth_single_blocks: int = 48
    mlp_ratio: float = 3.0
    axes_dim: tuple[int, ...] = (32, 32, 32, 32)
    theta: int = 2000
    guidance_embed: bool = True
    time_dim: int = 256  # sinusoidal timestep/guidance channels

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden size {self.hidden_size} must be divisible by num_heads {self.num_heads}")
        if sum(self.axes_dim) != self.hidden_size // self.num_heads:
            raise ValueError(f"axes_dim {self.axes_dim} must sum to the head dimension "
                             f"{self.hidden_size // self.num_heads}")
        object.__setattr__(self, "axes_dim", tuple(self.axes_dim))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def architecture(self) -> str:
        """'dev', 'klein-4b', 'klein-9b', or 'custom' (tiny and pruned models)."""
        for name, params in ARCHITECTURES.items():
            if self == params:
                return name
        return "custom"

    @classmethod
    def dev(cls) -> Flux2Params:
        return cls()

    @classmethod
    def klein_4b(cls) -> Flux2Params:
        return cls(context_in_dim=7680, hidden_size=3072, num_heads=24, depth=5, depth_single_blocks=20,
                   guidance_embed=False)

    @classmethod
    def klein_9b(cls) -> Flux2Params:
        return cls(context_in_dim=12288, hidden_size=4096, num_heads=32, depth=8, depth_single_blocks=24,
                   guidance_embed=False)

    def with_guidance(self, guidance_embed: bool) -> Flux2Params:
        return replace(self, guidance_embed=guidance_embed)

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, tuple[int, ...]], *, path: str | Path | None = None) -> Flux2Params:
        """Every hyper-parameter from BFL key names and shapes (prefix stripped): depths are max index + 1, heads =
        width / QK-norm size, MLP width from the first block, guidance from `guidance_in`. Bad shapes raise
        CheckpointError naming the key."""
        where = f"{path}: " if path is not None else ""

        def shape(key: str, ndim: int) -> tuple[int, ...]:
            if key not in shapes:
                raise CheckpointError(f"{where}FLUX.2 transformer key {key!r} is missing; the file is incomplete or "
                                      "not a FLUX.2 transformer", path=path, key=key)
            value = tuple(shapes[key])
            if len(value) != ndim:
                raise CheckpointError(f"{where}{key!r} has shape {list(value)}, expected {ndim} dimensions",
                                      path=path, key=key)
            return value

        hidden, in_channels = shape("img_in.weight", 2)
        context_in_dim = shape("txt_in.weight", 2)[1]
        depth = 1 + max((int(m.group(1)) for k in shapes if (m := _DOUBLE.match(k))), default=-1)
        depth_single = 1 + max((int(m.group(1)) for k in shapes if (m := _SINGLE.match(k))), default=-1)
        if depth:
            head_dim = shape("double_blocks.0.img_attn.norm.query_norm.scale", 1)[0]
            mlp_hidden = shape("double_blocks.0.img_mlp.2.weight", 2)[1]
        elif depth_single:
            head_dim = shape("single_blocks.0.norm.query_norm.scale", 1)[0]
            mlp_hidden = shape("single_blocks.0.linear2.weight", 2)[1] - hidden
        else:
            head_dim, mlp_hidden = min(128, hidden), 3 * hidden
        if head_dim <= 0 or hidden % head_dim or head_dim % 8 or mlp_hidden <= 0:
            raise CheckpointError(
                f"{where}width {hidden} with QK-norm size {head_dim} and MLP width {mlp_hidden} is not a valid FLUX.2 "
                "transformer; the file is damaged or of another architecture", path=path)
        return cls(
            in_channels=in_channels, context_in_dim=context_in_dim, hidden_size=hidden, num_heads=hidden // head_dim,
            depth=depth, depth_single_blocks=depth_single, mlp_ratio=mlp_hidden / hidden,
            axes_dim=axes_dim_for(head_dim), guidance_embed="guidance_in.in_layer.weight" in shapes,
        )


ARCHITECTURES: dict[str, Flux2Params] = {
    "dev": Flux2Params.dev(),
    "klein-4b": Flux2Params.klein_4b(),
    "klein-9b": Flux2Params.klein_9b(),
}

# Text encoder each architecture was trained with: (transformers model type, hidden size, layers stacked).
TEXT_ENCODERS: dict[str, tuple[str, int, tuple[int, ...]]] = {
    "dev": ("mistral3", 5120, (10, 20, 30)),
    "klein-4b": ("qwen3", 2560, (9, 18, 27)),
    "klein-9b": ("qwen3", 4096, (9, 18, 27)),
}


def resolve_model_version(params: Flux2Params, model_version: str | None, *, path: str | Path | None = None,
                          flag: str = "--model_version") -> tuple[str, bool]:
    """(architecture, base) of a transformer from its shapes and the optional `--model_version`.

    A version that contradicts the file is an error naming both; without one, base is guessed from the file name
    ("base" in it), since the header cannot tell a klein base file from a distilled one (decision: the file names BFL
    publishes, `flux-2-klein-base-4b.safetensors`, carry it).
    """
    arch = params.architecture
    if model_version is not None:
        if model_version not in MODEL_VERSIONS:
            raise CheckpointError(f"{flag} {model_version!r} is not a FLUX.2 version; use one of "
                                  f"{', '.join(MODEL_VERSIONS)}", key=flag)
        want, base = MODEL_VERSIONS[model_version]
        if arch != "custom" and want != arch:
            raise CheckpointError(f"{flag} {model_version} does not match {path}: its shapes are FLUX.2 {arch}; "
                                  f"pass {flag} {arch if arch == 'dev' else arch.replace('klein-', 'klein-base-')} "
                                  "or the right file", path=path, key=flag)
        if arch == "custom" and (want == "dev") != params.guidance_embed:
            which = "a guidance embedding, as only [dev] has" if params.guidance_embed else "no guidance embedding: klein"
            raise CheckpointError(f"{flag} {model_version} does not match {path}: it has {which}; pass the "
                                  f"{flag} of the file or the right file", path=path, key=flag)
        if base and params.guidance_embed:
            raise CheckpointError(f"{flag} {model_version}: {path} has a guidance embedding (a guidance-distilled "
                                  "[dev] file), not a klein base file", path=path, key=flag)
        return (want if arch == "custom" else arch), base
    name = Path(path).name.lower() if path is not None else ""
    base = not params.guidance_embed and "base" in name
    return arch, base


def text_encoder_kind(params: Flux2Params) -> str:
    """The encoder a transformer was trained with: Mistral Small 3 for the guidance-distilled [dev], Qwen3 for klein."""
    arch = params.architecture
    if arch != "custom":
        return TEXT_ENCODERS[arch][0]
    return "mistral3" if params.guidance_embed else "qwen3"


def check_text_encoder_fits(params: Flux2Params, kind: str, hidden: int, *, path: str | Path,
                            flag: str = "--text_encoder", title: str | None = None) -> None:
    """A text encoder whose stacked width (3 × hidden) is not the transformer's `txt_in` width is the wrong one (a
    klein file with the [dev] Mistral encoder, Qwen3-4B with klein 9B): one line naming both, before weights load."""
    names = {"mistral3": "Mistral Small 3", "qwen3": "Qwen3"}
    want = text_encoder_kind(params)
    if kind != want or 3 * hidden != params.context_in_dim:
        raise CheckpointError(
            f"{flag} {path}: a {names[kind]} encoder of width {hidden} gives {3 * hidden}-wide prompt embeddings, but "
            f"this {title or f'FLUX.2 {params.architecture}'} transformer takes {params.context_in_dim} ({names[want]}, width "
            f"{params.context_in_dim // 3}); pass the text encoder that belongs to the model", path=path, key=flag)
