"""The adapter network for FLUX.1 (`--network_module networks.lora_flux`, or `lycoris.kohya` with `algo=lokr|loha|
locon|full`): sd-scripts' / LyCORIS' file format, fixed behaviour.

`create_network` builds LoRA modules for the 304 DiT block Linears (plus `in_dims` input layers), CLIP-L (72,
`lora_te1_`) and, with `train_t5xxl=True`, T5 (168, `lora_te3_`); `create_network_from_weights` takes per-module
ranks and alphas from a file (`--dim_from_weights`) and keeps every other network_arg (spec §12.22 fixed).
`load_weights` is strict and takes the scale from the file's alpha; `state_dict_for_save` writes kohya keys with
`.alpha` for every module and split_qkv in the fused block-diagonal form other loaders read.

Plain LoRA modules are `LoRAModule`; LoKr, LoHa, full and every DoRA variant are `Adapter`s (fluxlora.network.
adapter) built from the `AdapterSpec` of the network args. Both share one interface, so everything here (and block
swap, fp8 bases, checkpointing, merging and sampling) treats them alike. With `lycoris.kohya` the targets are the
family's candidates filtered by LyCORIS' `preset`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from fluxlora.config.adapter_args import AdapterSpec, warn_about_loaders
from fluxlora.config.network_args import NetworkArgs, parse_network_args
from fluxlora.errors import CheckpointError, ConfigError
from fluxlora.network.adapters import ADAPTER_TYPES, ALL_SUFFIXES, adapter_from_file, algo_of, build_adapter
from fluxlora.network.deltas import algorithm
from fluxlora.network.groups import ParamGroups, build_param_groups
from fluxlora.network.module import LoRAModule
from fluxlora.network.saving import read_lora, save_lora
from fluxlora.network.targets import (
    COMPONENT_PREFIXES,
    Target,
    all_targets,
    check_block_indices,
    plan_rank,
    select_by_preset,
)

__all__ = ["LoRAModule", "LoRANetwork", "LoadInfo", "create_network", "create_network_from_weights"]

logger = logging.getLogger(__name__)

Module = LoRAModule | nn.Module  # a LoRAModule or an Adapter (ADAPTER_TYPES)


@dataclass
class LoadInfo:
    """What `load_weights` did: modules loaded, network modules the file lacked (left at init), keys skipped."""

    loaded: int = 0
    missing: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


class LoRANetwork(nn.Module):
    """All LoRA modules of one training run. Submodule names are the kohya names, so `state_dict()` keys are
    `<lora_name>.lora_down.weight` (split modules: `.lora_up.<j>.weight`) — the exact-resume form; files for other
    tools come from `state_dict_for_save`."""

    def __init__(self, loras: Sequence[Module], args: NetworkArgs, *, multiplier: float = 1.0,
                 train_unet: bool = True, train_text_encoder: bool = True):
        super().__init__()
        self.args = args
        self.multiplier = float(multiplier)
        self.train_unet = train_unet
        self.train_text_encoder = train_text_encoder
        names = set()
        for lora in loras:
            if lora.lora_name in names:
                raise ValueError(f"duplicated LoRA module name {lora.lora_name}")
            names.add(lora.lora_name)
            self.add_module(lora.lora_name, lora)

    # ---- module views -------------------------------------------------------------------------------------------
    @property
    def loras(self) -> list[Module]:
        return [m for m in self.children() if isinstance(m, ADAPTER_TYPES)]

    @property
    def unet_loras(self) -> list[Module]:
        return [m for m in self.loras if m.component == "unet"]

    @property
    def text_encoder_loras(self) -> list[Module]:
        return [m for m in self.loras if m.component != "unet"]

    def get_trainable_params(self) -> list[nn.Parameter]:
        return list(self.parameters())

    # ---- attaching, multiplier, merging -------------------------------------------------------------------------
    def apply_to(self, flux: nn.Module | None = None, text_encoders: Sequence[nn.Module | None] | None = None) -> None:
        """Route every wrapped Linear's forward through its LoRA (the models were given at creation)."""
        for lora in self.loras:
            lora.apply_to()
        logger.info("LoRA applied: %d DiT modules, %d text-encoder modules", len(self.unet_loras), len(self.text_encoder_loras))

    def remove(self) -> None:
        for lora in self.loras:
            lora.remove()

    def set_multiplier(self, multiplier: float) -> None:
        self.multiplier = float(multiplier)
        for lora in self.loras:
            lora.multiplier = self.multiplier

    @torch.no_grad()
    def merge_into_base(self) -> None:
        """Add every delta into its base weight (W += multiplier·alpha/rank·up@down) and detach the adapters."""
        for lora in self.loras:
            lora.merge_into_base()

    # ---- regularisers -------------------------------------------------------------------------------------------
    def update_norms(self) -> None:
        """LoRA-GGPO: refresh weight and gradient row norms; call after each synced backward, before the step."""
        if self.args.ggpo:
            for lora in self.loras:
                lora.update_norms()

    @torch.no_grad()
    def apply_max_norm(self, max_norm: float, device: torch.device | str | None = None) -> tuple[int, float, float]:
        """`--scale_weight_norms` (spec §5.6): per module n = max(‖ΔW‖_F, m/2), ratio = min(n, m)/n, and ΔW is
        scaled by ratio when ratio ≠ 1 (LoRA: up and down by √ratio; the other algorithms scale one factor).
        Returns (modules scaled, mean and max of the norms after scaling)."""
        scaled, norms = 0, []
        for lora in self.loras:
            norm = lora.delta_norm()
            clamped = max(norm, max_norm / 2)
            ratio = min(clamped, max_norm) / clamped
            if ratio != 1.0:
                scaled += 1
                lora.scale_delta_(ratio)
            norms.append(norm * ratio)
        if not norms:
            return 0, 0.0, 0.0
        return scaled, sum(norms) / len(norms), max(norms)

    # ---- optimizer ----------------------------------------------------------------------------------------------
    def prepare_optimizer_params(self, text_encoder_lr: float | Sequence[float] | None, unet_lr: float | None,
                                 learning_rate: float | None) -> ParamGroups:
        """Optimizer groups of spec §5.4 (see `fluxlora.network.groups`)."""
        self.requires_grad_(True)
        return build_param_groups(self.loras, self.args, learning_rate=learning_rate, unet_lr=unet_lr,
                                  text_encoder_lr=text_encoder_lr)

    # ---- saving -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def state_dict_for_save(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Kohya / LyCORIS keys: LoRA with `.alpha` for every module (never 0), split modules fused (block-diagonal
        up, alpha × k); LoKr / LoHa / full / DoRA with LyCORIS' suffixes (`file_tensors` of each module)."""
        out: dict[str, torch.Tensor] = {}
        for lora in self.loras:
            for suffix, tensor in lora.file_tensors().items():
                out[f"{lora.lora_name}.{suffix}"] = tensor.to(dtype) if dtype is not None else tensor
        return out

    def save(self, path: str | Path, dtype: torch.dtype | None = None, metadata: Mapping[str, str] | None = None) -> None:
        """Save a kohya-format `.safetensors` (atomic) with metadata and `sshs_*` hashes."""
        save_lora(path, self.state_dict_for_save(dtype), metadata)

    # ---- loading ------------------------------------------------------------------------------------------------
    def load_weights(self, path: str | Path, *, flag: str = "--network_weights") -> LoadInfo:
        """Load a kohya LoRA file strictly; the file's alpha sets each module's scale (spec §12.22 fixed)."""
        tensors, _ = read_lora(path, flag=flag)
        return self.load_lora_state_dict(tensors, path=path, flag=flag)

    @torch.no_grad()
    def load_lora_state_dict(self, tensors: Mapping[str, torch.Tensor], *, path: str | Path = "<state dict>",
                             flag: str = "--network_weights") -> LoadInfo:
        """Load kohya / LyCORIS-keyed tensors. Every key must belong to a module of this network with a fitting
        shape and the module's algorithm; otherwise a CheckpointError names the first bad keys and how many there
        are. Keys of a component the flags turned off (`lora_te*` with --network_train_unet_only, `lora_unet` with
        --network_train_text_encoder_only) are skipped with a warning. A missing `.alpha` means alpha = rank (what
        diffusers and ComfyUI assume)."""
        modules = {lora.lora_name: lora for lora in self.loras}
        off = [p for c, p in COMPONENT_PREFIXES.items() if not (self.train_unet if c == "unet" else self.train_text_encoder)]
        info, unknown, wrong = LoadInfo(), [], []
        grouped: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in tensors.items():
            name, _, suffix = key.partition(".")
            if name not in modules and any(name.startswith(p + "_") for p in off):
                info.skipped.append(key)
                continue
            if name not in modules or suffix not in ALL_SUFFIXES:
                unknown.append(key)
                continue
            grouped.setdefault(name, {})[suffix] = tensor
        other_algo = []
        for name, parts in grouped.items():
            module, algo = modules[name], _file_algorithm(parts)
            if algo != _module_algorithm(modules[name]):
                other_algo.append(f"{name}: file {algo}, network {_module_algorithm(module)}")
            else:
                wrong += module.file_problems(parts)
        problems = [f"{len(unknown)} key(s) that match no module of this network, first {unknown[:3]}"] if unknown else []
        if other_algo:
            problems.append(f"{len(other_algo)} module(s) of another algorithm, first {other_algo[:2]} (pass the "
                            "file's --network_module/--network_args, e.g. algo=lokr)")
        if wrong:
            problems.append(f"{len(wrong)} shape problem(s), first {wrong[:3]}")
        if problems:
            raise CheckpointError(
                f"{flag} {path}: this LoRA does not fit the network: " + "; ".join(problems) + " — check the base model "
                "and --network_dim/--network_args, or rebuild the network from the file with --dim_from_weights",
                path=path, key=flag)
        for name, parts in grouped.items():
            if "alpha" in parts and float(parts["alpha"].float()) == 0.0:
                logger.warning("%s: %s.alpha is 0, read as alpha = rank as sd-scripts does", path, name)
            modules[name].load_file_tensors(parts)
            info.loaded += 1
        info.missing = sorted(set(modules) - set(grouped))
        if info.missing:
            logger.warning("%s: %d module(s) of the network are not in the file and start from init, first %s",
                           path, len(info.missing), info.missing[:3])
        if info.skipped:
            logger.warning("%s: %d key(s) of components not being trained were skipped, first %s",
                           path, len(info.skipped), info.skipped[:3])
        return info


