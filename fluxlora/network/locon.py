"""LoRA factors as an `Adapter`: the form DoRA uses (`dora_wd=True` with `algo=lora|locon`, or with
`networks.lora_flux`). ΔW = alpha/r · up @ down with kohya's keys (`lora_down.weight` [r, in], `lora_up.weight`
[out, r], `alpha`) plus LyCORIS' `dora_scale`. Plain LoRA (no DoRA) stays `LoRAModule`, which adds split_qkv, GGPO
and sd-scripts' dropouts; here dropout is LyCORIS' row mask over ΔW (`rank_dropout`) and `module_dropout`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from fluxlora.network.adapter import Adapter
from fluxlora.network.module import _linear, gram_row_norms_sq


class LoConModule(Adapter):
    """LoRA pair (+ DoRA magnitude) for one Linear (see the module docstring)."""

    algo = "lora"
    factor_names = ("lora_down.weight", "lora_up.weight")

    def __init__(self, lora_name: str, base: nn.Linear, *, rank: int, alpha: float | None, rs_lora: bool = False,
                 generator: torch.Generator | None = None, **common):
        super().__init__(lora_name, base, **common)
        if rank <= 0:
            raise ValueError(f"{lora_name}: rank must be positive, got {rank}")
        self.lora_dim = rank
        self.lora_down = _linear(self.in_features, rank)
        self.lora_up = _linear(rank, self.out_features)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5), generator=generator)
        nn.init.zeros_(self.lora_up.weight)
        r_factor = math.sqrt(rank) if rs_lora else float(rank)
        value = float(alpha) if alpha else float(rank)
        self.register_buffer("alpha", torch.tensor(value * rank / r_factor, dtype=torch.float32))
        self.scale = value / r_factor

    def set_alpha(self, alpha: float) -> None:
        value = alpha if alpha else float(self.lora_dim)
        self.alpha.fill_(value)
        self.scale = value / self.lora_dim

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self.scale = float(self.alpha) / self.lora_dim

    def raw_delta(self) -> Tensor:
        return (self.lora_up.weight.float() @ self.lora_down.weight.float()) * self.scale

    def delta_output(self, x: Tensor) -> Tensor:
        return self.lora_up(self.lora_down(x)) * self.scale

    def dora_row_terms(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        """(⟨W_i, ΔW_i⟩, ‖ΔW_i‖²) with ΔW = s·up@down: s·rowsum((W @ downᵀ) ⊙ up) and the Gram identity."""
        down, up = self.lora_down.weight, self.lora_up.weight
        cross = ((weight @ down.T.to(weight.dtype)).float() * up.float()).sum(dim=1) * self.scale
        return cross, gram_row_norms_sq(up.float(), down.float()) * self.scale**2

    @torch.no_grad()
    def file_tensors(self) -> dict[str, Tensor]:
        return {"alpha": self.alpha.detach().to("cpu", copy=True), **self._dora_file(),
                "lora_down.weight": self.lora_down.weight.detach().to("cpu", copy=True),
                "lora_up.weight": self.lora_up.weight.detach().to("cpu", copy=True)}

    @torch.no_grad()
    def load_file_tensors(self, parts: Mapping[str, Tensor]) -> None:
        self.lora_down.weight.copy_(parts["lora_down.weight"].float())
        self.lora_up.weight.copy_(parts["lora_up.weight"].float())
        self.set_alpha(float(parts["alpha"].float()) if "alpha" in parts else float(self.lora_dim))
        if "dora_scale" in parts:
            self.dora_scale.copy_(parts["dora_scale"].float())

    @torch.no_grad()
    def delta_norm(self) -> float:
        up, down = self.lora_up.weight.float(), self.lora_down.weight.float()
        return float(gram_row_norms_sq(up, down).sum().sqrt()) * abs(self.scale)

    @torch.no_grad()
    def scale_delta_(self, ratio: float) -> None:
        root = math.sqrt(ratio)
        self.lora_down.weight.mul_(root)
        self.lora_up.weight.mul_(root)

    @classmethod
    def from_file(cls, lora_name: str, base: nn.Linear, parts: Mapping[str, Tensor], **common) -> LoConModule:
        alpha = float(parts["alpha"].float()) if "alpha" in parts else None
        scale = parts.get("dora_scale")
        return cls(lora_name, base, rank=int(parts["lora_down.weight"].shape[0]), alpha=alpha, dora=scale is not None,
                   wd_on_output=scale is None or scale.shape[0] == base.out_features, **common)
