"""ComfyUI's rules for LyCORIS files (`comfy/lora.py` `load_lora` + `comfy/weight_adapter/{lora,loha,lokr,base}.py`),
re-stated as pure functions (nothing of ComfyUI is imported), applied to every algorithm's saved file.

Key map: as for LoRA (`test_comfyui_rules.comfy_key_map`). Per module `x`, `load_lora` reads `x.alpha` (`.item()`)
and `x.dora_scale`, then asks each weight adapter in turn:
- LoRA: `x.lora_up.weight` + `x.lora_down.weight` (+ `lora_mid`); ΔW = alpha/down.shape[0] · up @ down;
- LoHa: `x.hada_w1_a` (+ `_b`, `hada_w2_a/_b`, `hada_t1/_t2`); ΔW = alpha/w1_b.shape[0] · (w1a@w1b) ⊙ (w2a@w2b);
- LoKr: any of `x.lokr_w1`, `lokr_w2`, `lokr_w1_a`, `lokr_w2_a` (+ `_b`, `lokr_t2`); w1 = lokr_w1 or w1_a@w1_b,
  w2 likewise; dim = the rank of the last factored half (w1 then w2); ΔW = (alpha/dim if alpha and dim else 1) ·
  kron(w1, w2);
then `x.diff` → a "diff" patch W += strength·diff, `x.diff_b` → the bias likewise. Without `dora_scale`:
W += strength · ΔW. With it, `weight_decompose`: V = W + ΔW; the norm is taken per output row of the **original** W
when `dora_scale.shape[0] == W.shape[0]`, else per input column of V; plus fp32 eps; V ·= dora_scale / norm;
W += strength · (V − W). Keys no adapter reads are logged "lora key not loaded" and skipped, so every key must map.

The output-axis branch normalising by ‖W‖ instead of ‖W + ΔW‖ is a ComfyUI bug (open PR #15458 "normalize
output-axis DoRA with adapted weights"); `fixed=True` applies that PR. LyCORIS' default `wd_on_output=True` is
therefore exact in ComfyUI only once the PR lands; `wd_on_output=False` is exact today (tests below).
"""

from __future__ import annotations

import pytest
import torch
from network_helpers import flux_inputs, small_flux, tiny_clip, tiny_t5
from test_comfyui_rules import comfy_clip_weights, comfy_key_map
from test_lycoris_reference import randomize_dora_

from fluxlora.network.lora import create_network
from fluxlora.network.saving import read_lora

EPS = torch.finfo(torch.float32).eps


def comfy_load(lora: dict[str, torch.Tensor], key_map: dict[str, str]) -> tuple[dict[str, tuple], set[str]]:
    """`load_lora`: target weight key → (adapter kind, tensors, alpha, dora_scale); and the keys it consumed."""
    patches, loaded = {}, set()
    for x, target in key_map.items():
        alpha = float(lora[f"{x}.alpha"].item()) if f"{x}.alpha" in lora else None
        loaded |= {f"{x}.alpha"} & lora.keys()
        dora = lora.get(f"{x}.dora_scale")
        loaded |= {f"{x}.dora_scale"} & lora.keys()
        if f"{x}.lora_up.weight" in lora:
            names = [f"{x}.lora_up.weight", f"{x}.lora_down.weight"]
            patches[target] = ("lora", [lora[n] for n in names], alpha, dora)
            loaded |= set(names)
        if f"{x}.hada_w1_a" in lora:
            names = [f"{x}.hada_w1_a", f"{x}.hada_w1_b", f"{x}.hada_w2_a", f"{x}.hada_w2_b"]
            patches[target] = ("loha", [lora[n] for n in names], alpha, dora)
            loaded |= set(names) | ({f"{x}.hada_t1", f"{x}.hada_t2"} & lora.keys())
        lokr = {s: lora.get(f"{x}.lokr_{s}") for s in ("w1", "w2", "w1_a", "w1_b", "w2_a", "w2_b", "t2")}
        loaded |= {f"{x}.lokr_{s}" for s, v in lokr.items() if v is not None}
        if any(lokr[s] is not None for s in ("w1", "w2", "w1_a", "w2_a")):
            patches[target] = ("lokr", lokr, alpha, dora)
        if f"{x}.diff" in lora:
            patches[target] = ("diff", [lora[f"{x}.diff"]], None, None)
            loaded.add(f"{x}.diff")
        if f"{x}.diff_b" in lora:
            patches[target[: -len(".weight")] + ".bias"] = ("diff", [lora[f"{x}.diff_b"]], None, None)
            loaded.add(f"{x}.diff_b")
    return patches, loaded


