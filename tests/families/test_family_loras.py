"""LoRA files of each family: every key maps under ComfyUI's rules (interop.md §6) and ComfyUI's patch maths gives our
forward; diffusers' pipeline of the family (`ChromaPipeline`, `FluxKontextPipeline`, `FluxFillPipeline`) loads it
with `load_lora_weights` and its transformer then equals our model with the LoRA applied."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fluxlora.families import family_named
from fluxlora.families.chroma.diffusers_keys import bfl_to_diffusers as chroma_to_diffusers
from fluxlora.network.lora import create_network
from fluxlora.network.saving import read_lora


def _model(m, name: str):
    family = family_named(name)
    info = family.inspect(Path(getattr(m.families, name)), flag="")
    return family.load_transformer(info, dtype=torch.float32, device="cpu").eval()


def _inputs(model, name: str):
    p = model.params
    g = torch.Generator().manual_seed(1)
    ids = torch.zeros(1, 6, 3)
    ids[0, :, 1], ids[0, :, 2] = torch.arange(6) // 3, torch.arange(6) % 3
    x = {"img": torch.randn(1, 6, p.in_channels, generator=g), "img_ids": ids,
         "txt": torch.randn(1, 4, p.context_in_dim, generator=g), "txt_ids": torch.zeros(1, 4, 3),
         "timesteps": torch.tensor([0.6])}
    if name != "chroma":
        x.update(y=torch.randn(1, p.vec_in_dim, generator=g), guidance=torch.tensor([3.5]))
    return x


def _ours(model, x, name):
    if name == "chroma":
        return model(x["img"], x["img_ids"], x["txt"], x["txt_ids"], x["timesteps"])
    return model(x["img"], x["img_ids"], x["txt"], x["txt_ids"], x["timesteps"], x["y"], x["guidance"])


def _theirs(model, x, name):
    kwargs = dict(hidden_states=x["img"], encoder_hidden_states=x["txt"], timestep=x["timesteps"],
                  img_ids=x["img_ids"][0], txt_ids=x["txt_ids"][0], return_dict=False)
    if name != "chroma":
        kwargs.update(pooled_projections=x["y"], guidance=x["guidance"])
    return model(**kwargs)[0]


def _lora(model, tmp_path: Path, name: str) -> Path:
    network = create_network(1.0, 4, 2.0, model, [None, None])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in sorted(network.parameters(), key=lambda t: t.shape):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    path = tmp_path / f"{name}.safetensors"
    network.save(path)
    return path


@pytest.mark.parametrize("name", ["chroma", "kontext", "fill"])
def test_comfyui_rules_map_every_key_and_patch_like_our_forward(family_models, tmp_path, name) -> None:
    model = _model(family_models, name)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    lora, _ = read_lora(_lora(model, tmp_path, name))
    key_map = {"lora_unet_" + k[: -len(".weight")].replace(".", "_"): k for k in weights if k.endswith(".weight")}
    modules = {k.rsplit(".", 2)[0] for k in lora}
    assert modules and modules <= set(key_map)  # nothing ComfyUI would skip ("lora key not loaded")
    patched = dict(weights)
    for module in modules:
        down, up, alpha = (lora[f"{module}.{s}"] for s in ("lora_down.weight", "lora_up.weight", "alpha"))
        patched[key_map[module]] = weights[key_map[module]] + float(alpha) / down.shape[0] * (up @ down)
    x = _inputs(model, name)
    reference = _model(family_models, name)
    reference.load_state_dict(patched)
    network = create_network(1.0, 4, 2.0, model, [None, None])
    network.load_lora_state_dict(lora)
    network.apply_to(model, [None, None])
    with torch.no_grad():
        torch.testing.assert_close(_ours(model, x, name), _ours(reference, x, name), rtol=0, atol=1e-5)


PIPELINES = {"chroma": "ChromaPipeline", "kontext": "FluxKontextPipeline", "fill": "FluxFillPipeline"}


@pytest.mark.parametrize("name", ["chroma", "kontext", "fill"])
def test_diffusers_pipeline_load_lora_weights(helpers, family_models, tmp_path, name) -> None:
    import diffusers

    m = family_models
    model = _model(m, name)
    # diffusers' kohya converter hard-codes width 3072 for single-block linear1 (interop.md §4): left out here
    lora, _ = read_lora(_lora(model, tmp_path, name))
    lora = {k: v for k, v in lora.items() if "_linear1." not in k}
    if name == "chroma":
        from diffusers import ChromaTransformer2DModel

        p = model.params
        transformer = ChromaTransformer2DModel(
            in_channels=p.in_channels, num_layers=p.depth, num_single_layers=p.depth_single_blocks,
            attention_head_dim=p.head_dim, num_attention_heads=p.num_heads, joint_attention_dim=p.context_in_dim,
            axes_dims_rope=p.axes_dim, approximator_hidden_dim=p.approximator_hidden_size,
            approximator_layers=p.approximator_depth)
        transformer.load_state_dict(chroma_to_diffusers(model.state_dict()))
        for norm in transformer.distilled_guidance_layer.norms:
            norm.eps = 1e-6
        parts = helpers.pipeline_components(m)
        pipe = diffusers.ChromaPipeline(scheduler=parts["scheduler"], vae=parts["vae"], text_encoder=m.t5,
                                        tokenizer=m.tokenizers.t5, transformer=transformer.eval())
    else:
        pipe = getattr(diffusers, PIPELINES[name])(transformer=helpers.diffusers_flux_from(model),
                                                   **helpers.pipeline_components(m))
    x = _inputs(model, name)
    with torch.no_grad():
        before = _theirs(pipe.transformer, x, name)
        pipe.load_lora_weights({k: v.clone() for k, v in lora.items()}, adapter_name="ours")
        after = _theirs(pipe.transformer, x, name)
        network = create_network(1.0, 4, 2.0, model, [None, None])
        network.load_lora_state_dict(lora)
        network.apply_to(model, [None, None])
        ours = _ours(model, x, name)
    assert float((after - before).abs().max()) > 1e-3
    torch.testing.assert_close(after, ours, rtol=0, atol=1e-5)
