"""Tiny real-format checkpoints: right kinds and layouts, load through the real loaders, deterministic, O(1)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fluxlora.models import tiny
from fluxlora.models.checkpoints import ModelKind, detect_kind, read_header
from fluxlora.models.flux_loading import load_flux
from fluxlora.models.text_encoders import tiny_clip_l_config, tiny_t5xxl_config
from fluxlora.models.tiny import random_flux_inputs, tiny_flux_params, tiny_flux_state_dict


def test_files_have_the_real_layouts(tiny_ckpts: tiny.TinyPaths) -> None:
    kinds = {tiny_ckpts.flux_dev: ModelKind.FLUX, tiny_ckpts.flux_schnell: ModelKind.FLUX,
             tiny_ckpts.clip_l: ModelKind.CLIP_L, tiny_ckpts.t5xxl: ModelKind.T5XXL, tiny_ckpts.ae: ModelKind.AE}
    for path, kind in kinds.items():
        assert detect_kind(read_header(path).tensors) is kind, path
    assert read_header(tiny_ckpts.clip_l).shapes["text_model.embeddings.token_embedding.weight"][0] == 49408
    assert read_header(tiny_ckpts.t5xxl).shapes["shared.weight"][0] == 32128
    assert "guidance_in.in_layer.weight" not in read_header(tiny_ckpts.flux_schnell).tensors
    assert (tiny_ckpts.tokenizers / "clip_l" / "vocab.json").is_file()
    assert (tiny_ckpts.tokenizers / "t5xxl" / "spiece.model").is_file()


@pytest.mark.parametrize("variant", ["dev", "schnell"])
@torch.no_grad()
def test_tiny_flux_loads_and_gives_order_one_outputs(tiny_ckpts: tiny.TinyPaths, variant: str) -> None:
    path = tiny_ckpts.flux_dev if variant == "dev" else tiny_ckpts.flux_schnell
    model, info = load_flux(path)
    assert info.variant == variant and info.params == tiny_flux_params(variant)
    assert info.params.vec_in_dim == tiny_clip_l_config().hidden_size
    assert info.params.context_in_dim == tiny_t5xxl_config().d_model
    assert (info.params.depth, info.params.depth_single_blocks, info.params.head_dim) == (2, 2, 32)
    assert info.params.axes_dim == (4, 14, 14)
    x = random_flux_inputs(info.params)
    out = model(**(x if variant == "dev" else {**x, "guidance": None}))
    assert torch.isfinite(out).all()
    assert 0.2 < out.std().item() < 5.0


def test_text_encoders_and_ae_load_through_their_loaders(tiny_ckpts: tiny.TinyPaths) -> None:
    from fluxlora.models.autoencoder import load_ae
    from fluxlora.models.text_encoders import load_clip_l, load_t5xxl

    clip = load_clip_l(tiny_ckpts.clip_l)
    t5 = load_t5xxl(tiny_ckpts.t5xxl)
    ae = load_ae(tiny_ckpts.ae)
    for model in (clip, t5, ae):
        params = list(model.parameters())
        assert params and not any(p.is_meta for p in params)
        assert all(p.abs().max() > 0 for p in params if p.numel() > 1)  # initialised, not zeros


def test_deterministic_and_cli(tmp_path: Path, tiny_ckpts: tiny.TinyPaths, capsys: pytest.CaptureFixture) -> None:
    assert tiny.main([str(tmp_path), "--seed", "0"]) == 0
    printed = capsys.readouterr().out
    for name in ("flux_dev", "flux_schnell", "clip_l", "t5xxl", "ae"):
        ours, fixture = tmp_path / getattr(tiny_ckpts, name).name, getattr(tiny_ckpts, name)
        assert str(ours) in printed
        assert ours.read_bytes() == fixture.read_bytes(), name
    other = tiny_flux_state_dict("dev", seed=1)
    same = tiny_flux_state_dict("dev", seed=0)
    assert not torch.equal(other["img_in.weight"], same["img_in.weight"])


def test_tiny_flux_constant() -> None:
    assert tiny.TINY_FLUX == tiny_flux_params("dev")
    with pytest.raises(AttributeError):
        tiny.NOT_THERE  # noqa: B018