def comfy_delta(kind: str, tensors, alpha: float | None) -> tuple[torch.Tensor, float]:
    """(ΔW before alpha, the alpha factor) as each adapter's `calculate_weight` forms them."""
    if kind == "lora":
        up, down = (t.float() for t in tensors)
        return up @ down, (alpha / down.shape[0] if alpha is not None else 1.0)
    if kind == "loha":
        w1a, w1b, w2a, w2b = (t.float() for t in tensors)
        return (w1a @ w1b) * (w2a @ w2b), (alpha / w1b.shape[0] if alpha is not None else 1.0)
    dim = None
    w1, w2 = tensors["w1"], tensors["w2"]
    if w1 is None:
        dim = tensors["w1_b"].shape[0]
        w1 = tensors["w1_a"].float() @ tensors["w1_b"].float()
    if w2 is None:
        dim = tensors["w2_b"].shape[0]
        w2 = tensors["w2_a"].float() @ tensors["w2_b"].float()
    return torch.kron(w1.float(), w2.float()), (alpha / dim if alpha is not None and dim is not None else 1.0)


def weight_decompose(dora_scale, weight, lora_diff, alpha, strength, *, fixed: bool) -> torch.Tensor:
    lora_diff = lora_diff * alpha
    calc = weight + lora_diff
    if dora_scale.shape[0] == calc.shape[0]:  # output axis
        norm = (calc if fixed else weight).reshape(weight.shape[0], -1).norm(dim=1, keepdim=True)
    else:
        norm = calc.transpose(0, 1).reshape(calc.shape[1], -1).norm(dim=1, keepdim=True).transpose(0, 1)
    calc = calc * (dora_scale.float() / (norm + EPS))
    return weight + strength * (calc - weight) if strength != 1.0 else calc


def comfy_patch(weights: dict, patches: dict, strength: float, *, fixed: bool = False) -> dict:
    out = dict(weights)
    for target, (kind, tensors, alpha, dora) in patches.items():
        weight = weights[target].float()
        if kind == "diff":
            assert tensors[0].shape == weight.shape, target  # ComfyUI: "WEIGHT NOT MERGED" otherwise
            out[target] = weight + strength * tensors[0].float()
            continue
        diff, factor = comfy_delta(kind, tensors, alpha)
        diff = diff.reshape(weight.shape)
        out[target] = (weight_decompose(dora, weight, diff, factor, strength, fixed=fixed) if dora is not None
                       else weight + strength * factor * diff)
    return out


CASES = {
    "lokr": ["algo=lokr", "factor=4"],
    "lokr-decompose-both": ["algo=lokr", "factor=16", "decompose_both=True"],
    "lokr-t5": ["algo=lokr", "factor=4", "train_t5xxl=True"],
    "loha": ["algo=loha"],
    "locon": ["algo=locon"],
    "full": ["algo=full"],
    "dora-input-axis": ["algo=lora", "dora_wd=True", "wd_on_output=False"],
    "lokr-dora-input-axis": ["algo=lokr", "factor=4", "dora_wd=True", "wd_on_output=False"],
    "loha-dora": ["algo=loha", "dora_wd=True"],
    "dora": ["algo=lora", "dora_wd=True"],
}
OUTPUT_AXIS_DORA = ("loha-dora", "dora")


