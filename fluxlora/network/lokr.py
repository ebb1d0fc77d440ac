"""LoKr (`algo=lokr`): ΔW = scale · (w1 ⊗ w2), LyCORIS' shapes, keys and alpha convention.

For a Linear [out, in]: out = a·c and in = b·d are split by `factorization(·, factor)` (the smaller part first;
`unbalanced_factorization` swaps the output split); w1 is [a, b] (`lokr_w1`, or `lokr_w1_a` [a, r] @ `lokr_w1_b`
[r, b] with `decompose_both` when r < max(a, b)/2), w2 is [c, d] (`lokr_w2`, or `lokr_w2_a` [c, r] @ `lokr_w2_b`
[r, d] when r < max(c, d)/2 and not `full_matrix`). scale = alpha / r (alpha None or 0 → r); when neither half is
decomposed the scale is 1 and the saved alpha is r, which is also what loaders assume (they read alpha only next to
a `_b` factor). `rs_lora` divides by √r instead and saves alpha·√r, so loaders' alpha/r is the same scale.

Init as LyCORIS: w1 (or both w1 factors) Kaiming-uniform, w2 zero (`lokr_w2`, or `lokr_w2_b` with `lokr_w2_a`
Kaiming); `use_scalar` instead starts w2 random and a trained scalar at 0 (saved folded into w1).
The forward never builds ΔW: ΔW·x = vec(w1 · X · w2ᵀ) with X the input reshaped to [b, d].
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fluxlora.network.adapter import Adapter, new_parameter


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """LyCORIS' split of `dimension` into (m, n), m ≤ n, m·n = dimension: m = factor when it divides, else the
    most balanced pair with m ≤ factor (factor ≤ 0: the most balanced pair). 3072 → (48, 64); factor 16 → (16, 192)."""
    if factor > 0 and dimension % factor == 0:
        m, n = factor, dimension // factor
        return (m, n) if m <= n else (n, m)
    if factor < 0:
        factor = dimension
    m, n = 1, dimension
    length = m + n
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    return (m, n) if m <= n else (n, m)


@dataclass(frozen=True)
class LoKrLayout:
    """Shapes of one LoKr module: w1 [a, b], w2 [c, d]; `w1_rank` / `w2_rank` set when that half is factored."""

    a: int
    b: int
    c: int
    d: int
    rank: int
    w1_rank: int | None
    w2_rank: int | None

    @property
    def full(self) -> bool:
        return self.w1_rank is None and self.w2_rank is None


def lokr_layout(out_features: int, in_features: int, rank: int, *, factor: int = -1, decompose_both: bool = False,
                full_matrix: bool = False, unbalanced: bool = False) -> LoKrLayout:
    """The layout LyCORIS builds for a Linear with these settings (see the module docstring)."""
    a, c = factorization(out_features, factor)
    b, d = factorization(in_features, factor)
    if unbalanced:
        a, c = c, a
    w1_rank = rank if decompose_both and rank < max(a, b) / 2 and not full_matrix else None
    w2_rank = rank if rank < max(c, d) / 2 and not full_matrix else None
    return LoKrLayout(a, b, c, d, rank, w1_rank, w2_rank)


def layout_from_file(parts: Mapping[str, Tensor]) -> LoKrLayout:
    """The layout of a saved module (any mix of full and factored halves)."""
    if "lokr_w1" in parts:
        (a, b), w1_rank = parts["lokr_w1"].shape, None
    else:
        a, w1_rank = parts["lokr_w1_a"].shape
        b = parts["lokr_w1_b"].shape[1]
    if "lokr_w2" in parts:
        (c, d), w2_rank = parts["lokr_w2"].shape, None
    else:
        c, w2_rank = parts["lokr_w2_a"].shape
        d = parts["lokr_w2_b"].shape[1]
    rank = w2_rank if w2_rank is not None else (w1_rank if w1_rank is not None else 1)
    return LoKrLayout(int(a), int(b), int(c), int(d), int(rank), w1_rank and int(w1_rank), w2_rank and int(w2_rank))


class LoKrModule(Adapter):
    """LoKr adapter for one Linear (see the module docstring)."""

    algo = "lokr"

    def __init__(self, lora_name: str, base: nn.Linear, layout: LoKrLayout, *, alpha: float | None,
                 use_scalar: bool = False, rs_lora: bool = False, generator: torch.Generator | None = None, **common):
        super().__init__(lora_name, base, **common)
        lay = self.layout = layout
        if lay.a * lay.c != self.out_features or lay.b * lay.d != self.in_features:
            raise ValueError(f"{lora_name}: LoKr layout {lay} does not make a {self.out_features}x{self.in_features} weight")
        self.lora_dim = lay.rank
        if lay.w1_rank is None:
            self.lokr_w1 = new_parameter(lay.a, lay.b)
        else:
            self.lokr_w1_a, self.lokr_w1_b = new_parameter(lay.a, lay.w1_rank), new_parameter(lay.w1_rank, lay.b)
        if lay.w2_rank is None:
            self.lokr_w2 = new_parameter(lay.c, lay.d)
        else:
            self.lokr_w2_a, self.lokr_w2_b = new_parameter(lay.c, lay.w2_rank), new_parameter(lay.w2_rank, lay.d)
        self.factor_names = tuple(n for n in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
                                  if hasattr(self, n))
        self.scalar = nn.Parameter(torch.tensor(0.0)) if use_scalar else None
        self._init(generator, use_scalar)
        self.r_factor = math.sqrt(lay.rank) if rs_lora else float(lay.rank)
        value = float(alpha) if alpha else float(lay.rank)
        if lay.full:
            value = float(lay.rank)  # no factored half: scale 1, whatever alpha says (LyCORIS, loaders)
        self.register_buffer("alpha", torch.tensor(value * lay.rank / self.r_factor, dtype=torch.float32))
        self.scale = value / self.r_factor

    def _init(self, generator: torch.Generator | None, use_scalar: bool) -> None:
        def kaiming(p: Tensor) -> None:
            nn.init.kaiming_uniform_(p, a=math.sqrt(5), generator=generator)

        with torch.no_grad():
            for name in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a"):
                if hasattr(self, name):
                    kaiming(getattr(self, name))
            last = self.lokr_w2 if self.layout.w2_rank is None else self.lokr_w2_b
            kaiming(last) if use_scalar else nn.init.zeros_(last)

    def set_alpha(self, alpha: float) -> None:
        """A file's alpha sets the scale as every loader reads it: alpha / rank (1 when nothing is factored)."""
        value = alpha if alpha else float(self.layout.rank)
        self.alpha.fill_(value)
        self.scale = 1.0 if self.layout.full else value / self.layout.rank

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        # Resume loads the alpha buffer through load_state_dict; the cached scale must follow it.
        super()._load_from_state_dict(*args, **kwargs)
        self.scale = 1.0 if self.layout.full else float(self.alpha) / self.layout.rank

    # ---- maths ----------------------------------------------------------------------------------------------
    def _w1(self) -> Tensor:
        return self.lokr_w1 if self.layout.w1_rank is None else self.lokr_w1_a @ self.lokr_w1_b

    def _w2(self) -> Tensor:
        return self.lokr_w2 if self.layout.w2_rank is None else self.lokr_w2_a @ self.lokr_w2_b

    def _gain(self) -> Tensor | float:
        return self.scale if self.scalar is None else self.scalar * self.scale

    def raw_delta(self) -> Tensor:
        return torch.kron(self._w1().float(), self._w2().float()) * self._gain()

    def delta_output(self, x: Tensor) -> Tensor:
        lay = self.layout
        grouped = x.reshape(*x.shape[:-1], lay.b, lay.d)  # [..., b, d]
        if lay.w2_rank is None:
            h = grouped @ self.lokr_w2.T  # [..., b, c]
        else:
            h = (grouped @ self.lokr_w2_b.T) @ self.lokr_w2_a.T
        h = h.transpose(-1, -2) @ self._w1().T  # [..., c, a]
        return h.transpose(-1, -2).reshape(*x.shape[:-1], lay.a * lay.c) * self._gain()

    def dora_row_terms(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        """(⟨W_i, ΔW_i⟩, ‖ΔW_i‖²) for ΔW = g·w1 ⊗ w2: W viewed as [a, c, b, d] contracted with w1 and w2, and the
        Kronecker row norms ‖w1_i1‖²·‖w2_i2‖²."""
        lay = self.layout
        w1, w2 = self._w1(), self._w2()
        blocks = weight.reshape(lay.a, lay.c, lay.b, lay.d)
        cross = torch.einsum("acbd,ab->acd", blocks, w1.to(weight.dtype))
        cross = torch.einsum("acd,cd->ac", cross, w2.to(weight.dtype)).reshape(-1).float()
        rows = torch.outer(w1.float().square().sum(1), w2.float().square().sum(1)).reshape(-1)
        gain = self._gain()
        return cross * gain, rows * gain**2

    # ---- files and max-norm ------------------------------------------------------------------------------------
    @torch.no_grad()
    def file_tensors(self) -> dict[str, Tensor]:
        scalar = 1.0 if self.scalar is None else float(self.scalar)
        out = {"alpha": self.alpha.detach().to("cpu", copy=True), **self._dora_file()}
        for name in self.factor_names:
            value = getattr(self, name).detach().float()
            if name in ("lokr_w1", "lokr_w1_a"):
                value = value * scalar  # LyCORIS folds the scalar into the first factor
            out[name] = value.to("cpu", copy=True)
        return out

    @torch.no_grad()
    def load_file_tensors(self, parts: Mapping[str, Tensor]) -> None:
        super().load_file_tensors(parts)
        if self.scalar is not None:
            self.scalar.fill_(1.0)  # the file's w1 already carries it
        if "alpha" not in parts:
            self.set_alpha(float(self.layout.rank))

    @torch.no_grad()
    def scale_delta_(self, ratio: float) -> None:
        (self.lokr_w1 if self.layout.w1_rank is None else self.lokr_w1_a).mul_(ratio)

    @classmethod
    def from_file(cls, lora_name: str, base: nn.Linear, parts: Mapping[str, Tensor], **common) -> LoKrModule:
        """A module shaped like the saved one (weights not loaded)."""
        alpha = float(parts["alpha"].float()) if "alpha" in parts else None
        return cls(lora_name, base, layout_from_file(parts), alpha=alpha, dora="dora_scale" in parts,
                   wd_on_output=_dora_on_output(parts, base), **common)


def _dora_on_output(parts: Mapping[str, Tensor], base: nn.Linear) -> bool:
    """A saved `dora_scale` [out, 1] is per output row, [1, in] per input column (ComfyUI's rule too)."""
    scale = parts.get("dora_scale")
    return scale is None or scale.shape[0] == base.out_features
