"""fluxlora's adapters against lycoris-lora 4.1.3 (the field's reference implementation), on the same small models.

For each algorithm and option: the keys we save are exactly the keys LyCORIS' `lycoris.kohya` network saves (CLIP
names modulo `text_model_`, see below), LyCORIS loads our file without a missing or unexpected key and writes it
back unchanged (same alpha convention), each module's weight change equals the one LyCORIS computes from the same
factors, and the whole model's output with our adapters equals the output with LyCORIS' (≤ 1e-5 in fp32).

On transformers 5 LyCORIS names CLIP modules `lora_te1_encoder_layers_…` (transformers dropped `text_model` from
module names); ComfyUI and diffusers only map `lora_te1_text_model_encoder_layers_…`, which we write (interop.md §5).
"""

from __future__ import annotations

import logging

import lycoris.kohya as lycoris_kohya
import pytest
import torch
from network_helpers import flux_inputs, randomize_lora_, small_flux, tiny_clip

from fluxlora.network.adapter import base_weight
from fluxlora.network.dora import magnitude_init
from fluxlora.network.lora import create_network

CASES = {
    "lokr": ["algo=lokr", "factor=4"],
    "lokr-auto-factor": ["algo=lokr"],
    "lokr-factor2": ["algo=lokr", "factor=2"],
    "lokr-decompose-both": ["algo=lokr", "factor=16", "decompose_both=True"],
    "lokr-full-matrix": ["algo=lokr", "factor=4", "full_matrix=True"],
    "lokr-unbalanced": ["algo=lokr", "factor=4", "unbalanced_factorization=True"],
    "lokr-scalar": ["algo=lokr", "factor=2", "use_scalar=True"],
    "lokr-rs": ["algo=lokr", "factor=2", "rs_lora=True"],
    "loha": ["algo=loha"],
    "loha-scalar-rs": ["algo=loha", "use_scalar=True", "rs_lora=True"],
    "locon": ["algo=locon"],
    "full": ["algo=full"],
    "dora": ["algo=lora", "dora_wd=True"],
    "dora-input-axis": ["algo=lora", "dora_wd=True", "wd_on_output=False"],
    "lokr-dora": ["algo=lokr", "factor=4", "dora_wd=True"],
    "loha-dora": ["algo=loha", "dora_wd=True"],
    "attn-only": ["algo=lokr", "factor=4", "preset=attn-only"],
}


def _lycoris_kwargs(args: list[str]) -> dict[str, str]:
    return dict(a.split("=", 1) for a in args)


def _clip_key(key: str) -> str:
    return key.replace("lora_te1_encoder_", "lora_te1_text_model_encoder_")


def _pair(case: str, dim: int = 2, alpha: float = 1.0):
    """(our network, its models), (LyCORIS network, its models): same base weights, same settings."""
    logging.getLogger("LyCORIS").setLevel(logging.ERROR)
    args = CASES[case]
    flux, clip = small_flux(), tiny_clip()
    ours = create_network(1.0, dim, alpha, flux, [clip, None], network_args=args, network_module="lycoris.kohya")
    ref_flux, ref_clip = small_flux(), tiny_clip()
    kwargs = _lycoris_kwargs(args)
    kwargs.setdefault("preset", "full")
    ref = lycoris_kohya.create_network(1.0, dim, alpha, None, [ref_clip], ref_flux, **kwargs)
    ref.apply_to([ref_clip], ref_flux, apply_text_encoder=True, apply_unet=True)
    return (ours, flux, clip), (ref, ref_flux, ref_clip)


@pytest.mark.parametrize("case", list(CASES))
def test_file_keys_alpha_and_deltas_equal_lycoris(case: str) -> None:
    (ours, flux, clip), (ref, ref_flux, ref_clip) = _pair(case)
    # Same keys and, before training, the same alpha values (buffers): the alpha/scale convention matches.
    saved = ours.state_dict_for_save()
    reference = {_clip_key(k): v for k, v in ref.state_dict().items()}
    assert set(saved) == set(reference)
    for key in (k for k in saved if k.endswith(".alpha")):
        assert float(saved[key]) == float(reference[key]), key

    randomize_dora_(ours)
    saved = ours.state_dict_for_save()
    missing, unexpected = ref.load_state_dict({k.replace("lora_te1_text_model_", "lora_te1_"): v for k, v in saved.items()},
                                              strict=False)
    assert not [m for m in missing if not m.endswith(".scalar")] and not unexpected
    written = {_clip_key(k): v for k, v in ref.state_dict().items()}
    for key, value in saved.items():
        # LyCORIS' full module keeps base + diff and writes (base + diff) − base: equal up to rounding
        atol = 1e-6 if case == "full" else 0.0
        torch.testing.assert_close(written[key].float(), value.float(), rtol=0, atol=atol, msg=key)

    # Module by module, the weight change LyCORIS computes from the same factors.
    by_name = {m.lora_name: m for m in ref.loras}
    for module in ours.loras:
        other = by_name[module.lora_name.replace("lora_te1_text_model_", "lora_te1_")]
        torch.testing.assert_close(module.delta_weight(1.0), _lycoris_delta(other), rtol=1e-5, atol=1e-6,
                                   msg=module.lora_name)

    # The whole model: our adapters on the fly = LyCORIS' on the fly.
    ours.apply_to()
    ours.eval(), ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(flux(**flux_inputs()), ref_flux(**flux_inputs()), rtol=0, atol=1e-5)
        ids = torch.tensor([[49406, 320, 1125, 539, 49407]])
        torch.testing.assert_close(clip(ids).last_hidden_state, ref_clip(ids).last_hidden_state, rtol=0, atol=1e-5)


@torch.no_grad()
def randomize_dora_(network, seed: int = 7) -> None:
    """Random factors, and DoRA magnitudes within ±10 % of the base norms (as trained ones are)."""
    randomize_lora_(network, std=0.1)
    g = torch.Generator().manual_seed(seed)
    for module in network.loras:
        if module.dora:
            init = magnitude_init(base_weight(module.base), on_output=module.wd_on_output)
            module.dora_scale.copy_(init * (1 + 0.1 * torch.randn(init.shape, generator=g)))


@torch.no_grad()
def _lycoris_delta(module) -> torch.Tensor:
    """W' − W as LyCORIS' rebuild forward forms it (its `get_diff_weight` scales LoKr/LoHa twice in 4.1.3)."""
    weight = module.org_module[0].weight.float() if module.name != "full" else module.org_weight.float()
    if module.name == "full":
        return module.get_diff_weight()[0].float()
    if module.name == "locon":
        delta = module.make_weight() * module.scale
    else:
        delta = module.get_weight(module.shape) * module.scalar
    if getattr(module, "wd", False):
        return module.apply_weight_decompose(weight + delta, 1.0) - weight
    return delta.float()


def test_preset_attn_only_selects_the_attention_projections() -> None:
    (ours, *_), (ref, *_) = _pair("attn-only")
    names = {m.lora_name for m in ours.loras}
    assert names == {_clip_key(m.lora_name) for m in ref.loras}
    assert names and all(("_attn_" in n or "self_attn" in n) for n in names)
    assert not any("single_blocks" in n or "mlp" in n for n in names)