def _file_algorithm(parts: Mapping[str, torch.Tensor]) -> str:
    return algorithm(parts) + (" + DoRA" if "dora_scale" in parts else "")


def _module_algorithm(module: Module) -> str:
    return module.algo + (" + DoRA" if module.dora else "")


def _build(
    targets: list[Target],
    ranks: Mapping[str, int],
    alphas: Mapping[str, float | None],
    args: NetworkArgs,
    *,
    multiplier: float,
    generator: torch.Generator | None,
    split_divides: bool = False,
) -> list[Module]:
    loras: list[Module] = []
    for target in targets:
        rank = ranks.get(target.name, 0)
        if rank <= 0:
            if args.verbose:
                logger.info("skipped (rank 0): %s", target.name)
            continue
        if not args.adapter.plain_lora:
            adapter = build_adapter(target.name, target.module, args.adapter, rank=rank, alpha=alphas.get(target.name),
                                    multiplier=multiplier, rank_dropout=args.rank_dropout,
                                    module_dropout=args.module_dropout, generator=generator)
            adapter.component = target.component
            if args.verbose:
                logger.info("%s: %s", target.name, adapter.extra_repr())
            loras.append(adapter)
            continue
        split = target.split_dims if args.split_qkv and target.component == "unet" else []
        alpha = alphas.get(target.name)
        if split and split_divides:  # rank and alpha come from a fused file: k parts share them
            if rank % len(split):
                raise ConfigError(f"--network_args split_qkv=True: {target.name} has rank {rank} in the file, not a "
                                  f"multiple of {len(split)}; drop split_qkv for this file", key="split_qkv")
            rank //= len(split)
            alpha = None if alpha is None else alpha / len(split)
        lora = LoRAModule(target.name, target.module, rank=rank, alpha=alpha, multiplier=multiplier,
                          dropout=args.dropout, rank_dropout=args.rank_dropout, module_dropout=args.module_dropout,
                          split_dims=split or None, ggpo_sigma=args.ggpo_sigma, ggpo_beta=args.ggpo_beta,
                          generator=generator)
        lora.component = target.component
        if args.verbose:
            logger.info("%s: rank %d, alpha %g%s", target.name, rank, float(lora.alpha), " (split)" if split else "")
        loras.append(lora)
    return loras


