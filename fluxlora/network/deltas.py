"""The weight change a saved module defines, from its file tensors alone (pure functions, for tools that merge
without building a model): LoRA, LoKr, LoHa, full and DoRA, as loaders read them (ComfyUI's and LyCORIS' rules).

Scales: LoRA alpha/rank (missing or 0 → 1, sd-scripts); LoHa alpha/rank (missing → 1); LoKr alpha/rank when a half
is factored (missing alpha, or nothing factored → 1); full none. DoRA (a `dora_scale` key) needs the base weight:
W + s·(DoRA(W, ΔW) − W) at strength s (see `fluxlora.network.dora`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

from fluxlora.network.dora import dora_delta

#: Suffixes that only LyCORIS-style modules have (a plain kohya LoRA has none of them).
LYCORIS_SUFFIXES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "hada_w1_a",
                    "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "diff", "diff_b", "dora_scale")
ALGO_NAMES = {"lokr": "LoKr", "loha": "LoHa", "full": "full", "lora": "DoRA"}


def group_modules(sd: Mapping[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """`name.suffix` keys → {name: {suffix: tensor}} (suffix may contain dots, e.g. `lora_up.weight`)."""
    grouped: dict[str, dict[str, Tensor]] = {}
    for key, tensor in sd.items():
        name, _, suffix = key.partition(".")
        grouped.setdefault(name, {})[suffix] = tensor
    return grouped


def is_lycoris(parts: Iterable[str]) -> bool:
    """Whether a module's suffixes make it a LyCORIS-style module (LoKr, LoHa, full, or anything with DoRA)."""
    return any(s in LYCORIS_SUFFIXES for s in parts)


def algorithm(parts: Iterable[str]) -> str:
    """'lokr', 'loha', 'full' or 'lora' (DoRA included) from a module's suffixes."""
    parts = set(parts)
    if parts & {"lokr_w1", "lokr_w1_a", "lokr_w2", "lokr_w2_a"}:
        return "lokr"
    if "hada_w1_a" in parts:
        return "loha"
    if "diff" in parts or "diff_b" in parts:
        return "full"
    return "lora"


def _alpha(parts: Mapping[str, Tensor]) -> float | None:
    return float(parts["alpha"].float()) if "alpha" in parts else None


def raw_delta(parts: Mapping[str, Tensor]) -> Tensor:
    """ΔW [out, in] fp32 at strength 1, before DoRA."""
    algo, alpha = algorithm(parts), _alpha(parts)
    f = {k: v.float() for k, v in parts.items()}
    if algo == "lokr":
        dim = None
        w1 = f.get("lokr_w1")
        if w1 is None:
            dim, w1 = f["lokr_w1_b"].shape[0], f["lokr_w1_a"] @ f["lokr_w1_b"]
        w2 = f.get("lokr_w2")
        if w2 is None:
            dim, w2 = f["lokr_w2_b"].shape[0], f["lokr_w2_a"] @ f["lokr_w2_b"]
        return torch.kron(w1, w2) * (alpha / dim if alpha and dim is not None else 1.0)
    if algo == "loha":
        rank = f["hada_w1_b"].shape[0]
        return (f["hada_w1_a"] @ f["hada_w1_b"]) * (f["hada_w2_a"] @ f["hada_w2_b"]) * (alpha / rank if alpha else 1.0)
    if algo == "full":
        return f["diff"]
    down, up = f["lora_down.weight"], f["lora_up.weight"]
    return (up @ down) * (alpha / down.shape[0] if alpha else 1.0)


def module_delta(parts: Mapping[str, Tensor], weight: Tensor, strength: float = 1.0) -> tuple[Tensor, Tensor | None]:
    """(W' − W, b' − b or None) in fp32 for one module at `strength`, given the base weight W (used by DoRA)."""
    delta = raw_delta(parts)
    if "dora_scale" in parts:
        scale = parts["dora_scale"].float()
        delta = dora_delta(weight.float(), delta.to(weight.device), scale.to(weight.device),
                           on_output=scale.shape[0] == weight.shape[0])
    bias = parts["diff_b"].float() * strength if "diff_b" in parts else None
    return delta * strength, bias


def delta_shape(parts: Mapping[str, Tensor]) -> tuple[int, int]:
    """(out, in) of the weight a module changes, from its factors' shapes (nothing is multiplied)."""
    algo = algorithm(parts)
    if algo == "lokr":
        def half(n: str) -> tuple[int, int]:
            if f"lokr_{n}" in parts:
                return tuple(parts[f"lokr_{n}"].shape)  # type: ignore[return-value]
            return int(parts[f"lokr_{n}_a"].shape[0]), int(parts[f"lokr_{n}_b"].shape[1])
        (a, b), (c, d) = half("w1"), half("w2")
        return a * c, b * d
    if algo == "loha":
        return int(parts["hada_w1_a"].shape[0]), int(parts["hada_w1_b"].shape[1])
    if algo == "full":
        return int(parts["diff"].shape[0]), int(parts["diff"].shape[1])
    return int(parts["lora_up.weight"].shape[0]), int(parts["lora_down.weight"].shape[1])
