"""sd-scripts' Chroma command line (docs/flux_train_network.md, "Training Chroma Models") verbatim against tiny
files with its file names: it trains, saves a Chroma LoRA that ComfyUI's key rules and diffusers load, and samples
with the docs' prompt line (true CFG, negative prompt, `--g 0`)."""

from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from fluxlora.families.chroma.diffusers_keys import bfl_to_diffusers
from fluxlora.families.chroma.model import Chroma
from fluxlora.families.tiny import random_model, tiny_chroma_params
from fluxlora.files import save_safetensors
from fluxlora.training.cli import train

# The docs' Chroma command; its "..." is the basic command's remaining flags (without --clip_l).
CHROMA_FLAGS = [
    "--model_type=chroma", "--guidance_scale=0.0", "--timestep_sampling=sigmoid", "--apply_t5_attn_mask",
    "--save_model_as=safetensors", "--network_module=networks.lora_flux", "--network_dim=16", "--network_alpha=1",
    "--learning_rate=1e-4", "--optimizer_type=AdamW8bit", "--lr_scheduler=constant", "--sdpa", "--max_train_epochs=10",
    "--save_every_n_epochs=1", "--mixed_precision=fp16", "--gradient_checkpointing", "--model_prediction_type=raw",
    "--blocks_to_swap=18", "--cache_text_encoder_outputs", "--cache_latents",
]
DOCS_PROMPT = ("Japanese shrine in the summer forest. --n low quality, ugly, unfinished, out of focus, deformed, "
               "disfigure, blurry, smudged, restricted palette, flat colors --w 512 --h 512 --d 1 --l 4.0 --g 0.0 --s 20")


@pytest.mark.slow
def test_sd_scripts_chroma_command_runs_verbatim(helpers, tiny_ckpts, tmp_path, monkeypatch) -> None:
    models = tmp_path / "models"
    models.mkdir()
    shutil.copyfile(tiny_ckpts.t5xxl, models / "t5xxl.safetensors")
    shutil.copyfile(tiny_ckpts.ae, models / "ae.safetensors")
    # --blocks_to_swap=18 needs blocks left on the device: a tiny-width Chroma with 11 + 20 blocks
    deep = dataclasses.replace(tiny_chroma_params(), depth=11, depth_single_blocks=20)
    save_safetensors(models / "Chroma.safetensors",
                     random_model(Chroma, deep, torch.Generator().manual_seed(0)).state_dict())
    images = helpers.write_images(tmp_path / "images", count=2)
    (tmp_path / "my_flux_dataset_config.toml").write_text(
        f'[general]\ncaption_extension = ".txt"\n[[datasets]]\nbatch_size = 2\nresolution = [64, 64]\n'
        f'  [[datasets.subsets]]\n  image_dir = "{images.as_posix()}"\n', encoding="utf-8")
    small = DOCS_PROMPT.replace("--w 512 --h 512", "--w 64 --h 64").replace("--s 20", "--s 4")  # tiny and quick
    (tmp_path / "prompts.txt").write_text(small + "\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    argv = [
        f"--pretrained_model_name_or_path={models / 'Chroma.safetensors'}", f"--t5xxl={models / 't5xxl.safetensors'}",
        f"--ae={models / 'ae.safetensors'}", "--dataset_config=my_flux_dataset_config.toml", "--output_dir=output",
        "--output_name=my_chroma_lora", *CHROMA_FLAGS, "--sample_prompts=prompts.txt", "--sample_every_n_epochs=10",
    ]
    result = train(argv)
    out = tmp_path / "output"
    assert result.global_step == 10
    lora_path = out / "my_chroma_lora.safetensors"
    with safe_open(str(lora_path), "pt") as f:
        meta = f.metadata()
    assert meta["modelspec.architecture"] == "chroma/lora" and meta["ss_base_model_version"] == "chroma"
    assert meta["modelspec.implementation"] == "https://huggingface.co/lodestones/Chroma"
    lora = load_file(str(lora_path))
    modules = {k.rsplit(".", 2)[0] for k in lora}
    assert len(modules) == 11 * 8 + 20 * 2  # every block Linear of Chroma (no modulation linears to target)
    assert not any("_mod_" in m or "modulation" in m for m in modules)
    samples = list((out / "sample").glob("my_chroma_lora_e000010_00_*.png"))
    assert len(samples) == 1

    # ComfyUI's rule maps every key onto the model's own weights (interop.md §6)
    model_sd = load_file(str(models / "Chroma.safetensors"))
    comfy = {"lora_unet_" + k[: -len(".weight")].replace(".", "_"): k for k in model_sd if k.endswith(".weight")}
    assert all(m in comfy for m in modules)
    for m in modules:
        up, down = lora[f"{m}.lora_up.weight"], lora[f"{m}.lora_down.weight"]
        assert (up.shape[0], down.shape[1]) == tuple(model_sd[comfy[m]].shape)

    # diffusers converts it and its Chroma transformer takes it (single-block linear1 is hard-coded to width 3072 in
    # diffusers' converter, interop.md §4: left out here, covered at width 3072 in tests/network)
    from diffusers import ChromaPipeline, ChromaTransformer2DModel

    tensors = {k: (v * 50 if k.endswith("lora_up.weight") else v) for k, v in lora.items() if "_linear1." not in k}
    converted = ChromaPipeline.lora_state_dict({k: v.clone() for k, v in tensors.items()})
    converted = converted[0] if isinstance(converted, tuple) else converted
    theirs = ChromaTransformer2DModel(
        in_channels=64, num_layers=deep.depth, num_single_layers=deep.depth_single_blocks,
        attention_head_dim=deep.head_dim, num_attention_heads=deep.num_heads, joint_attention_dim=deep.context_in_dim,
        axes_dims_rope=deep.axes_dim, approximator_hidden_dim=deep.approximator_hidden_size,
        approximator_layers=deep.approximator_depth)
    theirs.load_state_dict(bfl_to_diffusers(model_sd), strict=True)
    theirs.eval()
    g = torch.Generator().manual_seed(0)
    x = dict(hidden_states=torch.randn(1, 4, 64, generator=g), encoder_hidden_states=torch.randn(1, 3, deep.context_in_dim, generator=g),
             timestep=torch.tensor([0.5]), img_ids=torch.zeros(4, 3), txt_ids=torch.zeros(3, 3), return_dict=False)
    with torch.no_grad():
        before = theirs(**x)[0]
        theirs.load_lora_adapter({k: v for k, v in converted.items() if k.startswith("transformer.")},
                                 prefix="transformer", adapter_name="chroma")
        after = theirs(**x)[0]
    assert float((after - before).abs().max()) > 1e-4
