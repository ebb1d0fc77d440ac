"""`fluxlora make-tiny` writes a tiny real-layout file of every family, loadable by the real loaders."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from fluxlora.cli import main as cli_main
from fluxlora.families.chroma.loading import load_chroma
from fluxlora.families.tiny import tiny_chroma_params, tiny_fill_params
from fluxlora.models.checkpoints import ModelKind, detect_kind, read_header
from fluxlora.models.flux_loading import load_flux
from fluxlora.models.tiny import tiny_flux_params


def test_make_tiny_writes_every_family_deterministically(tmp_path: Path, tiny_ckpts, tiny_family_ckpts, capsys) -> None:
    assert cli_main(["make-tiny", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    for paths, names in ((tiny_ckpts, ("flux_dev", "flux_schnell", "clip_l", "t5xxl", "ae")),
                         (tiny_family_ckpts, ("chroma", "kontext", "fill"))):
        for name in names:
            fixture = getattr(paths, name)
            assert str(tmp_path / fixture.name) in printed
            assert (tmp_path / fixture.name).read_bytes() == fixture.read_bytes(), name


def test_family_files_have_the_real_layouts(tiny_ckpts, tiny_family_ckpts) -> None:
    chroma, info = load_chroma(tiny_family_ckpts.chroma)
    assert info.params == tiny_chroma_params() and info.params.approximator_depth == 5
    assert detect_kind(read_header(tiny_family_ckpts.chroma).tensors) is ModelKind.CHROMA

    kontext, kinfo = load_flux(tiny_family_ckpts.kontext)
    assert kinfo.params == tiny_flux_params("dev")  # Kontext is the dev layout
    dev = load_file(str(tiny_ckpts.flux_dev))
    assert load_file(str(tiny_family_ckpts.kontext)).keys() == dev.keys()
    assert not torch.equal(kontext.img_in.weight, dev["img_in.weight"])  # its own weights

    fill, finfo = load_flux(tiny_family_ckpts.fill)
    assert finfo.params == tiny_fill_params()
    assert (finfo.params.in_channels, finfo.params.out_channels) == (384, 64)
    assert fill.img_in.weight.shape[1] == 384 and fill.final_layer.linear.weight.shape[0] == 64
    x = torch.randn(1, 6, 384)
    ids = torch.zeros(1, 6, 3)
    with torch.no_grad():
        out = fill(img=x, img_ids=ids, txt=torch.randn(1, 3, finfo.params.context_in_dim), txt_ids=torch.zeros(1, 3, 3),
                   timesteps=torch.tensor([0.5]), y=torch.randn(1, finfo.params.vec_in_dim),
                   guidance=torch.tensor([30.0]))
    assert out.shape == (1, 6, 64) and torch.isfinite(out).all() and 0.1 < out.std() < 10


def test_inspect_names_the_family_from_headers_only(tiny_family_ckpts, tiny_ckpts, capsys, monkeypatch) -> None:
    import fluxlora.families.chroma.loading as chroma_loading
    import fluxlora.models.flux_loading as flux_loading

    for module in (flux_loading, chroma_loading):
        monkeypatch.setattr(module, "load_tensors", lambda *a, **k: (_ for _ in ()).throw(AssertionError("read")))
    files = [tiny_family_ckpts.chroma, tiny_family_ckpts.fill, tiny_family_ckpts.kontext, tiny_ckpts.flux_dev]
    assert cli_main(["inspect", *map(str, files)]) == 0
    out = capsys.readouterr().out
    assert "family:     chroma (Chroma)" in out and "family:     fill (FLUX.1 Fill [dev])" in out
    assert out.count("family:     flux1 (FLUX.1-dev)") == 2  # Kontext has the dev layout: only --model_type names it
    assert cli_main(["inspect", "--model_type", "kontext", str(tiny_family_ckpts.kontext)]) == 0
    assert "family:     kontext (FLUX.1 Kontext [dev])" in capsys.readouterr().out
