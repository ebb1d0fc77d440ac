"""diffusers (with peft) as a real client of the LoRA files the network saves (interop.md §4).

Reference for every comparison: a hand merge `W += multiplier · alpha/rank · up @ down` of the saved tensors into the
BFL weights, converted to diffusers' layout. diffusers hard-codes width 3072 for single-block `linear1`, so the tiny
model leaves `linear1` out (a `network_reg_dims` rank of 0) and one slow test checks it at width 3072.
"""

from __future__ import annotations

import peft  # noqa: F401  # diffusers' LoRA loading needs its PEFT backend (a test dependency: missing = failure)
import pytest
import torch
from network_helpers import SMALL, flux_inputs, randomize_lora_, small_flux, tiny_clip

from fluxlora.models.diffusers_keys import bfl_to_diffusers
from fluxlora.models.flux import Flux, FluxParams
from fluxlora.network.lora import create_network
from fluxlora.network.saving import read_lora

NO_LINEAR1 = r"network_reg_dims=single_blocks_\d+_linear1=0"


def diffusers_transformer(params: FluxParams, state_dict: dict):
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):  # no random init: every weight is assigned below
        model = FluxTransformer2DModel(
            patch_size=1, in_channels=params.in_channels, num_layers=params.depth, num_single_layers=params.depth_single_blocks,
            attention_head_dim=params.head_dim, num_attention_heads=params.num_heads,
            joint_attention_dim=params.context_in_dim, pooled_projection_dim=params.vec_in_dim,
            guidance_embeds=params.guidance_embed, axes_dims_rope=params.axes_dim)
    model.load_state_dict({k: v.clone() for k, v in bfl_to_diffusers(state_dict).items()}, strict=True, assign=True)
    return model.eval()


