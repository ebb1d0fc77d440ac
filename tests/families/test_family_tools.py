"""merge / extract / convert per family: a Chroma, Kontext or Fill LoRA merges into its own model (= the LoRA
applied), LoRA + LoRA merges keep the family's name, extract names the family, convert keeps the file's metadata;
a LoRA of another family is refused with one line before any weight is written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from fluxlora.errors import CheckpointError
from fluxlora.families import family_named
from fluxlora.files import save_safetensors
from fluxlora.network.formats import effective_deltas
from fluxlora.network.lora import create_network
from fluxlora.tools.convert import main as convert_main
from fluxlora.tools.extract import main as extract_main
from fluxlora.tools.merge import main as merge_main

FILES = {"chroma": "chroma", "kontext": "kontext", "fill": "fill"}


def _meta(path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def _model(m, name: str):
    family = family_named(name)
    info = family.inspect(Path(getattr(m.families, FILES[name])), flag="")
    return family, info, family.load_transformer(info, dtype=torch.float32, device="cpu").eval()


def _lora(m, name: str, path: Path, *, architecture: str | None = None, seed: int = 0) -> Path:
    family, info, model = _model(m, name)
    network = create_network(1.0, 4, 2.0, model, [None, None])
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sorted(network.parameters(), key=lambda t: t.shape):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    arch = family.architecture(info)
    network.save(path, metadata={"modelspec.architecture": architecture or arch.lora_architecture,
                                 "modelspec.implementation": arch.implementation,
                                 "ss_base_model_version": arch.base_model_version})
    return path


@pytest.mark.parametrize("name", ["chroma", "kontext", "fill"])
def test_merge_into_the_family_model_equals_the_lora_applied(family_models, tmp_path, name) -> None:
    m = family_models
    family, info, model = _model(m, name)
    lora = _lora(m, name, tmp_path / "lora.safetensors")
    out = tmp_path / "merged.safetensors"
    kontext = ["--model_type", "kontext"] if name == "kontext" else []
    assert merge_main(["--flux_model", str(info.path), "--models", str(lora), "--save_to", str(out), *kontext]) == 0
    assert _meta(out)["modelspec.architecture"] == family.architecture(info).architecture  # no "/lora": a model
    merged = family.load_transformer(family.inspect(out, flag=""), dtype=torch.float32, device="cpu").eval()
    network = create_network(1.0, 4, 2.0, model, [None, None])
    network.load_lora_state_dict(load_file(str(lora)))
    network.apply_to(model, [None, None])
    g = torch.Generator().manual_seed(1)
    p = info.params
    x = (torch.randn(1, 4, p.in_channels, generator=g), torch.zeros(1, 4, 3),
         torch.randn(1, 3, p.context_in_dim, generator=g), torch.zeros(1, 3, 3), torch.tensor([0.5]))
    extra = () if name == "chroma" else (torch.randn(1, p.vec_in_dim, generator=g), torch.tensor([3.5]))
    with torch.no_grad():
        torch.testing.assert_close(merged(*x, *extra), model(*x, *extra), rtol=0, atol=1e-5)


def test_a_lora_of_another_family_is_refused_before_writing(family_models, tmp_path) -> None:
    m = family_models
    out = tmp_path / "merged.safetensors"
    flux_lora = _lora(m, "chroma", tmp_path / "flux.safetensors", architecture="flux-1-dev/lora")
    with pytest.raises(CheckpointError, match=r"flux.safetensors: this LoRA was trained on flux-1-dev .* base model "
                                              r"is Chroma"):
        merge_main(["--flux_model", str(m.families.chroma), "--models", str(flux_lora), "--save_to", str(out)])
    kontext_lora = _lora(m, "fill", tmp_path / "kontext.safetensors", architecture="flux-1-kontext-dev/lora")
    with pytest.raises(CheckpointError, match=r"trained on flux-1-kontext-dev .* base model is FLUX.1 Fill \[dev\]"):
        merge_main(["--flux_model", str(m.families.fill), "--models", str(kontext_lora), "--save_to", str(out)])
    assert not out.exists()
    # a FLUX.1-dev LoRA on Kontext (the same layout, commonly used): merged with a warning
    dev_lora = _lora(m, "kontext", tmp_path / "dev.safetensors", architecture="flux-1-dev/lora")
    merge_main(["--flux_model", str(m.families.kontext), "--model_type", "kontext", "--models", str(dev_lora),
                "--save_to", str(out)])
    assert _meta(out)["modelspec.architecture"] == "flux-1-kontext-dev"
    # LoRA + LoRA: one family's name kept, two families refused
    a, b = _lora(m, "chroma", tmp_path / "a.safetensors", seed=1), _lora(m, "chroma", tmp_path / "b.safetensors", seed=2)
    merge_main(["--models", str(a), str(b), "--save_to", str(tmp_path / "ab.safetensors")])
    meta = _meta(tmp_path / "ab.safetensors")
    assert (meta["modelspec.architecture"], meta["ss_base_model_version"]) == ("chroma/lora", "chroma")
    with pytest.raises(CheckpointError, match=r"LoRAs of different base models \(a.safetensors \(chroma\), "
                                              r"kontext.safetensors \(flux-1-kontext-dev\)\)"):
        merge_main(["--models", str(a), str(kontext_lora), "--save_to", str(tmp_path / "mixed.safetensors")])


def test_extract_names_the_family_and_refuses_two_families(family_models, tmp_path) -> None:
    m = family_models
    tuned = {k: v + 0.01 * torch.randn(v.shape, generator=torch.Generator().manual_seed(0))
             for k, v in load_file(str(m.families.chroma)).items()}
    save_safetensors(tmp_path / "tuned.safetensors", tuned)
    out = tmp_path / "extracted.safetensors"
    assert extract_main(["--model_org", str(m.families.chroma), "--model_tuned", str(tmp_path / "tuned.safetensors"),
                         "--save_to", str(out), "--dim", "4"]) == 0
    meta = _meta(out)
    assert (meta["modelspec.architecture"], meta["ss_base_model_version"]) == ("chroma/lora", "chroma")
    assert not any("_mod_" in k or "modulation" in k for k in load_file(str(out)))
    with pytest.raises(CheckpointError, match=r"--model_tuned .*: is FLUX.1 Fill \[dev\] but --model_org is FLUX.1-dev"):
        extract_main(["--model_org", str(m.ckpts.flux_dev), "--model_tuned", str(m.families.fill),
                      "--save_to", str(tmp_path / "x.safetensors")])


def test_convert_round_trips_a_chroma_lora_and_keeps_its_metadata(family_models, tmp_path) -> None:
    lora = _lora(family_models, "chroma", tmp_path / "chroma.safetensors")
    diffusers, back = tmp_path / "diffusers.safetensors", tmp_path / "back.safetensors"
    assert convert_main(["--src", "sd-scripts", "--dst", "diffusers", "--src_path", str(lora),
                         "--dst_path", str(diffusers), "--hidden_size", "64"]) == 0
    assert convert_main(["--src", "diffusers", "--dst", "sd-scripts", "--src_path", str(diffusers),
                         "--dst_path", str(back), "--hidden_size", "64"]) == 0
    original, again = effective_deltas(load_file(str(lora))), effective_deltas(load_file(str(back)))
    assert original.keys() == again.keys() and original  # the same modules, each with the same weight change
    assert all(torch.allclose(original[k], again[k], atol=1e-6) for k in original)
    assert _meta(back)["modelspec.architecture"] == "chroma/lora"