def create_network(
    multiplier: float,
    network_dim: int | None,
    network_alpha: float | None,
    flux: nn.Module | None,
    text_encoders: Sequence[nn.Module | None] = (),
    *,
    network_args: Sequence[str] | Mapping[str, object] | NetworkArgs | None = None,
    neuron_dropout: float | None = None,
    train_unet: bool = True,
    train_text_encoder: bool = True,
    generator: torch.Generator | None = None,
    network_module: str | None = None,
) -> LoRANetwork:
    """Build the adapter network (not yet applied: call `apply_to`). `network_dim` None → 4; `network_alpha` None → 1,
    0 → rank. `text_encoders` is [clip_l, t5xxl] (either may be None). `generator` drives the init. `network_module`
    names the args' spelling: `networks.lora_flux` (default) or `lycoris.kohya`."""
    args = network_args if isinstance(network_args, NetworkArgs) else parse_network_args(
        network_args, network_dropout=neuron_dropout, network_module=network_module)
    dim = 4 if network_dim is None else int(network_dim)
    alpha = 1.0 if network_alpha is None else float(network_alpha)
    if dim <= 0:
        raise ConfigError(f"--network_dim {network_dim}: the rank must be a positive whole number", key="network_dim")
    if alpha < 0:
        raise ConfigError(f"--network_alpha {network_alpha}: alpha must be ≥ 0 (0 means alpha = rank)", key="network_alpha")
    if train_unet and flux is not None:
        check_block_indices(flux, args)
    targets = all_targets(flux, text_encoders, train_unet=train_unet, train_text_encoder=train_text_encoder,
                          train_t5xxl=args.train_t5xxl)
    spec = args.adapter
    warn_about_loaders(spec)
    if spec.lycoris:
        encoders = list(text_encoders) + [None]
        targets = select_by_preset(targets, {"unet": flux, "clip_l": encoders[0]}, spec.preset)
    ranks = {t.name: plan_rank(t, dim, args) for t in targets}
    loras = _build(targets, ranks, {t.name: alpha for t in targets}, args, multiplier=multiplier, generator=generator)
    if not loras:
        raise ConfigError(f"the network has no module: preset={spec.preset.name} and the block/rank settings select no "
                          "layer of this model", key="network_args")
    logger.info("%s network: %d modules, rank %d, alpha %g%s%s", spec.algo.upper() if spec.lycoris else "LoRA",
                len(loras), dim, alpha, ", split qkv" if args.split_qkv else "", ", DoRA" if spec.dora_wd else "")
    return LoRANetwork(loras, args, multiplier=multiplier, train_unet=train_unet, train_text_encoder=train_text_encoder)


