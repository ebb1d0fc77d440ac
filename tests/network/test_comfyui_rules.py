"""ComfyUI's key rules (interop.md §6) applied to every key of files the network saves.

The rules are re-stated here as a pure function (nothing of ComfyUI is imported): `lora_unet_<BFL key, . → _>` maps to
`diffusion_model.<BFL key>.weight` for every model weight; `lora_te1_text_model_encoder_layers_{b}_{…}` to CLIP-L's
`clip_l.transformer.text_model.encoder.layers.{b}.{…}.weight`; `lora_te3_<T5 key>` to `t5xxl.transformer.<key>.weight`.
Each module needs `.lora_up.weight` [out, r] and `.lora_down.weight` [r, in]; `.alpha` is an optional scalar; the patch
is `W += strength · alpha/rank · up @ down` (factor 1 without alpha, 0 when alpha is 0). Unmapped keys are skipped with
a log line in ComfyUI, so the test requires that **every** key maps.
"""

from __future__ import annotations

import copy

import pytest
import torch
from network_helpers import flux_inputs, randomize_lora_, small_flux, tiny_clip, tiny_t5

from fluxlora.network.lora import create_network
from fluxlora.network.saving import read_lora

CLIP_MAP = {"mlp.fc1": "mlp_fc1", "mlp.fc2": "mlp_fc2", "self_attn.k_proj": "self_attn_k_proj",
            "self_attn.q_proj": "self_attn_q_proj", "self_attn.v_proj": "self_attn_v_proj",
            "self_attn.out_proj": "self_attn_out_proj"}


def comfy_key_map(flux_sd: dict, clip_sd: dict | None, t5_sd: dict | None) -> dict[str, str]:
    """LoRA module name → ComfyUI weight key, built from the model weights as ComfyUI builds it."""
    out = {}
    for key in flux_sd:
        if key.endswith(".weight"):
            out["lora_unet_" + key[: -len(".weight")].replace(".", "_")] = "diffusion_model." + key
    if clip_sd is not None:
        for b in range(32):
            for module, lora in CLIP_MAP.items():
                key = f"clip_l.transformer.text_model.encoder.layers.{b}.{module}.weight"
                if key in clip_sd:
                    out[f"lora_te1_text_model_encoder_layers_{b}_{lora}"] = key
    if t5_sd is not None:
        for key in t5_sd:
            if key.startswith("t5xxl.transformer.") and key.endswith(".weight"):
                out["lora_te3_" + key[len("t5xxl.transformer."): -len(".weight")].replace(".", "_")] = key
    return out


def comfy_problems(lora: dict[str, torch.Tensor], weights: dict[str, torch.Tensor], key_map: dict[str, str]) -> list[str]:
    """Every reason ComfyUI would skip or reject part of `lora` (empty list = loads completely)."""
    problems, used = [], set()
    for name, target in key_map.items():
        up, down = lora.get(f"{name}.lora_up.weight"), lora.get(f"{name}.lora_down.weight")
        if up is None and down is None:
            continue
        used |= {f"{name}.lora_up.weight", f"{name}.lora_down.weight", f"{name}.alpha"}
        if up is None or down is None:
            problems.append(f"{name}: needs both lora_up and lora_down")
            continue
        if up.shape[1] != down.shape[0] or (up.shape[0], down.shape[1]) != tuple(weights[target].shape):
            problems.append(f"{name}: up {list(up.shape)} @ down {list(down.shape)} does not fit {list(weights[target].shape)}")
        alpha = lora.get(f"{name}.alpha")
        if alpha is not None and (alpha.numel() != 1 or float(alpha) == 0.0):
            problems.append(f"{name}: alpha must be a non-zero scalar (ComfyUI reads 0 as scale 0)")
    problems += [f"{key}: lora key not loaded" for key in lora if key not in used]
    return problems


