"""Trainable parameters and file bytes of an adapter network, from layer shapes alone (pure arithmetic: the planner
counts optimizer memory with it, the docs' size table comes from it, nothing is built).

`flux_block_linears` lists the (out, in) of every DiT block Linear the default targets hold (304 on FLUX.1: per
double block 2 × mod, qkv, proj, mlp.0, mlp.2; per single block linear1, linear2, modulation), all with a bias.
"""

from __future__ import annotations

from collections.abc import Iterable

from fluxlora.config.adapter_args import AdapterSpec
from fluxlora.models.flux import FluxParams
from fluxlora.network.lokr import lokr_layout

#: bytes of a safetensors header entry per tensor (key, dtype, shape, offsets), measured on saved FLUX adapters
HEADER_BYTES_PER_TENSOR = 110


def flux_block_linears(p: FluxParams) -> list[tuple[int, int]]:
    """(out, in) of each Linear in the double and single blocks, in module order."""
    h, m = p.hidden_size, p.mlp_hidden_dim
    stream = [(6 * h, h), (3 * h, h), (h, h), (m, h), (h, m)]  # mod.lin, attn.qkv, attn.proj, mlp.0, mlp.2
    single = [(3 * h + m, h), (h, h + m), (3 * h, h)]  # linear1, linear2, modulation.lin
    return stream * (2 * p.depth) + single * p.depth_single_blocks


def module_tensors(out: int, inp: int, spec: AdapterSpec, rank: int, *, bias: bool = True) -> dict[str, int]:
    """Element count of each tensor one module saves (the trainable ones plus the 1-element alpha)."""
    if spec.algo == "full":
        return {"diff": out * inp, **({"diff_b": out} if bias else {})}
    sizes: dict[str, int] = {"alpha": 1}
    if spec.algo == "lokr":
        lay = lokr_layout(out, inp, rank, factor=spec.factor, decompose_both=spec.decompose_both,
                          full_matrix=spec.full_matrix, unbalanced=spec.unbalanced_factorization)
        if lay.w1_rank is None:
            sizes["lokr_w1"] = lay.a * lay.b
        else:
            sizes |= {"lokr_w1_a": lay.a * lay.w1_rank, "lokr_w1_b": lay.w1_rank * lay.b}
        if lay.w2_rank is None:
            sizes["lokr_w2"] = lay.c * lay.d
        else:
            sizes |= {"lokr_w2_a": lay.c * lay.w2_rank, "lokr_w2_b": lay.w2_rank * lay.d}
    elif spec.algo == "loha":
        sizes |= {"hada_w1_a": out * rank, "hada_w1_b": rank * inp, "hada_w2_a": out * rank, "hada_w2_b": rank * inp}
    else:
        sizes |= {"lora_down.weight": rank * inp, "lora_up.weight": out * rank}
    if spec.dora_wd:
        sizes["dora_scale"] = out if spec.wd_on_output else inp
    return sizes


def adapter_params(linears: Iterable[tuple[int, int]], spec: AdapterSpec, rank: int) -> int:
    """Trainable parameters of the network over `linears` (alpha is a buffer; `use_scalar` adds one per module)."""
    total = 0
    for out, inp in linears:
        sizes = module_tensors(out, inp, spec, rank)
        total += sum(n for k, n in sizes.items() if k != "alpha") + (1 if spec.use_scalar else 0)
    return total


def adapter_file_bytes(linears: Iterable[tuple[int, int]], spec: AdapterSpec, rank: int, dtype_bytes: int = 2) -> int:
    """Approximate `.safetensors` size at `--save_precision` of `dtype_bytes` (every tensor, alpha included, is
    saved in that dtype), plus the header's per-tensor entries (metadata left out)."""
    total = 0
    for out, inp in linears:
        sizes = module_tensors(out, inp, spec, rank)
        total += sum(sizes.values()) * dtype_bytes + HEADER_BYTES_PER_TENSOR * len(sizes)
    return total


def adapter_params_for(spec: AdapterSpec, params: object, rank: int) -> int | None:
    """The planner's count for a LoKr / LoHa / full / DoRA network on a FLUX.1-shaped model; None for plain LoRA
    (the family's `lora_params_per_rank` covers it) and for models whose Linear shapes are not FLUX.1's."""
    if spec.plain_lora or type(params) is not FluxParams:
        return None
    return adapter_params(flux_block_linears(params), spec, rank)
