"""DoRA (weight-decomposed adaptation) as LyCORIS defines it for every algorithm (`dora_wd=True`): pure functions.

With V = W + ΔW (ΔW the algorithm's delta, scale included) and the trained magnitude m (`dora_scale`):
    DoRA(W, ΔW) = V · m / (‖V‖ + eps)
where the norm runs over each output row (`wd_on_output=True`, LyCORIS' default and the DoRA paper's; `dora_scale`
[out, 1]) or over each input column (`wd_on_output=False`; [1, in]). m starts at the same norm of W, so an
untrained adapter changes nothing. eps is fp32's machine epsilon, added as LyCORIS and ComfyUI add it.

Multiplier (strength) semantics: W' = W + strength · (DoRA(W, ΔW) − W). This is what ComfyUI's `weight_decompose`
applies and what a merge with a ratio means; at strength 1 it is exactly LyCORIS' weight (LyCORIS scales the
norm factor instead, which leaves ΔW switched on at multiplier 0; here 0 switches the adapter off).
"""

from __future__ import annotations

import torch
from torch import Tensor

EPS = torch.finfo(torch.float32).eps


def row_or_column_norm(weight: Tensor, *, on_output: bool) -> Tensor:
    """‖row‖ as [out, 1] (on_output) or ‖column‖ as [1, in]."""
    return weight.norm(dim=1, keepdim=True) if on_output else weight.norm(dim=0, keepdim=True)


def magnitude_init(weight: Tensor, *, on_output: bool) -> Tensor:
    """The initial `dora_scale`: the norms of the base weight (fp32)."""
    return row_or_column_norm(weight.float(), on_output=on_output)


def dora_weight(weight: Tensor, delta: Tensor, magnitude: Tensor, *, on_output: bool) -> Tensor:
    """DoRA(W, ΔW) = (W + ΔW) · m / (‖W + ΔW‖ + eps), in fp32 (differentiable in ΔW and m)."""
    merged = weight.float() + delta.float()
    return merged * (magnitude.float() / (row_or_column_norm(merged, on_output=on_output) + EPS))


def dora_delta(weight: Tensor, delta: Tensor, magnitude: Tensor, *, on_output: bool) -> Tensor:
    """DoRA(W, ΔW) − W: the change at strength 1 (multiply by the strength for W' = W + s·change)."""
    return dora_weight(weight, delta, magnitude, on_output=on_output) - weight.float()
