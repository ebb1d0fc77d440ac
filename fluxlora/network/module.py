"""One LoRA adapter around a frozen `nn.Linear`: `y = W·x + b + multiplier · alpha/rank · up(down(x))`.

The base module keeps its parameters and names (so `Flux.state_dict()` and block swap are unaffected); only its
`forward` is replaced by the adapter's, sd-scripts style, and restored by `remove()`. The adapter is not a child of
the base module, so moving base weights between devices (block swap) leaves the LoRA weights where they are. LoRA
parameters are fp32 whatever the base dtype: the input is cast to the LoRA dtype and the delta back to the output's.

With `split_dims` (sd-scripts' `split_qkv`), one down projection of rank k·r feeds k separate up projections, one per
output band (q, k, v[, mlp]); this equals k independent rank-r LoRAs and is saved in the fused block-diagonal form
every loader reads (`fused_factors`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def _rand(shape: tuple[int, ...], device: torch.device) -> Tensor:
    # Forward-time draws use torch's global RNG on purpose: torch.utils.checkpoint replays that state when it
    # recomputes a block (an explicit generator would give the recomputation other masks and wrong gradients),
    # and accelerate saves and restores it for an exact resume.
    return torch.rand(shape, device=device)


def _linear(in_features: int, out_features: int) -> nn.Linear:
    """A bias-free Linear with uninitialised fp32 CPU weight: no draws from the global RNG (init is explicit)."""
    layer = nn.Linear(in_features, out_features, bias=False, device="meta")
    layer.weight = nn.Parameter(torch.empty(out_features, in_features))
    return layer


def gram_row_norms_sq(a: Tensor, b: Tensor) -> Tensor:
    """Squared row norms of `a @ b` [out, in] without forming it: rowsum((a @ (b bᵀ)) ⊙ a). Cost O(out·r² + r²·in)."""
    return ((a @ (b @ b.T)) * a).sum(dim=1).clamp_min(0.0)


class LoRAModule(nn.Module):
    """LoRA adapter for one Linear (see module docstring). `alpha` None or 0 means alpha = rank (scale 1)."""

    def __init__(
        self,
        lora_name: str,
        base: nn.Linear,
        *,
        rank: int,
        alpha: float | None,
        multiplier: float = 1.0,
        dropout: float | None = None,
        rank_dropout: float | None = None,
        module_dropout: float | None = None,
        split_dims: list[int] | None = None,
        ggpo_sigma: float | None = None,
        ggpo_beta: float | None = None,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        if rank <= 0:
            raise ValueError(f"{lora_name}: rank must be positive, got {rank}")
        self.lora_name = lora_name
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.lora_dim = rank
        self.split_dims = list(split_dims) if split_dims else None
        if self.split_dims is not None and sum(self.split_dims) != self.out_features:
            raise ValueError(f"{lora_name}: split dims {self.split_dims} do not add up to {self.out_features}")
        parts = len(self.split_dims) if self.split_dims else 1
        # No draws from the global RNG; the init below uses `generator`.
        self.lora_down = _linear(self.in_features, rank * parts)
        if self.split_dims is None:
            self.lora_up: nn.Module = _linear(rank, self.out_features)
            nn.init.zeros_(self.lora_up.weight)
        else:
            self.lora_up = nn.ModuleList(_linear(rank, d) for d in self.split_dims)
            for up in self.lora_up:
                nn.init.zeros_(up.weight)
        # Kaiming-uniform a=√5 ⇒ U(±1/√in), as sd-scripts (and nn.Linear) initialise.
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5), generator=generator)
        self.register_buffer("alpha", torch.tensor(0.0, dtype=torch.float32))
        self.set_alpha(alpha)

        self.multiplier = float(multiplier)
        self.dropout = dropout or None
        self.rank_dropout = rank_dropout or None
        self.module_dropout = module_dropout or None
        self.component = "unet"  # set by the network: unet, clip_l or t5xxl

        self.ggpo_sigma = ggpo_sigma
        self.ggpo_beta = ggpo_beta
        self.org_norm: float | None = None  # mean row norm of the frozen weight (GGPO)
        self.combined_norms: Tensor | None = None
        self.grad_norms: Tensor | None = None
        if self.ggpo and base.weight.device.type != "meta":
            self.org_norm = self._mean_row_norm(base.weight)

        self._base: list[nn.Linear] = [base]  # a list, so the base is not registered as a child
        self._org_forward = None

    # ---- parameters ---------------------------------------------------------------------------------------------
    @property
    def base(self) -> nn.Linear:
        return self._base[0]

    @property
    def parts(self) -> int:
        return len(self.split_dims) if self.split_dims else 1

    @property
    def ggpo(self) -> bool:
        return self.ggpo_sigma is not None and self.ggpo_beta is not None

    def set_alpha(self, alpha: float | Tensor | None) -> None:
        """Set alpha (per part for split modules) and the scale alpha/rank; None or 0 means alpha = rank."""
        value = float(alpha) if alpha is not None else 0.0
        if value == 0.0:
            value = float(self.lora_dim)
        self.alpha.fill_(value)
        self.scale = value / self.lora_dim

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        # Resume loads the alpha buffer through load_state_dict; the cached scale must follow it.
        super()._load_from_state_dict(*args, **kwargs)
        self.scale = float(self.alpha) / self.lora_dim

    def up_weights(self) -> list[Tensor]:
        return [self.lora_up.weight] if self.split_dims is None else [up.weight for up in self.lora_up]

    def fused_factors(self) -> tuple[Tensor, Tensor]:
        """(up [out, k·r], down [k·r, in]) of the single fused LoRA this module equals (block-diagonal up if split)."""
        down = self.lora_down.weight
        if self.split_dims is None:
            return self.lora_up.weight, down
        ups = self.up_weights()
        return torch.block_diag(*ups), down

    def fused_alpha(self) -> float:
        """Alpha of the fused form: k·alpha keeps alpha/rank (rank k·r) equal to the split modules' scale."""
        return float(self.alpha) * self.parts

    @torch.no_grad()
    def load_fused(self, up: Tensor, down: Tensor) -> None:
        """Load a fused (up, down) pair; for split modules `up` must be block-diagonal (checked by the caller)."""
        self.lora_down.weight.copy_(down)
        if self.split_dims is None:
            self.lora_up.weight.copy_(up)
            return
        row = 0
        for j, (size, up_j) in enumerate(zip(self.split_dims, self.lora_up, strict=False)):
            up_j.weight.copy_(up[row : row + size, j * self.lora_dim : (j + 1) * self.lora_dim])
            row += size

    def delta_weight(self, multiplier: float | None = None) -> Tensor:
        """multiplier · scale · up @ down in fp32, shaped like the base weight."""
        up, down = self.fused_factors()
        m = self.multiplier if multiplier is None else multiplier
        return (up.float() @ down.float()) * (m * self.scale)

    # ---- attaching ----------------------------------------------------------------------------------------------
    def apply_to(self) -> None:
        """Route the base module's forward through this adapter (its weights and names stay untouched)."""
        if self._org_forward is not None:
            return
        self._org_forward = self.base.forward
        self.base.forward = self.forward

    def remove(self) -> None:
        """Give the base module its own forward back."""
        if self._org_forward is not None:
            del self.base.forward  # drops the instance attribute, the class forward shows through again
            self._org_forward = None

    @torch.no_grad()
    def merge_into_base(self) -> None:
        """W += multiplier·scale·up@down in fp32, stored back in the base dtype; then detach the adapter."""
        weight = self.base.weight
        merged = weight.float() + self.delta_weight().to(weight.device)
        weight.copy_(merged.to(weight.dtype))
        self.remove()

    # ---- forward ------------------------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        if self._org_forward is None:
            raise RuntimeError(f"{self.lora_name}: call apply_to() before running the adapter")
        out = self._org_forward(x)
        if self.multiplier == 0.0:
            return out  # DOP's prior pass and disabled adapters cost nothing
        if self.training and self.module_dropout and float(_rand((1,), x.device)) < self.module_dropout:
            return out
        # Under autocast the matmuls run in the autocast dtype anyway: casting x to fp32 first would only add a copy.
        if x.dtype != self.lora_down.weight.dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.lora_down.weight.dtype)
        lx = self.lora_down(x)
        scale = self.scale
        if self.training and self.dropout:
            keep = _rand(tuple(lx.shape), lx.device) >= self.dropout
            lx = lx * keep / (1.0 - self.dropout)
        if self.training and self.rank_dropout:
            # One keep mask per (sample, rank index), shared by all tokens of the sample.
            mask_shape = (lx.shape[0],) + (1,) * (lx.ndim - 2) + (lx.shape[-1],)
            lx = lx * (_rand(mask_shape, lx.device) >= self.rank_dropout)
            scale = scale / (1.0 - self.rank_dropout)
        if self.split_dims is None:
            ly = self.lora_up(lx)
        else:
            chunks = lx.split(self.lora_dim, dim=-1)
            ly = torch.cat([up(c) for up, c in zip(self.lora_up, chunks, strict=False)], dim=-1)
        ly = ly * (self.multiplier * scale)
        if self.training and self.ggpo and self.combined_norms is not None and self.grad_norms is not None:
            ly = ly + self._ggpo_perturbation(x)
        return out + ly.to(out.dtype)

    # ---- LoRA-GGPO ----------------------------------------------------------------------------------------------
    @staticmethod
    @torch.no_grad()
    def _mean_row_norm(weight: Tensor, chunk: int = 4096) -> float:
        # Exact mean over all rows (one pass, chunked), not sd-scripts' estimate from ≤1000 random rows: it is
        # deterministic and cheap next to a training step.
        total = 0.0
        for start in range(0, weight.shape[0], chunk):
            total += float(weight[start : start + chunk].float().norm(dim=1).sum())
        return total / weight.shape[0]

    @torch.no_grad()
    def update_norms(self) -> None:
        """After a synced backward: the row norms GGPO's perturbation is scaled by (spec §5.5, with ×scale applied).

        combined = sqrt(org_norm² + rowsum((scale·up·down)²)); grad = rownorm(scale·(up·∂down + ∂up·down)).
        Both use the Gram identity (`gram_row_norms_sq`), so no [out, in] matrix is formed.
        """
        if not (self.ggpo and self.training):
            return
        if self.org_norm is None:  # the network was built while the base weights were still on the meta device
            if self.base.weight.device.type == "meta":
                return
            self.org_norm = self._mean_row_norm(self.base.weight)
        up, down = (t.float() for t in self.fused_factors())
        self.combined_norms = torch.sqrt(self.org_norm**2 + gram_row_norms_sq(up, down) * self.scale**2)
        grad_down = self.lora_down.weight.grad
        grad_ups = [w.grad for w in self.up_weights()]
        if grad_down is None and all(g is None for g in grad_ups):
            self.grad_norms = torch.zeros_like(self.combined_norms)
            return
        grad_down = torch.zeros_like(down) if grad_down is None else grad_down.float()
        grad_ups = [torch.zeros_like(w) if g is None else g for w, g in zip(self.up_weights(), grad_ups, strict=False)]
        grad_up = grad_ups[0].float() if self.split_dims is None else torch.block_diag(*grad_ups).float()
        a = torch.cat([up, grad_up], dim=1)  # up·∂down + ∂up·down = [up, ∂up] @ [∂down; down]
        b = torch.cat([grad_down, down], dim=0)
        self.grad_norms = torch.sqrt(gram_row_norms_sq(a, b)) * abs(self.scale)

    @torch.no_grad()
    def _ggpo_perturbation(self, x: Tensor) -> Tensor:
        """GGPO's `x @ Pᵀ`, P = N(0,1)[out,in] · r (row scale r = (σ·combined + β·grad²)/√out), drawn cheaply.

        For one token, (x @ Pᵀ)_j = r_j · Σ_i N_ji x_i ~ N(0, r_j²‖x‖²), so drawing z ~ N(0,1) of shape [..., out] and
        returning z · r · ‖x‖ gives exactly the same distribution per output element at O(tokens·out) cost instead of
        drawing out·in Gaussians per forward. The one difference: sd-scripts' single matrix correlates the noise of
        different tokens within a forward, here each token gets independent noise (same variance), which is the
        perturbation GGPO's analysis assumes per sample.
        """
        r = (self.ggpo_sigma * self.combined_norms + self.ggpo_beta * self.grad_norms**2) / math.sqrt(self.out_features)
        xf = x.float()
        z = torch.randn(tuple(xf.shape[:-1]) + (self.out_features,), device=xf.device)  # global RNG, see _rand
        return z * r.to(xf.device) * xf.norm(dim=-1, keepdim=True)

    def extra_repr(self) -> str:
        split = f", split={self.split_dims}" if self.split_dims else ""
        return f"{self.lora_name}: rank={self.lora_dim}, alpha={float(self.alpha):g}{split}"


    # ---- the adapter interface shared with fluxlora.network.adapter.Adapter (LoKr, LoHa, full, DoRA) ---------------
    algo = "lora"
    dora = False

    def delta_bias(self, multiplier: float | None = None) -> Tensor | None:
        return None  # LoRA never changes the bias

    @torch.no_grad()
    def file_tensors(self) -> dict[str, Tensor]:
        """kohya keys: `lora_down.weight`, `lora_up.weight` (split modules fused, block-diagonal up) and `alpha`."""
        up, down = self.fused_factors()
        return {"lora_down.weight": down.detach().to("cpu", copy=True),
                "lora_up.weight": up.detach().to("cpu", copy=True),
                "alpha": torch.tensor(self.fused_alpha(), dtype=torch.float32)}

    def file_problems(self, parts: dict[str, Tensor]) -> list[str]:
        """Why `parts` (suffix → tensor) cannot load into this module; empty when it fits. `alpha` is optional."""
        up, down = self.fused_factors()
        want = {"lora_down.weight": tuple(down.shape), "lora_up.weight": tuple(up.shape)}
        problems = [f"{self.lora_name}.{s} (not a LoRA key)" for s in parts if s not in (*want, "alpha")]
        for suffix, shape in want.items():
            if suffix not in parts:
                problems.append(f"{self.lora_name}.{suffix} (missing)")
            elif tuple(parts[suffix].shape) != shape:
                problems.append(f"{self.lora_name}.{suffix} (file {list(parts[suffix].shape)}, network {list(shape)})")
        if "alpha" in parts and parts["alpha"].numel() != 1:
            problems.append(f"{self.lora_name}.alpha (file {list(parts['alpha'].shape)}, expected a scalar)")
        if not problems and self.split_dims is not None:
            mask = torch.block_diag(*[torch.ones(d, self.lora_dim, dtype=torch.bool) for d in self.split_dims])
            if not bool((parts["lora_up.weight"][~mask] == 0).all()):
                problems.append(f"{self.lora_name} was not trained with split_qkv (its up weight is not "
                                "block-diagonal); load it without split_qkv=True")
        return problems

    @torch.no_grad()
    def load_file_tensors(self, parts: dict[str, Tensor]) -> None:
        """Load checked file tensors; a missing alpha means alpha = rank, and alpha 0 is read as rank (sd-scripts)."""
        self.load_fused(parts["lora_up.weight"].float(), parts["lora_down.weight"].float())
        fused_rank = self.lora_dim * self.parts
        alpha = float(parts["alpha"].float()) if "alpha" in parts else float(fused_rank)
        self.set_alpha((alpha or float(fused_rank)) / self.parts)

    @torch.no_grad()
    def delta_norm(self) -> float:
        """‖scale · up @ down‖_F without forming the matrix (Gram identity)."""
        up, down = (t.float() for t in self.fused_factors())
        return float(gram_row_norms_sq(up, down).sum().sqrt()) * abs(self.scale)

    @torch.no_grad()
    def scale_delta_(self, ratio: float) -> None:
        """Scale ΔW by `ratio`: up and down each by √ratio (sd-scripts' max-norm rule)."""
        root = math.sqrt(ratio)
        self.lora_down.weight.mul_(root)
        for w in self.up_weights():
            w.mul_(root)
