"""The model-family interface: everything the trainer, caches, planner, sampler and tools ask of a model family.

A family is one folder under `fluxlora/families/` whose `family.py` defines a `ModelFamily` subclass and registers an
instance (`fluxlora.families.register`). Code outside a family folder never branches on a family or a variant; it
asks the family. What a family answers:

- files: which transformer headers it claims, what a file is (`ModelInfo`, headers only), which text-encoder and AE
  files it needs (`EncoderFile`), how long its text conditioning is;
- loading: the transformer, the autoencoder and the text encoders (with their tokenizers) in given dtypes;
- the maths of a step: its text conditioning (`Conditioning`: named tensors, `TextOutput` says their kind), how
  latents become the transformer's input and its output a velocity (`predict`), the guidance input;
- structure: its blocks in execution order (`BlockLayout`) for swap, checkpointing and compile;
- adapters: which text encoders carry LoRA modules, under which components;
- sampling: the σ schedule and default steps / guidance;
- files written: how files name the base model (`ArchitectureStrings`: `modelspec.architecture`,
  `ss_base_model_version`) and which LoRAs it accepts;
- memory: the numbers the planner needs (`ModelShape`).
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from fluxlora import flow
from fluxlora.errors import ConfigError
from fluxlora.models.checkpoints import ModelKind, SafetensorsHeader
from fluxlora.network.metadata import ArchitectureStrings

Conditioning = dict[str, Tensor]
"""Text conditioning of a batch: named tensors, batch first; names and kinds are the family's `text_outputs`."""

Autocast = Callable[[], contextlib.AbstractContextManager]


@dataclass(frozen=True)
class TextOutput:
    """One tensor of a family's text conditioning. `vector` is [D] per caption, `sequence` [L, D] and `mask` [L]
    (bool, True = real token); sequences and masks of one batch are padded to the longest."""

    name: str
    kind: Literal["vector", "sequence", "mask"]


@dataclass(frozen=True)
class EncoderFile:
    """A text-encoder file a family needs: `component` names both the `TrainConfig.model` attribute holding its path
    and the LoRA component; `flag` is the command-line flag; `kind` what its header must be."""

    component: str
    flag: str
    kind: ModelKind


@dataclass(frozen=True)
class ModelInfo:
    """What a transformer file is, from its header(s) alone."""

    family: str  # registry name, e.g. "flux1"
    variant: str  # the family's variant, e.g. "dev" | "schnell"
    title: str  # for messages: "FLUX.1-dev"
    layout: str  # "bfl" | "diffusers" | ...
    file_dtype: str  # safetensors dtype holding most parameters, e.g. "BF16", "F8_E4M3"
    path: Path
    double_blocks: int
    single_blocks: int
    params: Any  # the family's own hyper-parameters (e.g. FluxParams)
    files: tuple[Path, ...] = field(default=())
    num_params: int = 0
    size_bytes: int = 0

    @property
    def num_blocks(self) -> int:
        return self.double_blocks + self.single_blocks


@dataclass(frozen=True)
class ModelShape:
    """The numbers the memory planner needs about a transformer (parameter counts, not bytes)."""

    double_blocks: int
    single_blocks: int
    width: int  # hidden size: the activations between blocks are [tokens, width]
    head_dim: int
    context_dim: int  # text-conditioning width entering the transformer
    double_params: int  # all parameters of one double block
    single_params: int
    double_linear_params: int  # the Linear weights among them (fp8 storage shrinks these)
    single_linear_params: int
    outer_params: int  # everything outside the blocks (embedders, final layer)
    lora_params_per_rank: int  # LoRA parameters per unit of rank on every block Linear
    # saved-for-backward bytes per token per unit of width of one block (LoRA on every Linear), by compute dtype
    activation_bytes: Mapping[tuple[str, str], float]
    tokens_per_pixel: float = 1 / 256  # transformer image tokens per image pixel
    image_token_factor: int = 1  # image-token sequences per sample (2 when a reference image rides along)


