"""The planner's numbers per family: parameter counts equal the models', Kontext carries twice the image tokens,
`fluxlora check` names the family and reads no weight."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from fluxlora.config.train_config import parse_train_config
from fluxlora.families.chroma.model import Chroma, ChromaParams
from fluxlora.families.chroma.shape import chroma_param_count
from fluxlora.families.flux1.shape import flux_param_count
from fluxlora.models.flux import Flux, FluxParams
from fluxlora.training.cli import check_main
from fluxlora.training.plan import build_plan


@pytest.mark.parametrize("model", ["chroma", "fill", "dev"])
def test_parameter_counts_equal_the_full_size_models(model) -> None:
    with torch.device("meta"):
        if model == "chroma":
            params, count = ChromaParams(), chroma_param_count(ChromaParams())
            module = Chroma(params)
        else:
            params = FluxParams() if model == "dev" else replace(FluxParams(), in_channels=384, out_channels=64)
            module, count = Flux(params), flux_param_count(params)
    assert count == sum(p.numel() for p in module.parameters())


def _argv(m, tmp_path, name: str) -> list[str]:
    images, controls = tmp_path / "img", tmp_path / "ctl"
    for folder in (images, controls):
        folder.mkdir(exist_ok=True)
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(images / "a.png")
    (images / "a.txt").write_text("x", encoding="utf-8")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(controls / "a.png")
    pair = f'  conditioning_data_dir = "{controls.as_posix()}"\n' if name in ("kontext", "fill") else ""
    toml = tmp_path / f"{name}.toml"
    toml.write_text(f'[general]\ncaption_extension = ".txt"\n[[datasets]]\nresolution = 64\n  [[datasets.subsets]]\n'
                    f'  image_dir = "{images.as_posix()}"\n{pair}', encoding="utf-8")
    files = {"dev": m.ckpts.flux_dev, "kontext": m.families.kontext, "fill": m.families.fill, "chroma": m.families.chroma}
    argv = [f"--pretrained_model_name_or_path={files[name]}", f"--t5xxl={m.ckpts.t5xxl}", f"--ae={m.ckpts.ae}",
            f"--dataset_config={toml}", f"--output_dir={tmp_path / 'out'}", "--network_module=networks.lora_flux",
            "--max_train_steps=1"]
    if name != "chroma":
        argv.append(f"--clip_l={m.ckpts.clip_l}")
    if name == "kontext":
        argv.append("--model_type=kontext")
    return argv


def test_kontext_plans_twice_the_image_tokens_and_check_names_each_family(family_models, tmp_path, capsys,
                                                                         monkeypatch) -> None:
    import fluxlora.families.chroma.loading as chroma_loading
    import fluxlora.models.flux_loading as flux_loading

    for module in (flux_loading, chroma_loading):
        monkeypatch.setattr(module, "load_tensors", lambda *a, **k: pytest.fail("a weight was read"))
    plans = {name: build_plan(parse_train_config(_argv(family_models, tmp_path, name)))
             for name in ("dev", "kontext", "fill", "chroma")}
    assert plans["kontext"].workload.image_tokens == 2 * plans["dev"].workload.image_tokens == 2 * 16
    assert plans["fill"].workload.image_tokens == plans["dev"].workload.image_tokens
    assert plans["kontext"].memory.device_peak > plans["dev"].memory.device_peak  # more tokens, more activations
    assert plans["chroma"].workload.shape.outer_params == chroma_param_count(plans["chroma"].model.params) - (
        plans["chroma"].model.params.depth * plans["chroma"].workload.shape.double_params
        + plans["chroma"].model.params.depth_single_blocks * plans["chroma"].workload.shape.single_params)
    for name, title in (("kontext", "FLUX.1 Kontext [dev]"), ("fill", "FLUX.1 Fill [dev]"), ("chroma", "Chroma")):
        assert check_main(_argv(family_models, tmp_path, name)) == 0
        assert f"ok: {title} (" in capsys.readouterr().out
