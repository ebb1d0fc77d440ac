"""Frozen weights stored in float8 and up-cast per call (`--fp8_base`, `--fp8_scaled`, `generate --flux_dtype fp8`).

The matmul runs in the compute dtype (autocast's, else the input's); only the fp8 weight is kept for backward.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn


class _FrozenFp8Linear(torch.autograd.Function):
    """y = (x · W8ᵀ) · s + b for a frozen float8 weight, saving only the fp8 weight for backward.

    A plain `F.linear(x, W8.to(bf16))` would keep the up-cast copy alive until backward (2 bytes a parameter, the
    whole model without checkpointing); here backward up-casts again. No weight or bias gradient: they are frozen.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor | None,
                dtype: torch.dtype) -> torch.Tensor:
        y = F.linear(x.to(dtype), weight.to(dtype))
        if scale is not None:
            y = y * scale.to(dtype)
        if bias is not None:
            y = y + bias.to(dtype)
        ctx.save_for_backward(weight, scale)
        ctx.dtype, ctx.x_dtype = dtype, x.dtype
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight, scale = ctx.saved_tensors
        grad = grad.to(ctx.dtype)
        if scale is not None:
            grad = grad * scale.to(ctx.dtype)
        return (grad @ weight.to(ctx.dtype)).to(ctx.x_dtype), None, None, None, None


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def _fp8_linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    # Weights stored in float8, up-cast per call to the compute dtype (autocast's, else the input's); a per-row
    # scale (--fp8_scaled) is applied to the output: x·(W8·diag(s))ᵀ = (x·W8ᵀ)·s.
    return _FrozenFp8Linear.apply(x, self.weight, self.bias, getattr(self, "fp8_scale", None), _compute_dtype(x))


FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def fp8_quantize(weight: torch.Tensor, *, scaled: bool,
                 dtype: torch.dtype = torch.float8_e4m3fn) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(fp8 weight, per-output-row fp32 scale or None). Scaled: each row's largest |w| maps to the format's
    largest value (448 for e4m3), so small weights keep their mantissa bits instead of falling into subnormals;
    unscaled: a plain cast."""
    if not scaled:
        return weight.to(dtype), None
    largest = float(torch.finfo(dtype).max)
    w = weight.float()
    scale = (w.abs().amax(dim=1) / largest).clamp_min(torch.finfo(torch.float32).tiny)
    return (w / scale[:, None]).clamp(-largest, largest).to(dtype), scale


def upcast_fp8_linears(module: nn.Module) -> int:
    """Make every Linear of `module` whose weight is already fp8 (an fp8 checkpoint, or after `store_linears_in_fp8`)
    up-cast that weight per call instead of failing in `F.linear`; returns how many. Idempotent."""
    count = 0
    for linear in module.modules():
        if isinstance(linear, nn.Linear) and linear.weight.dtype in FP8_DTYPES:
            if getattr(linear.forward, "__func__", None) is not _fp8_linear_forward:
                linear.forward = types.MethodType(_fp8_linear_forward, linear)
            count += 1
    return count


def store_linears_in_fp8(module: nn.Module, *, scaled: bool = False, dtype: torch.dtype = torch.float8_e4m3fn,
                         keep: tuple[str, ...] = ()) -> int:
    """Keep every Linear weight of `module` in `dtype` (fp8) and up-cast it per call; returns how many were converted.

    `scaled` (--fp8_scaled) adds a per-output-row scale (a non-persistent buffer `fp8_scale`), applied to the
    layer output. Weights already stored in fp8 (fp8 checkpoints) are used as they are (not counted). Linears under
    the submodules named in `keep` stay as they are (a model family's precision-sensitive parts, e.g. Chroma's
    approximator). Used by training (`--fp8_base`) and by `fluxlora generate` (`--flux_dtype fp8`).
    """
    if dtype not in FP8_DTYPES:
        raise ValueError(f"store_linears_in_fp8: {dtype} is not an fp8 dtype")
    kept = {id(m) for name in keep for m in module.get_submodule(name).modules()}
    count = 0
    for linear in module.modules():
        if isinstance(linear, nn.Linear) and linear.weight.dtype not in FP8_DTYPES and id(linear) not in kept:
            weight, scale = fp8_quantize(linear.weight.data, scaled=scaled, dtype=dtype)
            linear.weight.data = weight
            if scale is not None:
                linear.register_buffer("fp8_scale", scale, persistent=False)
            count += 1
    upcast_fp8_linears(module)
    return count