def create_network_from_weights(
    multiplier: float,
    file: str | Path | None,
    flux: nn.Module | None,
    text_encoders: Sequence[nn.Module | None] = (),
    *,
    network_args: Sequence[str] | Mapping[str, object] | NetworkArgs | None = None,
    neuron_dropout: float | None = None,
    train_unet: bool = True,
    train_text_encoder: bool = True,
    weights_sd: Mapping[str, torch.Tensor] | None = None,
    generator: torch.Generator | None = None,
    network_module: str | None = None,
) -> tuple[LoRANetwork, dict[str, torch.Tensor]]:
    """`--dim_from_weights`: one module per LoRA in the file, with the file's rank and alpha; dropouts, LoRA+, GGPO,
    reg LRs and split_qkv still come from `network_args` (rank-shaping args are ignored, with a warning). T5 modules
    exist iff the file has `lora_te3_` keys. Weights are not loaded here: call `load_weights` / `load_lora_state_dict`.
    Each module's algorithm comes from its keys: LoKr, LoHa, full and DoRA modules are built shaped like the file's."""
    args = network_args if isinstance(network_args, NetworkArgs) else parse_network_args(
        network_args, network_dropout=neuron_dropout, network_module=network_module)
    if weights_sd is None:
        if file is None:
            raise ConfigError("--dim_from_weights needs --network_weights <file>", key="dim_from_weights")
        weights_sd, _ = read_lora(file, flag="--network_weights")
    shaping = [k for k in ("in_dims", "train_double_block_indices", "train_single_block_indices", "train_blocks",
                           "network_reg_dims", *args.type_dims) if k in args.raw]
    if shaping:
        logger.warning("--dim_from_weights: the file sets every rank, so network_args %s are ignored", ", ".join(shaping))
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in weights_sd.items():
        name, _, suffix = key.partition(".")
        grouped.setdefault(name, {})[suffix] = value
    plain = {n for n, parts in grouped.items() if algo_of(parts) == "lora" and "dora_scale" not in parts}
    dims = {n: int(grouped[n]["lora_down.weight"].shape[0]) for n in plain if "lora_down.weight" in grouped[n]}
    alphas = {n: float(parts["alpha"].float()) for n, parts in grouped.items() if "alpha" in parts}
    has_t5 = any(n.startswith("lora_te3_") for n in grouped)
    targets = all_targets(flux, text_encoders, train_unet=train_unet, train_text_encoder=train_text_encoder,
                          train_t5xxl=has_t5)
    plain_args = replace(args, adapter=AdapterSpec())  # the file decides each module's algorithm
    loras = _build([t for t in targets if t.name in plain], dims, alphas, plain_args, multiplier=multiplier,
                   generator=generator, split_divides=True)
    for target in targets:
        if target.name in grouped and target.name not in plain and algo_of(grouped[target.name]) is not None:
            try:
                adapter = adapter_from_file(target.name, target.module, grouped[target.name], multiplier=multiplier,
                                            rank_dropout=args.rank_dropout, module_dropout=args.module_dropout)
            except ValueError as err:
                raise CheckpointError(f"{file or 'the LoRA'}: {err}", path=file, key=target.name) from None
            adapter.component = target.component
            loras.append(adapter)
    network = LoRANetwork(loras, args, multiplier=multiplier, train_unet=train_unet, train_text_encoder=train_text_encoder)
    logger.info("LoRA network from weights: %d modules", len(loras))
    return network, dict(weights_sd)
