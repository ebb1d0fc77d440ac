"""Build the adapter module of one target from the run's `AdapterSpec` (training), or from a saved module's keys
(`--dim_from_weights`, `generate`, sampling): one place that knows which class implements which algorithm.

A saved module's algorithm follows from its keys, as LyCORIS and ComfyUI decide it: `lokr_*` → LoKr, `hada_*` →
LoHa, `diff` → full, `lora_down/lora_up` → LoRA (with `dora_scale`: DoRA, else a kohya `LoRAModule`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from fluxlora.config.adapter_args import AdapterSpec
from fluxlora.network.adapter import Adapter
from fluxlora.network.full import FullModule
from fluxlora.network.locon import LoConModule
from fluxlora.network.loha import LoHaModule
from fluxlora.network.lokr import LoKrModule, lokr_layout
from fluxlora.network.module import LoRAModule

#: Every module type a network may hold.
ADAPTER_TYPES = (LoRAModule, Adapter)
#: Suffixes of each algorithm's file keys (besides `alpha` and `dora_scale`).
ALGO_SUFFIXES: dict[str, tuple[str, ...]] = {
    "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"),
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),
    "full": ("diff", "diff_b"),
    "lora": ("lora_down.weight", "lora_up.weight", "lora_mid.weight"),
}
ALL_SUFFIXES = frozenset(s for group in ALGO_SUFFIXES.values() for s in group) | {"alpha", "dora_scale"}


def algo_of(suffixes: set[str] | Mapping[str, Tensor]) -> str | None:
    """The algorithm a saved module's keys belong to (None: no algorithm's key, e.g. only an alpha)."""
    found = [algo for algo, group in ALGO_SUFFIXES.items() if any(s in suffixes for s in group)]
    return found[0] if len(found) == 1 else None


def build_adapter(name: str, base: nn.Linear, spec: AdapterSpec, *, rank: int, alpha: float | None,
                  multiplier: float, rank_dropout: float | None, module_dropout: float | None,
                  generator: torch.Generator | None) -> Adapter:
    """A LyCORIS-style adapter for training (plain LoRA is `LoRAModule`, built by the LoRA network)."""
    common = dict(multiplier=multiplier, rank_dropout=rank_dropout, module_dropout=module_dropout,
                  rank_dropout_scale=spec.rank_dropout_scale, dora=spec.dora_wd, wd_on_output=spec.wd_on_output)
    if spec.algo == "lokr":
        layout = lokr_layout(base.out_features, base.in_features, rank, factor=spec.factor,
                             decompose_both=spec.decompose_both, full_matrix=spec.full_matrix,
                             unbalanced=spec.unbalanced_factorization)
        return LoKrModule(name, base, layout, alpha=alpha, use_scalar=spec.use_scalar, rs_lora=spec.rs_lora,
                          generator=generator, **common)
    if spec.algo == "loha":
        return LoHaModule(name, base, rank=rank, alpha=alpha, use_scalar=spec.use_scalar, rs_lora=spec.rs_lora,
                          generator=generator, **common)
    if spec.algo == "full":
        return FullModule(name, base, **common)
    return LoConModule(name, base, rank=rank, alpha=alpha, rs_lora=spec.rs_lora, generator=generator, **common)


def adapter_from_file(name: str, base: nn.Linear, parts: Mapping[str, Tensor], *, multiplier: float,
                      rank_dropout: float | None = None, module_dropout: float | None = None) -> Adapter:
    """A LyCORIS-style module shaped like the saved one (weights not loaded yet: `load_file_tensors`)."""
    algo = algo_of(parts)
    common = dict(multiplier=multiplier, rank_dropout=rank_dropout, module_dropout=module_dropout)
    if algo == "lokr":
        if "lokr_t2" in parts:
            raise ValueError(f"{name}: lokr_t2 (Tucker) only exists for Conv layers")
        return LoKrModule.from_file(name, base, parts, **common)
    if algo == "loha":
        if "hada_t1" in parts or "hada_t2" in parts:
            raise ValueError(f"{name}: hada_t1/hada_t2 (Tucker) only exist for Conv layers")
        return LoHaModule.from_file(name, base, parts, **common)
    if algo == "full":
        return FullModule.from_file(name, base, parts, **common)
    if algo == "lora" and "lora_mid.weight" not in parts:
        return LoConModule.from_file(name, base, parts, **common)
    raise ValueError(f"{name}: keys {sorted(parts)} are no LoRA / LoKr / LoHa / full module")