def _saved(case: str, tmp_path, strength: float):
    flux, clip = small_flux(), tiny_clip()
    t5 = tiny_t5() if "t5" in case else None
    weights = {"diffusion_model." + k: v.clone() for k, v in flux.state_dict().items()}
    clip_sd = {k: v.clone() for k, v in comfy_clip_weights(clip).items()}
    t5_sd = {"t5xxl.transformer." + k: v.clone() for k, v in t5.state_dict().items()} if t5 is not None else None
    weights |= clip_sd | (t5_sd or {})
    network = create_network(strength, 2, 1, flux, [clip, t5], network_args=CASES[case], network_module="lycoris.kohya")
    randomize_dora_(network)
    network.save(tmp_path / f"{case}.safetensors")
    lora, _ = read_lora(tmp_path / f"{case}.safetensors")
    return network, (flux, clip, t5), weights, lora, comfy_key_map({k[len("diffusion_model."):]: v for k, v in weights.items()
                                                                     if k.startswith("diffusion_model.")}, clip_sd, t5_sd)


@pytest.mark.parametrize("case", list(CASES))
def test_comfyui_consumes_every_key_and_patches_our_merge(case: str, tmp_path) -> None:
    strength = 0.8
    network, (flux, clip, t5), weights, lora, key_map = _saved(case, tmp_path, strength)
    patches, loaded = comfy_load(lora, key_map)
    assert sorted(set(lora) - loaded) == []  # nothing "lora key not loaded"
    assert len({k.split(".")[0] for k in lora}) == len(network.loras)
    assert any(k.startswith("lora_te1_text_model_") for k in lora)

    # fluxlora's merge into the same weights (multiplier = strength)
    network.apply_to()
    network.eval()
    with torch.no_grad():
        on_the_fly = flux(**flux_inputs())
    network.merge_into_base()
    ours = {"diffusion_model." + k: v for k, v in flux.state_dict().items()} | comfy_clip_weights(clip)
    if t5 is not None:
        ours |= {"t5xxl.transformer." + k: v for k, v in t5.state_dict().items()}
    patched = comfy_patch(weights, patches, strength, fixed=case in OUTPUT_AXIS_DORA)
    assert set(patches) <= set(ours)
    for target in patches:
        torch.testing.assert_close(ours[target].float(), patched[target], rtol=0, atol=1e-5, msg=target)
    # merged = on the fly (≤ 1e-5 fp32)
    with torch.no_grad():
        torch.testing.assert_close(flux(**flux_inputs()), on_the_fly, rtol=0, atol=1e-5)
    if case == "full":
        assert any(t.endswith(".bias") for t in patches)  # diff_b patches the bias


@pytest.mark.parametrize("case", OUTPUT_AXIS_DORA)
def test_comfyui_output_axis_dora_bug_is_what_the_warning_says(case: str, tmp_path) -> None:
    """Today's ComfyUI divides output-axis DoRA by ‖W‖ (not ‖W + ΔW‖): its weights differ from LyCORIS' and ours
    by exactly that ratio per row; with PR #15458 applied they are equal (previous test)."""
    network, _, weights, lora, key_map = _saved(case, tmp_path, 1.0)
    patches, _ = comfy_load(lora, key_map)
    today, fixed = comfy_patch(weights, patches, 1.0), comfy_patch(weights, patches, 1.0, fixed=True)
    target = next(t for t, p in patches.items() if p[3] is not None)
    kind, tensors, alpha, dora = patches[target]
    diff, factor = comfy_delta(kind, tensors, alpha)
    weight = weights[target].float()
    ratio = ((weight + factor * diff.reshape(weight.shape)).norm(dim=1, keepdim=True) + EPS) / (weight.norm(dim=1, keepdim=True) + EPS)
    assert not torch.allclose(today[target], fixed[target], rtol=0, atol=1e-5)
    torch.testing.assert_close(today[target], fixed[target] * ratio, rtol=1e-5, atol=1e-6)