def diffusers_forward(model, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(hidden_states=inputs["img"], encoder_hidden_states=inputs["txt"], pooled_projections=inputs["y"],
                     timestep=inputs["timesteps"], img_ids=inputs["img_ids"][0], txt_ids=inputs["txt_ids"][0],
                     guidance=inputs["guidance"] if model.config.guidance_embeds else None, return_dict=False)[0]


def merged_bfl(state_dict: dict, lora: dict, multiplier: float = 1.0) -> dict:
    """Hand merge into BFL weights: module `lora_unet_<key with _>` patches `<key>.weight`."""
    out = {k: v.clone() for k, v in state_dict.items()}
    for key in state_dict:
        name = "lora_unet_" + key[: -len(".weight")].replace(".", "_")
        if key.endswith(".weight") and f"{name}.lora_down.weight" in lora:
            down, up = lora[f"{name}.lora_down.weight"].float(), lora[f"{name}.lora_up.weight"].float()
            out[key] += multiplier * float(lora[f"{name}.alpha"]) / down.shape[0] * (up @ down)
    return out


@pytest.mark.parametrize("split", [False, True])
def test_lora_state_dict_and_load_lora_adapter_match_the_hand_merge(split: bool, tmp_path) -> None:
    from diffusers import FluxPipeline

    flux = small_flux()
    base_sd = {k: v.clone() for k, v in flux.state_dict().items()}
    network = create_network(1.0, 4, 2, flux, [], network_args=[NO_LINEAR1] + (["split_qkv=True"] if split else []))
    randomize_lora_(network, std=0.3)
    path = tmp_path / "lora.safetensors"
    network.save(path)
    lora, _ = read_lora(path)

    inputs = flux_inputs()
    reference = diffusers_forward(diffusers_transformer(SMALL, merged_bfl(base_sd, lora)), inputs)
    transformer = diffusers_transformer(SMALL, base_sd)
    base_out = diffusers_forward(transformer, inputs)
    converted = FluxPipeline.lora_state_dict({k: v.clone() for k, v in lora.items()})
    converted = converted[0] if isinstance(converted, tuple) else converted
    transformer.load_lora_adapter(converted, prefix="transformer", adapter_name="ours")
    loaded = diffusers_forward(transformer, inputs)
    assert (reference - base_out).abs().max() > 1e-2
    torch.testing.assert_close(loaded, reference, rtol=0, atol=1e-5)

    network.apply_to(flux, [])
    network.eval()
    with torch.no_grad():  # our forward with the network attached gives the same numbers
        torch.testing.assert_close(flux(**inputs), reference, rtol=0, atol=1e-5)


def test_load_lora_weights_on_a_tiny_pipeline_patches_transformer_and_clip(tmp_path, tokenizers_dir) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

    flux, clip = small_flux(), tiny_clip()
    base_sd = {k: v.clone() for k, v in flux.state_dict().items()}
    clip_base = {k: v.clone() for k, v in clip.state_dict().items()}
    network = create_network(0.9, 4, 3, flux, [clip, None], network_args=[NO_LINEAR1])
    randomize_lora_(network, std=0.3)
    path = tmp_path / "lora.safetensors"
    network.save(path)
    lora, _ = read_lora(path)
    assert any(k.startswith("lora_te1_text_model_encoder_layers_") for k in lora)

    t5 = T5EncoderModel(T5Config(vocab_size=32128, d_model=SMALL.context_in_dim, d_kv=8, d_ff=32, num_layers=1,
                                 num_heads=3, feed_forward_proj="gated-gelu", is_encoder_decoder=False)).eval()
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=tiny_clip(),
        tokenizer=CLIPTokenizer.from_pretrained(tokenizers_dir / "clip_l"), text_encoder_2=t5,
        tokenizer_2=T5TokenizerFast.from_pretrained(tokenizers_dir / "t5xxl"),
        transformer=diffusers_transformer(SMALL, base_sd))
    pipe.text_encoder.load_state_dict(clip_base)
    pipe.load_lora_weights(str(path), adapter_name="ours")
    pipe.set_adapters(["ours"], adapter_weights=[0.9])  # diffusers' strength = our --network_multiplier

    inputs = flux_inputs()
    reference = diffusers_forward(diffusers_transformer(SMALL, merged_bfl(base_sd, lora, 0.9)), inputs)
    torch.testing.assert_close(diffusers_forward(pipe.transformer, inputs), reference, rtol=0, atol=1e-5)

    # CLIP-L: diffusers' text encoder with the LoRA equals a hand merge of the lora_te1_ modules.
    ref_clip = tiny_clip()
    ref_clip.load_state_dict(clip_base)
    with torch.no_grad():
        for key, module in ref_clip.named_modules():
            dotted = key if key.startswith("text_model.") else "text_model." + key
            name = "lora_te1_" + dotted.replace(".", "_")
            if f"{name}.lora_down.weight" in lora:
                down, up = lora[f"{name}.lora_down.weight"], lora[f"{name}.lora_up.weight"]
                module.weight += 0.9 * float(lora[f"{name}.alpha"]) / down.shape[0] * (up @ down)
        ids = pipe.tokenizer(["a photo of a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
        got = pipe.text_encoder(ids).pooler_output
        want = ref_clip(ids).pooler_output
        assert (want - tiny_clip()(ids).pooler_output).abs().max() > 1e-3
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_single_block_linear1_through_diffusers_at_width_3072(tmp_path) -> None:
    """diffusers splits `linear1` as [3072, 3072, 3072, 12288]: one single block at the real width (interop.md §4)."""
    params = FluxParams(in_channels=16, vec_in_dim=32, context_in_dim=64, hidden_size=3072, num_heads=24, depth=0,
                        depth_single_blocks=1, axes_dim=(16, 56, 56), guidance_embed=False)
    flux = Flux(params).eval()
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for _, p in sorted(flux.named_parameters(), key=lambda kv: kv[0]):
            p.normal_(0.0, 0.02 if p.ndim >= 2 else 0.05, generator=g)
    base_sd = {k: v.clone() for k, v in flux.state_dict().items()}
    network = create_network(1.0, 4, 2, flux, [], network_args=["split_qkv=True"])
    randomize_lora_(network, std=0.05)
    path = tmp_path / "wide.safetensors"
    network.save(path)
    lora, _ = read_lora(path)
    assert lora["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape == (21504, 16)

    from diffusers import FluxPipeline

    inputs = flux_inputs(params, batch=1)
    reference_model = diffusers_transformer(params, merged_bfl(base_sd, lora))
    reference = diffusers_forward(reference_model, inputs)
    del reference_model
    transformer = diffusers_transformer(params, base_sd)
    del base_sd
    assert (diffusers_forward(transformer, inputs) - reference).abs().max() > 1e-3  # the LoRA matters
    converted = FluxPipeline.lora_state_dict({k: v.clone() for k, v in lora.items()})
    converted = converted[0] if isinstance(converted, tuple) else converted
    transformer.load_lora_adapter(converted, prefix="transformer", adapter_name="wide")
    torch.testing.assert_close(diffusers_forward(transformer, inputs), reference, rtol=0, atol=1e-5)
