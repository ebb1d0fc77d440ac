"""LoHa (`algo=loha`): ΔW = scale · (w1_a @ w1_b) ⊙ (w2_a @ w2_b), LyCORIS' keys, init and alpha convention.

`hada_w1_a` / `hada_w2_a` are [out, r], `hada_w1_b` / `hada_w2_b` [r, in]; scale = alpha / r (alpha None or 0 → r;
`rs_lora`: alpha / √r, saved as alpha·√r so loaders' alpha/r agrees). Init as LyCORIS: w1_b, w2_b ~ N(0, 1),
w1_a ~ N(0, 0.1²), w2_a = 0 (so ΔW starts at 0); `use_scalar` starts w2_a random and a trained scalar at 0 (saved
folded into w1_a). The Hadamard product has no cheap ΔW·x, so ΔW is built per forward; its backward recomputes the
two rank-r products instead of keeping both [out, in] matrices alive until backward.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from fluxlora.network.adapter import Adapter, new_parameter


class _Hadamard(torch.autograd.Function):
    """(w1a @ w1b) ⊙ (w2a @ w2b), saving only the four factors for backward."""

    @staticmethod
    def forward(ctx, w1a: Tensor, w1b: Tensor, w2a: Tensor, w2b: Tensor) -> Tensor:
        ctx.save_for_backward(w1a, w1b, w2a, w2b)
        return (w1a @ w1b) * (w2a @ w2b)

    @staticmethod
    def backward(ctx, grad: Tensor):
        w1a, w1b, w2a, w2b = ctx.saved_tensors
        g1 = grad * (w2a @ w2b)  # ∂/∂(w1a @ w1b)
        g2 = grad * (w1a @ w1b)
        return g1 @ w1b.T, w1a.T @ g1, g2 @ w2b.T, w2a.T @ g2


def hadamard_product(w1a: Tensor, w1b: Tensor, w2a: Tensor, w2b: Tensor) -> Tensor:
    """(w1a @ w1b) ⊙ (w2a @ w2b) [out, in], memory-lean in backward."""
    return _Hadamard.apply(w1a, w1b, w2a, w2b)


class LoHaModule(Adapter):
    """LoHa adapter for one Linear (see the module docstring)."""

    algo = "loha"
    factor_names = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")

    def __init__(self, lora_name: str, base: nn.Linear, *, rank: int, alpha: float | None, use_scalar: bool = False,
                 rs_lora: bool = False, generator: torch.Generator | None = None, **common):
        super().__init__(lora_name, base, **common)
        if rank <= 0:
            raise ValueError(f"{lora_name}: rank must be positive, got {rank}")
        self.lora_dim = rank
        out, inp = self.out_features, self.in_features
        self.hada_w1_a, self.hada_w1_b = new_parameter(out, rank), new_parameter(rank, inp)
        self.hada_w2_a, self.hada_w2_b = new_parameter(out, rank), new_parameter(rank, inp)
        with torch.no_grad():
            self.hada_w1_b.normal_(0.0, 1.0, generator=generator)
            self.hada_w1_a.normal_(0.0, 0.1, generator=generator)
            self.hada_w2_b.normal_(0.0, 1.0, generator=generator)
            if use_scalar:
                self.hada_w2_a.normal_(0.0, 0.1, generator=generator)
            else:
                self.hada_w2_a.zero_()
        self.scalar = nn.Parameter(torch.tensor(0.0)) if use_scalar else None
        r_factor = math.sqrt(rank) if rs_lora else float(rank)
        value = float(alpha) if alpha else float(rank)
        self.register_buffer("alpha", torch.tensor(value * rank / r_factor, dtype=torch.float32))
        self.scale = value / r_factor

    def set_alpha(self, alpha: float) -> None:
        """A file's alpha sets the scale as every loader reads it: alpha / rank."""
        value = alpha if alpha else float(self.lora_dim)
        self.alpha.fill_(value)
        self.scale = value / self.lora_dim

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self.scale = float(self.alpha) / self.lora_dim

    def raw_delta(self) -> Tensor:
        product = hadamard_product(self.hada_w1_a.float(), self.hada_w1_b.float(), self.hada_w2_a.float(),
                                   self.hada_w2_b.float())
        return product * (self.scale if self.scalar is None else self.scalar * self.scale)

    @torch.no_grad()
    def file_tensors(self) -> dict[str, Tensor]:
        scalar = 1.0 if self.scalar is None else float(self.scalar)
        out = {"alpha": self.alpha.detach().to("cpu", copy=True), **self._dora_file()}
        for name in self.factor_names:
            value = getattr(self, name).detach().float()
            out[name] = (value * scalar if name == "hada_w1_a" else value).to("cpu", copy=True)
        return out

    @torch.no_grad()
    def load_file_tensors(self, parts: Mapping[str, Tensor]) -> None:
        super().load_file_tensors(parts)
        if self.scalar is not None:
            self.scalar.fill_(1.0)
        if "alpha" not in parts:
            self.set_alpha(float(self.lora_dim))

    @torch.no_grad()
    def scale_delta_(self, ratio: float) -> None:
        self.hada_w1_a.mul_(ratio)

    @classmethod
    def from_file(cls, lora_name: str, base: nn.Linear, parts: Mapping[str, Tensor], **common) -> LoHaModule:
        alpha = float(parts["alpha"].float()) if "alpha" in parts else None
        scale = parts.get("dora_scale")
        return cls(lora_name, base, rank=int(parts["hada_w1_b"].shape[0]), alpha=alpha, dora=scale is not None,
                   wd_on_output=scale is None or scale.shape[0] == base.out_features, **common)