@dataclass(frozen=True)
class BlockLayout:
    """A transformer's blocks in execution order: double (two-stream) blocks, then single (joint) blocks. The first
    `double_stream` / `single_stream` positional arguments of a block are its activation stream (what
    checkpointing keeps and CPU offload moves); the rest are shared inputs (modulation vector, RoPE, mask)."""

    double: list[nn.Module]
    single: list[nn.Module]
    double_stream: int = 2
    single_stream: int = 1

    @property
    def sequence(self) -> list[nn.Module]:
        return [*self.double, *self.single]

    def stream_args(self, position: int) -> int:
        return self.double_stream if position < len(self.double) else self.single_stream


class TextEncoders(ABC):
    """A family's loaded text encoders and tokenizers: captions → `Conditioning` (float32 on the encoders' device)."""

    #: component → module (None once freed), in the order LoRA files list them
    modules: dict[str, nn.Module | None]

    @abstractmethod
    def encode(self, captions: list[str], *, grad: Collection[str] = ()) -> Conditioning:
        """Encode captions. `grad` names components whose outputs need gradients (a text-encoder LoRA trains)."""

    def update(self, cond: Conditioning, captions: list[str], grad: Collection[str]) -> Conditioning:
        """Cached conditioning with the outputs of the components in `grad` recomputed (their LoRA trains).
        Families whose components feed separate outputs override this; the default re-encodes everything."""
        return self.encode(captions, grad=grad) if grad else cond

    def free(self) -> None:
        """Drop every encoder (their outputs are cached): nothing may encode afterwards."""
        for name in self.modules:
            self.modules[name] = None

    @property
    def freed(self) -> bool:
        return all(m is None for m in self.modules.values())


