"""Full (`algo=full`, LyCORIS' "native fine-tuning"): a trained dense ΔW (`diff` [out, in]) and Δb (`diff_b`, when
the base has a bias), both starting at zero; no alpha, no scale: W' = W + m·diff, b' = b + m·diff_b.

LyCORIS trains the whole weight W + diff as one parameter; here the parameter is the difference itself. The
gradients are the same; weight decay differs (here it pulls the weight back towards the base, there towards zero),
which is the regularisation a fine-tune wants. The file is LyCORIS' and ComfyUI reads it as a plain "diff" patch.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from fluxlora.network.adapter import Adapter


class FullModule(Adapter):
    """Dense difference adapter for one Linear (see the module docstring)."""

    algo = "full"
    factor_names = ("diff", "diff_b")

    def __init__(self, lora_name: str, base: nn.Linear, *, with_bias: bool | None = None, **common):
        super().__init__(lora_name, base, **common)
        if self.dora:
            raise ValueError(f"{lora_name}: algo=full has no DoRA form")
        self.diff = nn.Parameter(torch.zeros(self.out_features, self.in_features))
        with_bias = base.bias is not None if with_bias is None else with_bias
        self.diff_b = nn.Parameter(torch.zeros(self.out_features)) if with_bias else None
        self.lora_dim = min(self.out_features, self.in_features)

    def raw_delta(self) -> Tensor:
        return self.diff.float()

    def raw_delta_bias(self) -> Tensor | None:
        return None if self.diff_b is None else self.diff_b.float()

    def delta_output(self, x: Tensor) -> Tensor:
        return nn.functional.linear(x, self.diff, self.diff_b)

    @torch.no_grad()
    def file_tensors(self) -> dict[str, Tensor]:
        out = {"diff": self.diff.detach().to("cpu", copy=True)}
        if self.diff_b is not None:
            out["diff_b"] = self.diff_b.detach().to("cpu", copy=True)
        return out

    @torch.no_grad()
    def scale_delta_(self, ratio: float) -> None:
        self.diff.mul_(ratio)
        if self.diff_b is not None:
            self.diff_b.mul_(ratio)

    @classmethod
    def from_file(cls, lora_name: str, base: nn.Linear, parts: Mapping[str, Tensor], **common) -> FullModule:
        if "diff_b" in parts and base.bias is None:
            raise ValueError(f"{lora_name}: the file has diff_b but the model's layer has no bias")
        return cls(lora_name, base, with_bias="diff_b" in parts, **common)
