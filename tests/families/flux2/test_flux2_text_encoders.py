"""FLUX.2 prompt embeddings equal the diffusers pipelines' encode paths (Mistral for [dev], Qwen3 for klein), from
ComfyUI-layout files truncated to the deepest stacked layer; a mismatched encoder is a one-line error."""

from __future__ import annotations

import pytest
import torch
from diffusers import Flux2KleinPipeline, Flux2Pipeline

from fluxlora.errors import CheckpointError
from fluxlora.families.flux2 import text_encoders as te
from fluxlora.families.flux2.loading import inspect_flux2
from fluxlora.families.flux2.params import check_text_encoder_fits
from fluxlora.families.flux2.tiny import tiny_text_encoder, tiny_tokenizer

PROMPTS = ["a photo of a cat holding a sign", "a red fox in snow"]


@pytest.mark.parametrize("version", ["dev", "klein-4b", "klein-9b"])
def test_prompt_embeddings_match_the_pipelines(flux2_tiny, version):
    paths = flux2_tiny[version]
    full, kind = tiny_text_encoder(version)  # the same seeded weights the file holds, with every layer and its head
    tokenizer = tiny_tokenizer(kind)
    model, spec = te.load_text_encoder(paths.text_encoder, expected=kind)
    assert len(model.layers) == spec.built_layers == len(full.model.layers) - 1  # truncated: last layer unused
    ours = te.encode(model, spec, *te.tokenize(tokenizer, kind, PROMPTS, max_length=48))
    if kind == "qwen3":
        ref = Flux2KleinPipeline._get_qwen3_prompt_embeds(full, tokenizer, PROMPTS, max_sequence_length=48)
    else:
        ref = Flux2Pipeline._get_mistral_3_small_prompt_embeds(full, tokenizer, PROMPTS, max_sequence_length=48)
    assert ours.shape == ref.shape == (2, 48, 3 * full.config.hidden_size)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_fp8_encoder_keeps_linears_in_fp8(flux2_tiny, tmp_path):
    from fluxlora.files import save_safetensors
    from fluxlora.models.checkpoints import load_tensors, read_header

    state = load_tensors(read_header(flux2_tiny["klein-4b"].text_encoder))
    path = tmp_path / "qwen_3_4b_fp8.safetensors"
    save_safetensors(path, {k: v.to(torch.float8_e4m3fn) if k.endswith("proj.weight") else v for k, v in state.items()})
    model, spec = te.load_text_encoder(path)
    assert model.layers[0].mlp.up_proj.weight.dtype == torch.float8_e4m3fn
    out = te.encode(model, spec, *te.tokenize(tiny_tokenizer("qwen3"), "qwen3", PROMPTS[:1], max_length=16))
    assert torch.isfinite(out).all()


def test_klein_transformer_refuses_the_dev_text_encoder(flux2_tiny):
    klein = inspect_flux2(flux2_tiny["klein-4b"].transformer)
    kind, hidden, _ = te.inspect_text_encoder(flux2_tiny["dev"].text_encoder)
    with pytest.raises(CheckpointError) as err:
        check_text_encoder_fits(klein.params, kind, hidden, path=flux2_tiny["dev"].text_encoder)
    assert "Mistral Small 3" in str(err.value) and "\n" not in str(err.value)
    kind, hidden, _ = te.inspect_text_encoder(flux2_tiny["klein-9b"].text_encoder)  # Qwen3-8B with klein 4B
    with pytest.raises(CheckpointError, match="width 48"):
        check_text_encoder_fits(klein.params, kind, hidden, path=flux2_tiny["klein-9b"].text_encoder)
    with pytest.raises(CheckpointError, match="Qwen3"):
        te.load_text_encoder(flux2_tiny["klein-4b"].text_encoder, expected="mistral3")


def test_a_transformer_file_is_not_a_text_encoder(flux2_tiny):
    with pytest.raises(CheckpointError, match="not a Mistral 3 / Qwen3 text encoder"):
        te.load_text_encoder(flux2_tiny["dev"].transformer)