def comfy_patch(weights: dict[str, torch.Tensor], lora: dict, key_map: dict[str, str], strength: float) -> dict:
    out = dict(weights)
    for name, target in key_map.items():
        if f"{name}.lora_down.weight" in lora:
            down, up = lora[f"{name}.lora_down.weight"].float(), lora[f"{name}.lora_up.weight"].float()
            alpha = float(lora[f"{name}.alpha"]) / down.shape[0] if f"{name}.alpha" in lora else 1.0
            out[target] = weights[target] + strength * alpha * (up @ down).reshape(weights[target].shape)
    return out


def comfy_clip_weights(clip) -> dict:
    # clip_l.safetensors layout always has text_model.* (transformers 5 dropped it from module names)
    return {"clip_l.transformer." + (k if k.startswith("text_model.") else "text_model." + k): v
            for k, v in clip.state_dict().items()}


CASES = {
    "default": ([], False, False),
    "in_dims": (["in_dims=[4,2,2,2,4]"], False, False),
    "split_qkv": (["split_qkv=True"], False, False),
    "clip_l": ([], True, False),
    "t5": (["train_t5xxl=True"], True, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_saved_key_maps_under_comfyui_rules(case: str, tmp_path) -> None:
    args, with_clip, with_t5 = CASES[case]
    flux = small_flux()
    clip, t5 = (tiny_clip() if with_clip else None), (tiny_t5() if with_t5 else None)
    flux_sd = {k: v.clone() for k, v in flux.state_dict().items()}
    network = create_network(0.8, 4, 2, flux, [clip, t5], network_args=args,
                             train_text_encoder=with_clip)
    randomize_lora_(network)
    path = tmp_path / f"{case}.safetensors"
    network.save(path)
    lora, _ = read_lora(path)

    clip_sd = comfy_clip_weights(clip) if clip is not None else None
    t5_sd = {"t5xxl.transformer." + k: v for k, v in t5.state_dict().items()} if t5 is not None else None
    weights = {**{"diffusion_model." + k: v for k, v in flux_sd.items()}, **(clip_sd or {}), **(t5_sd or {})}
    key_map = comfy_key_map(flux_sd, clip_sd, t5_sd)
    assert comfy_problems(lora, weights, key_map) == []
    prefixes = {k.split("_")[1] for k in lora}
    assert prefixes == ({"unet"} | ({"te1"} if with_clip else set()) | ({"te3"} if with_t5 else set()))
    if case == "in_dims":
        assert "lora_unet_img_in.lora_down.weight" in lora and "lora_unet_guidance_in_out_layer.alpha" in lora

    # ComfyUI's patch maths on the DiT gives our forward with the network attached.
    patched = comfy_patch(weights, lora, key_map, 0.8)
    reference = small_flux()
    reference.load_state_dict({k[len("diffusion_model."):]: v for k, v in patched.items() if k.startswith("diffusion_model.")})
    network.apply_to(flux, [clip, t5])
    network.eval()
    with torch.no_grad():
        torch.testing.assert_close(flux(**flux_inputs()), reference(**flux_inputs()), rtol=0, atol=1e-5)


def test_rule_checker_catches_bad_files() -> None:
    flux_sd = small_flux().state_dict()
    weights = {"diffusion_model." + k: v for k, v in flux_sd.items()}
    key_map = comfy_key_map(flux_sd, None, None)
    good = {"lora_unet_img_in.lora_down.weight": torch.zeros(2, 16), "lora_unet_img_in.lora_up.weight": torch.zeros(32, 2)}
    assert comfy_problems(good, weights, key_map) == []
    assert comfy_problems({**good, "lora_unet_img_in.alpha": torch.tensor(0.0)}, weights, key_map)
    assert comfy_problems({**good, "lora_unet.double_blocks.0.x.lora_up.weight": torch.zeros(1)}, weights, key_map)
    wrong = copy.copy(good)
    wrong["lora_unet_img_in.lora_down.weight"] = torch.zeros(2, 17)
    assert comfy_problems(wrong, weights, key_map)