class ModelFamily(ABC):
    """The interface a model family implements (see the module docstring)."""

    #: registry name and what `--model_type` values select it
    name: str = ""
    model_types: tuple[str, ...] = ()
    #: the text-encoder files it needs, in LoRA file order
    encoders: tuple[EncoderFile, ...] = ()
    #: its text conditioning
    text_outputs: tuple[TextOutput, ...] = ()
    #: the autoencoder file kind (`--ae`) and latent channels
    ae_kind: ModelKind = ModelKind.AE
    latent_channels: int = 16
    #: what it reads from each training image's paired file in `conditioning_data_dir` (`fluxlora.data.pairs`):
    #: "reference" (a reference image), "mask" (an inpainting mask) or None (no pairs). [fam1 hook]
    control_kind: str | None = None
    #: submodules whose Linears `--fp8_base` leaves in the weight dtype (small, precision-sensitive). [fam1 hook]
    fp8_keep: tuple[str, ...] = ()

    # ---- files (headers only) ------------------------------------------------------------------------------------
    @abstractmethod
    def claims(self, header: SafetensorsHeader) -> bool:
        """True when a transformer header is this family's (used when --model_type does not choose)."""

    @abstractmethod
    def inspect(self, path: Path, *, flag: str) -> ModelInfo:
        """What the transformer file at `path` is; CheckpointError naming `flag` and the key when it is not this
        family's or is damaged."""

    @abstractmethod
    def text_length(self, info: ModelInfo, override: int | None) -> int:
        """Token length of the text conditioning (`override` from the command line, if given)."""

    def check_run(self, cfg: Any, info: ModelInfo, headers: Mapping[str, SafetensorsHeader]) -> ModelInfo:
        """The family's own checks of a run's files and flags before any weight is read (`cfg` is the TrainConfig,
        `headers` the encoder / AE headers that were readable, by component and "ae"); returns the info the run uses
        (a family may refine it from its flags). Raise a FluxLoraError naming the flag. Default: `--model_version`
        is refused (only FLUX.2 reads it). [flux2 hook]"""
        version = getattr(cfg.model, "model_version", None)
        if version is not None:
            raise ConfigError(f"--model_version {version}: only FLUX.2 models read it, and this model is {info.title}; "
                              "remove the flag", key="--model_version")
        return info

    def check_lora(self, info: ModelInfo, metadata: Mapping[str, str]) -> str | None:
        """None when a LoRA with this metadata can train on / apply to `info`; otherwise why not (one line)."""
        architecture = metadata.get("modelspec.architecture", "")
        ours = self.architecture(info).architecture
        if architecture and architecture.split("/")[0] != ours:
            return (f"this LoRA was trained on {architecture.split('/')[0]} (modelspec.architecture {architecture}) "
                    f"but the base model is {info.title}")
        return None

    # ---- loading -------------------------------------------------------------------------------------------------
    @abstractmethod
    def load_transformer(self, info: ModelInfo, *, dtype: torch.dtype | None, device: torch.device | str) -> nn.Module:
        """The transformer with every key checked, frozen-ready (weights in `dtype`; None keeps the file's)."""

    @abstractmethod
    def load_autoencoder(self, path: Path, *, dtype: torch.dtype, device: torch.device | str) -> nn.Module:
        """The autoencoder: `.encode(pixels [B,3,H,W] in [-1,1]) -> latents` and `.decode(latents) -> pixels`."""

    @abstractmethod
    def load_text_encoders(self, files: Mapping[str, Path], *, dtype: torch.dtype | Mapping[str, torch.dtype],
                           keep_fp8: bool, device: torch.device | str, tokenizer_dir: Path | None, max_length: int,
                           mask_padding: bool, autocast: Autocast) -> TextEncoders:
        """The text encoders of `files` (component → path) with their tokenizers, in `dtype` (one, or one per
        component). `keep_fp8` keeps fp8 files stored as fp8; `mask_padding` is --apply_t5_attn_mask; `autocast`
        wraps every encode."""

    # ---- one step's maths ----------------------------------------------------------------------------------------
    @abstractmethod
    def predict(self, model: nn.Module, x_t: Tensor, sigmas: Tensor, cond: Conditioning, *, guidance: float | None,
                mask_text: bool, compute_dtype: torch.dtype, autocast: Autocast) -> Tensor:
        """The velocity for noisy latents x_t [B,C,h,w] at σ [B] (float32), as float32 [B,C,h,w]."""

    def trim_text(self, cond: Conditioning) -> Conditioning:
        """Drop text positions that are padding in every sample (exact when padding is masked out). Default: as is."""
        return cond

    @abstractmethod
    def training_guidance(self, info: ModelInfo, guidance_scale: float) -> float | None:
        """The guidance input of training steps (None: the model takes none)."""

    @abstractmethod
    def blocks(self, model: nn.Module) -> BlockLayout:
        """The transformer's blocks in execution order."""

    # ---- sampling ------------------------------------------------------------------------------------------------
    @abstractmethod
    def sample_sigmas(self, info: ModelInfo, steps: int, image_seq_len: int) -> Tensor:
        """σ from 1 to 0 (steps + 1 values, float32) for sampling an image of `image_seq_len` tokens."""

    @abstractmethod
    def default_sample_steps(self, info: ModelInfo) -> int:
        """Sampling steps when a prompt does not say."""

    def initial_noise(self, seed: int, height: int, width: int) -> Tensor:
        """Sampling's starting noise [1, C, height/8, width/8] (float32, from a CPU generator seeded with `seed`).
        Drawn in the packed 2×2 token layout, as sd-scripts and diffusers draw it, so a seed gives their image."""
        generator = torch.Generator(device="cpu").manual_seed(int(seed))
        tokens = torch.randn(1, (height // 16) * (width // 16), 4 * self.latent_channels, generator=generator,
                             dtype=torch.float32)
        return flow.unpack_latents(tokens, height // 8, width // 8)

    def sampling_guidance(self, info: ModelInfo, guidance: float) -> float | None:
        """The guidance input while sampling with a prompt's `--g` (None: the model takes none)."""
        return self.training_guidance(info, guidance)

    # ---- files written -------------------------------------------------------------------------------------------
    @abstractmethod
    def architecture(self, info: ModelInfo) -> ArchitectureStrings:
        """How files name this base model: `modelspec.architecture` (a LoRA adds "/lora"), `modelspec.implementation`
        and `ss_base_model_version`."""

    # ---- memory --------------------------------------------------------------------------------------------------
    @abstractmethod
    def shape(self, info: ModelInfo) -> ModelShape:
        """The planner's numbers for this transformer."""

    def encode_bytes(self, component: str, tokens: int, dtype_bytes: int) -> int:
        """Device bytes encoding one caption of `tokens` tokens holds at once (no grad). Default: 0."""
        return 0

    def ae_encode_bytes(self, pixels: int, dtype_bytes: int) -> int:
        """Device bytes the AE encoder holds at once for one image of `pixels` pixels (no grad). Default: 0."""
        return 0

    def __repr__(self) -> str:
        return f"<model family {self.name}>"
