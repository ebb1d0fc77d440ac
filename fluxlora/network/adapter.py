"""The one module interface every adapter shares (LoRA, LoKr, LoHa, full, each optionally with DoRA).

An adapter wraps one frozen `nn.Linear` the way `LoRAModule` does: the base keeps its parameters and names (so
`Flux.state_dict()`, fp8 storage and block swap are unaffected), only its `forward` is routed through the adapter
(`apply_to`, undone by `remove`), and the adapter is not a child of the base, so block swap moves base weights
without touching the adapter's. Adapter parameters are fp32 whatever the base dtype.

What the network, the trainer and the tools rely on (and nothing else):
- `lora_name`, `component` (unet / clip_l / t5xxl), `multiplier`, `base`, `in_features`, `out_features`;
- `apply_to()`, `remove()`, `forward(x)`, `merge_into_base()`;
- `delta_weight(multiplier)` / `delta_bias(multiplier)`: the exact change `W' − W` (fp32, DoRA included), so merge,
  the ComfyUI rules and the on-the-fly forward can be compared;
- `file_tensors()` (LyCORIS / kohya suffix → tensor) and `load_file_tensors(parts)` after `file_problems(parts)`;
- `delta_norm()` and `scale_delta_(ratio)` for `--scale_weight_norms`; `update_norms()` (GGPO; a no-op here).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from fluxlora.network.dora import EPS, dora_delta, magnitude_init


def global_rand(shape: tuple[int, ...], device: torch.device) -> Tensor:
    # Forward-time draws use torch's global RNG on purpose: torch.utils.checkpoint replays that state when it
    # recomputes a block, and accelerate saves and restores it for an exact resume (as LoRAModule does).
    return torch.rand(shape, device=device)


def base_weight(base: nn.Linear) -> Tensor:
    """The base weight in fp32, dequantized when it is stored in fp8 (with its per-row `fp8_scale`, if any)."""
    weight = base.weight.float()
    scale = getattr(base, "fp8_scale", None)
    return weight if scale is None else weight * scale.float()[:, None]


def new_parameter(*shape: int) -> nn.Parameter:
    """An uninitialised fp32 CPU parameter (init is explicit, with the caller's generator)."""
    return nn.Parameter(torch.empty(*shape))


class Adapter(nn.Module):
    """Base of the LyCORIS-style adapters (see the module docstring). Subclasses define `algo`, the parameters,
    `raw_delta()` (ΔW without multiplier, [out, in] fp32, differentiable), `file_tensors()` and their file checks;
    they may override `delta_output(x)` with a cheaper ΔW·x than the dense product."""

    algo = ""
    #: Parameter names that are factors of ΔW (the ones `--scale_weight_norms` may rescale), in file order.
    factor_names: tuple[str, ...] = ()

    def __init__(self, lora_name: str, base: nn.Linear, *, multiplier: float = 1.0, rank_dropout: float | None = None,
                 module_dropout: float | None = None, rank_dropout_scale: bool = False, dora: bool = False,
                 wd_on_output: bool = True):
        super().__init__()
        self.lora_name = lora_name
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.multiplier = float(multiplier)
        self.rank_dropout = rank_dropout or None
        self.module_dropout = module_dropout or None
        self.rank_dropout_scale = rank_dropout_scale
        self.component = "unet"
        self.wd_on_output = wd_on_output
        self._base: list[nn.Linear] = [base]  # a list, so the base is not registered as a child
        self._org_forward = None
        if dora:
            shape = (self.out_features, 1) if wd_on_output else (1, self.in_features)
            self.dora_scale = nn.Parameter(torch.zeros(shape))
            if base.weight.device.type != "meta":
                with torch.no_grad():
                    self.dora_scale.copy_(magnitude_init(base_weight(base), on_output=wd_on_output))
        else:
            self.dora_scale = None

    # ---- interface shared with LoRAModule ------------------------------------------------------------------------
    @property
    def base(self) -> nn.Linear:
        return self._base[0]

    @property
    def dora(self) -> bool:
        return self.dora_scale is not None

    def apply_to(self) -> None:
        """Route the base module's forward through this adapter (its weights and names stay untouched)."""
        if self._org_forward is not None:
            return
        self._org_forward = self.base.forward
        self.base.forward = self.forward

    def remove(self) -> None:
        """Give the base module its own forward back."""
        if self._org_forward is not None:
            del self.base.forward
            self._org_forward = None

    def update_norms(self) -> None:
        """LoRA-GGPO only (LoRAModule); nothing to do for the other algorithms."""

    # ---- the change this adapter makes ---------------------------------------------------------------------------
    def raw_delta(self) -> Tensor:
        """ΔW without the multiplier: [out, in] fp32 (scale and `use_scalar` included), differentiable."""
        raise NotImplementedError

    def raw_delta_bias(self) -> Tensor | None:
        """Δb without the multiplier (only `full` changes the bias)."""
        return None

    def delta_weight(self, multiplier: float | None = None) -> Tensor:
        """`W' − W` in fp32 at `multiplier` (default: the module's): m·ΔW, or m·(DoRA(W, ΔW) − W) with DoRA."""
        m = self.multiplier if multiplier is None else float(multiplier)
        with torch.no_grad():
            delta = self.raw_delta()
            if self.dora:
                delta = dora_delta(base_weight(self.base), delta.to(self.base.weight.device), self.dora_scale.float(),
                                   on_output=self.wd_on_output)
            return delta * m

    def delta_bias(self, multiplier: float | None = None) -> Tensor | None:
        m = self.multiplier if multiplier is None else float(multiplier)
        with torch.no_grad():
            bias = self.raw_delta_bias()
            return None if bias is None else bias * m

    @torch.no_grad()
    def merge_into_base(self) -> None:
        """W += delta_weight() (and b += delta_bias()) in fp32, stored back in the base dtype; then detach."""
        weight = self.base.weight
        if weight.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            raise ValueError(f"{self.lora_name}: merging into an fp8 base weight would re-quantize it; merge into a "
                             "bf16/fp16/fp32 model or apply the adapter on the fly")
        merged = weight.float() + self.delta_weight().to(weight.device)
        weight.copy_(merged.to(weight.dtype))
        bias = self.delta_bias()
        if bias is not None:
            self.base.bias.copy_((self.base.bias.float() + bias.to(weight.device)).to(self.base.bias.dtype))
        self.remove()

    # ---- forward ---------------------------------------------------------------------------------------------
    def _row_mask(self, device: torch.device) -> Tensor | None:
        """LyCORIS' rank dropout for these algorithms: one keep mask over ΔW's output rows per forward."""
        if not (self.training and self.rank_dropout):
            return None
        keep = (global_rand((self.out_features,), device) > self.rank_dropout).float()
        if self.rank_dropout_scale:
            keep = keep / keep.mean().clamp_min(1e-12)
        return keep

    def delta_output(self, x: Tensor) -> Tensor:
        """ΔW·x (+ Δb) in the compute dtype, without the multiplier; subclasses may avoid the dense ΔW."""
        delta = self.raw_delta()
        bias = self.raw_delta_bias()
        dtype = x.dtype
        return nn.functional.linear(x, delta.to(dtype), None if bias is None else bias.to(dtype))

    def forward(self, x: Tensor) -> Tensor:
        if self._org_forward is None:
            raise RuntimeError(f"{self.lora_name}: call apply_to() before running the adapter")
        out = self._org_forward(x)
        if self.multiplier == 0.0:
            return out  # DOP's prior pass and disabled adapters cost nothing
        if self.training and self.module_dropout and float(global_rand((1,), x.device)) < self.module_dropout:
            return out
        if x.dtype != torch.float32 and not torch.is_autocast_enabled(x.device.type):
            x = x.float()  # no autocast: the adapter computes in fp32, as LoRAModule does
        mask = self._row_mask(x.device)
        if self.dora and self.wd_on_output and self.dora_row_terms is not None:
            y = self._dora_output_axis(x, out, mask)
        elif self.dora:
            delta = self.raw_delta()
            if mask is not None:
                delta = delta * mask[:, None]
            weight = base_weight(self.base).to(delta.device)
            change = dora_delta(weight, delta, self.dora_scale, on_output=self.wd_on_output)
            y = nn.functional.linear(x, change)  # x is fp32 here unless autocast casts both
        else:
            y = self.delta_output(x)
            if mask is not None:
                y = y * mask.to(y.dtype)
        return out + (y * self.multiplier).to(out.dtype)

    #: (W) → (⟨W_i, ΔW_i⟩, ‖ΔW_i‖²) per output row without forming ΔW; algorithms that can, define it
    dora_row_terms = None

    def _dora_output_axis(self, x: Tensor, out: Tensor, mask: Tensor | None) -> Tensor:
        """Output-axis DoRA without an [out, in] matrix: W'x = s ⊙ (Wx + ΔWx), s = m / ‖W + ΔW‖ per row, with
        ‖W_i + ΔW_i‖² = ‖W_i‖² + 2⟨W_i, ΔW_i⟩ + ‖ΔW_i‖² from the factors, and Wx = base(x) − b (already computed).
        The same function as `dora_delta` (tests compare both); backward costs what LoRA's does."""
        weight = self.base.weight if self.base.weight.dtype in (torch.float32, torch.bfloat16, torch.float16) \
            else base_weight(self.base)
        with torch.no_grad():
            own = base_weight(self.base).square().sum(dim=1)  # ‖W_i‖², frozen
        cross, dsq = self.dora_row_terms(weight)
        if mask is not None:
            cross, dsq = cross * mask, dsq * mask.square()
        norm = (own + 2 * cross.float() + dsq.float()).clamp_min(0.0).sqrt()
        s = self.dora_scale.float().squeeze(1) / (norm + EPS)
        bias = self.base.bias
        wx = out if bias is None else out - bias.to(out.dtype)
        delta_x = self.delta_output(x)
        if mask is not None:
            delta_x = delta_x * mask.to(delta_x.dtype)
        return (s - 1).to(wx.dtype) * wx + s.to(delta_x.dtype) * delta_x

    # ---- files -----------------------------------------------------------------------------------------------
    def file_tensors(self) -> dict[str, Tensor]:
        """Suffix → tensor, exactly the keys LyCORIS writes for this module (detached, on the CPU)."""
        raise NotImplementedError

    def file_shapes(self) -> dict[str, tuple[int, ...]]:
        """The suffixes and shapes `load_file_tensors` needs (from `file_tensors`, which has the same layout)."""
        return {k: tuple(v.shape) for k, v in self.file_tensors().items()}

    def file_problems(self, parts: Mapping[str, Tensor]) -> list[str]:
        """What keeps `parts` (suffix → tensor of one module) from loading into this module; empty when it fits."""
        want = self.file_shapes()
        problems = [f"{self.lora_name}.{s} (missing)" for s in want if s not in parts and s != "alpha"]
        problems += [f"{self.lora_name}.{s} (not a key of algo={self.algo}{' with DoRA' if self.dora else ''})"
                     for s in parts if s not in want]
        for s in want:
            if s not in parts:
                continue
            shape = tuple(parts[s].shape)
            if (parts[s].numel() != 1) if s == "alpha" else shape != want[s]:
                problems.append(f"{self.lora_name}.{s} (file {list(shape)}, network {list(want[s])})")
        return problems

    @torch.no_grad()
    def load_file_tensors(self, parts: Mapping[str, Tensor]) -> None:
        """Copy a module's file tensors in (checked with `file_problems` first)."""
        for suffix, tensor in parts.items():
            if suffix == "alpha":
                self.set_alpha(float(tensor.float()))
            elif suffix == "dora_scale":
                self.dora_scale.copy_(tensor.float())
            else:
                getattr(self, suffix).copy_(tensor.float())

    def set_alpha(self, alpha: float) -> None:
        """Algorithms with an alpha override this; the others have none."""

    def _dora_file(self) -> dict[str, Tensor]:
        return {"dora_scale": self.dora_scale.detach().to("cpu", copy=True)} if self.dora else {}

    # ---- --scale_weight_norms ------------------------------------------------------------------------------
    @torch.no_grad()
    def delta_norm(self) -> float:
        """‖ΔW‖_F without the multiplier (the quantity sd-scripts' max-norm regulariser bounds)."""
        return float(self.raw_delta().norm())

    @torch.no_grad()
    def scale_delta_(self, ratio: float) -> None:
        """Scale ΔW by `ratio` (each algorithm knows which factor to scale)."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"{self.lora_name}: algo={self.algo}{', dora' if self.dora else ''}"
