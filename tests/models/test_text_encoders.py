"""CLIP-L / T5-XXL: file layouts, strict loading, transformers references, fp8, tokenizers and prompt encoding."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from fluxlora.errors import CheckpointError, ConfigError
from fluxlora.models.fp8 import _fp8_linear_forward
from fluxlora.models.text_encoders import (
    build_clip_l,
    build_t5xxl,
    clip_l_config,
    clip_l_config_from_shapes,
    clip_l_file_state_dict,
    clip_l_key_map,
    clip_l_lora_module_names,
    encode_prompts,
    load_clip_l,
    load_t5xxl,
    load_tokenizers,
    t5xxl_config,
    t5xxl_config_from_shapes,
    t5xxl_file_state_dict,
    t5xxl_lora_module_names,
    tiny_clip_l_config,
    tiny_t5xxl_config,
)

PROMPTS = ["a photo of a cat", "The quick brown fox jumps over the lazy dog.", ""]
T5_LEN = 24
CLIP_EOS = 49407


def _perturb_norms(model: nn.Module, seed: int) -> nn.Module:
    """Random init leaves norms at 1/0; perturb them so a mis-mapped norm shows up in the outputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn(p.shape, generator=gen))
    return model.eval()


@pytest.fixture(scope="module")
def tokens(tokenizers_dir):
    return load_tokenizers(tokenizers_dir).tokenize(PROMPTS, T5_LEN)


@pytest.fixture(scope="module")
def clip_files(tmp_path_factory):
    """(our ComfyUI-layout file, transformers save_pretrained folder) holding the same seeded weights."""
    torch.manual_seed(0)
    model = _perturb_norms(build_clip_l(tiny_clip_l_config()), 0)
    root = tmp_path_factory.mktemp("clip")
    model.save_pretrained(root / "reference")
    save_file(clip_l_file_state_dict(model), str(root / "clip_l.safetensors"))
    return root / "clip_l.safetensors", root / "reference"


@pytest.fixture(scope="module")
def t5_files(tmp_path_factory):
    torch.manual_seed(1)
    model = _perturb_norms(build_t5xxl(tiny_t5xxl_config()), 1)
    root = tmp_path_factory.mktemp("t5")
    model.save_pretrained(root / "reference")
    save_file(t5xxl_file_state_dict(model), str(root / "t5xxl.safetensors"))
    return root / "t5xxl.safetensors", root / "reference"


# ---------------------------------------------------------------- tokenizers


def test_tokenizer_ids_match_the_reference_values(tokenizers_dir):
    tok = load_tokenizers(tokenizers_dir).tokenize(["a photo of a cat"], 512)
    clip_expected = [49406, 320, 1125, 539, 320, 2368, 49407] + [49407] * 70
    t5_expected = [3, 9, 1202, 13, 3, 9, 1712, 1] + [0] * 504
    assert tok.clip_ids.tolist() == [clip_expected]
    assert tok.t5_ids.tolist() == [t5_expected]
    assert tok.t5_mask.tolist() == [[1] * 8 + [0] * 504]


def test_shipped_and_sd_scripts_cache_dir_tokenizers_agree(tokenizers_dir, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "openai_clip-vit-large-patch14").symlink_to(tokenizers_dir / "clip_l")
    (cache / "google_t5-v1_1-xxl").symlink_to(tokenizers_dir / "t5xxl")
    from_cache = load_tokenizers(cache)
    assert "openai_clip-vit-large-patch14" in from_cache.clip.name_or_path
    assert "google_t5-v1_1-xxl" in from_cache.t5.name_or_path
    text = ["masterpiece, best quality, 1girl, solo, looking at viewer"]
    a, b = load_tokenizers().tokenize(text, 256), from_cache.tokenize(text, 256)
    assert a.clip_ids[0, :15].tolist() == [49406, 12066, 267, 949, 3027, 267, 272, 1611, 267, 5797, 267, 1312, 536,
                                           15061, 49407]
    assert torch.equal(a.clip_ids, b.clip_ids) and torch.equal(a.t5_ids, b.t5_ids) and a.t5_ids.shape == (1, 256)


def test_long_prompts_truncate_keeping_eos(tokenizers_dir):
    tok = load_tokenizers(tokenizers_dir).tokenize(["cat " * 300], 16)
    assert tok.clip_ids.shape == (1, 77) and tok.clip_ids[0, -1] == CLIP_EOS
    assert tok.t5_ids.shape == (1, 16) and tok.t5_ids[0, -1] == 1 and tok.t5_mask.all()


def test_bad_tokenizer_folder_is_a_config_error(tmp_path):
    broken = tmp_path / "cache"
    (broken / "openai_clip-vit-large-patch14").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"cache/openai_clip-vit-large-patch14.*has 2 tokens instead of 49408"):
        load_tokenizers(broken)
    (broken / "t5xxl").write_text("not a folder")
    with pytest.raises(ConfigError, match=r"--tokenizer_cache_dir .*t5xxl.*is a file"):
        load_tokenizers(tmp_path / "cache" / "t5xxl")


# ---------------------------------------------------------------- configs and layouts


def test_full_size_configs_have_the_published_shapes():
    with torch.device("meta"):
        clip = build_clip_l(clip_l_config())
        t5 = build_t5xxl(t5xxl_config())
    clip_shapes = clip_l_file_state_dict(clip)
    t5_shapes = t5xxl_file_state_dict(t5)
    assert clip_shapes["text_model.embeddings.token_embedding.weight"].shape == (49408, 768)
    assert clip_shapes["text_model.embeddings.position_embedding.weight"].shape == (77, 768)
    assert clip_shapes["text_model.encoder.layers.11.mlp.fc1.weight"].shape == (3072, 768)
    assert "text_model.encoder.layers.12.mlp.fc1.weight" not in clip_shapes
    assert clip.config.hidden_act == "quick_gelu" and clip.config.num_attention_heads == 12
    assert t5_shapes["shared.weight"].shape == (32128, 4096)
    assert t5_shapes["encoder.block.23.layer.0.SelfAttention.q.weight"].shape == (4096, 4096)
    assert t5_shapes["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].shape == (32, 64)
    assert t5_shapes["encoder.block.5.layer.1.DenseReluDense.wi_1.weight"].shape == (10240, 4096)
    assert "encoder.block.24.layer.0.SelfAttention.q.weight" not in t5_shapes
    # The configs derived from the file shapes are the published ones.
    derived = clip_l_config_from_shapes({k: tuple(v.shape) for k, v in clip_shapes.items()})
    assert (derived.hidden_size, derived.num_hidden_layers, derived.num_attention_heads, derived.intermediate_size) \
        == (768, 12, 12, 3072)
    d5 = t5xxl_config_from_shapes({k: tuple(v.shape) for k, v in t5_shapes.items()})
    assert (d5.d_model, d5.num_layers, d5.num_heads, d5.d_kv, d5.d_ff, d5.relative_attention_max_distance) \
        == (4096, 24, 64, 64, 10240, 128)
    assert d5.dense_act_fn == "gelu_new" and d5.is_gated_act


def test_file_layouts_are_the_comfyui_key_names():
    clip = build_clip_l(tiny_clip_l_config())
    t5 = build_t5xxl(tiny_t5xxl_config())
    per_clip_layer = [f"{m}.{p}" for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                            "self_attn.out_proj", "mlp.fc1", "mlp.fc2", "layer_norm1", "layer_norm2")
                      for p in ("weight", "bias")]
    expected_clip = {"text_model.embeddings.token_embedding.weight", "text_model.embeddings.position_embedding.weight",
                     "text_model.final_layer_norm.weight", "text_model.final_layer_norm.bias"}
    expected_clip |= {f"text_model.encoder.layers.{i}.{k}" for i in range(2) for k in per_clip_layer}
    assert set(clip_l_file_state_dict(clip)) == expected_clip
    per_t5_block = [f"layer.0.SelfAttention.{x}.weight" for x in "qkvo"] + [
        "layer.0.layer_norm.weight", "layer.1.layer_norm.weight"] + [
        f"layer.1.DenseReluDense.{x}.weight" for x in ("wi_0", "wi_1", "wo")]
    expected_t5 = {"shared.weight", "encoder.final_layer_norm.weight",
                   "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"}
    expected_t5 |= {f"encoder.block.{i}.{k}" for i in range(2) for k in per_t5_block}
    assert set(t5xxl_file_state_dict(t5)) == expected_t5


def test_clip_key_map_and_lora_names_are_version_independent():
    v5_keys = ["embeddings.token_embedding.weight", "encoder.layers.0.mlp.fc1.weight"]
    v4_keys = ["text_model." + k for k in v5_keys] + ["text_model.embeddings.position_ids"]
    assert clip_l_key_map(v5_keys) == {"text_model." + k: k for k in v5_keys}
    assert clip_l_key_map(v4_keys) == {k: k for k in v4_keys[:2]}

    model = build_clip_l(tiny_clip_l_config())
    wrapped = nn.Module()  # transformers 4.x nests everything under `text_model`
    wrapped.text_model = model
    for m in (model, wrapped):
        names = clip_l_lora_module_names(m)
        assert len(names) == 2 * 6
        assert "text_model.encoder.layers.0.self_attn.q_proj" in names
        assert "text_model.encoder.layers.1.mlp.fc2" in names
        assert all(n.startswith("text_model.encoder.layers.") for n in names)
    assert names["text_model.encoder.layers.0.self_attn.q_proj"] is model.get_submodule(
        "encoder.layers.0.self_attn.q_proj")
    t5_names = t5xxl_lora_module_names(build_t5xxl(tiny_t5xxl_config()))
    assert len(t5_names) == 2 * 7 and "encoder.block.1.layer.1.DenseReluDense.wo" in t5_names
    assert "encoder.block.0.layer.0.SelfAttention.q" in t5_names


# ---------------------------------------------------------------- numerics against transformers


def test_clip_l_matches_transformers_from_pretrained(clip_files, tokens, tmp_path):
    from transformers import CLIPTextModel

    path, ref_dir = clip_files
    ours = load_clip_l(path)
    reference = CLIPTextModel.from_pretrained(ref_dir).eval()
    # transformers' own loader reading OUR file (it remaps the old text_model.* names itself).
    comfy_dir = tmp_path / "comfy"
    comfy_dir.mkdir()
    (comfy_dir / "config.json").write_text((ref_dir / "config.json").read_text())
    (comfy_dir / "model.safetensors").symlink_to(path)
    from_our_file = CLIPTextModel.from_pretrained(comfy_dir).eval()
    with torch.no_grad():
        out = ours(input_ids=tokens.clip_ids)
        ref = reference(input_ids=tokens.clip_ids).pooler_output
        ref2 = from_our_file(input_ids=tokens.clip_ids).pooler_output
    assert torch.allclose(out.pooler_output, ref, atol=1e-5, rtol=0)
    assert torch.allclose(out.pooler_output, ref2, atol=1e-5, rtol=0)
    # Pooled = final hidden state at the first EOS token.
    eos = (tokens.clip_ids == CLIP_EOS).int().argmax(dim=1)
    assert torch.equal(out.pooler_output, out.last_hidden_state[torch.arange(len(PROMPTS)), eos])
    assert ours.config.hidden_act == "quick_gelu"


def test_t5_matches_transformers_from_pretrained(t5_files, tokens):
    from transformers import T5EncoderModel

    path, ref_dir = t5_files
    ours = load_t5xxl(path)
    reference = T5EncoderModel.from_pretrained(ref_dir).eval()
    with torch.no_grad():
        for mask in (tokens.t5_mask, None):
            out = ours(input_ids=tokens.t5_ids, attention_mask=mask).last_hidden_state
            ref = reference(input_ids=tokens.t5_ids, attention_mask=mask).last_hidden_state
            assert out.shape == (len(PROMPTS), T5_LEN, 32)
            assert torch.allclose(out, ref, atol=1e-5, rtol=0)
    assert ours.encoder.embed_tokens.weight is ours.shared.weight


def test_encode_prompts(clip_files, t5_files, tokens):
    clip, t5 = load_clip_l(clip_files[0]), load_t5xxl(t5_files[0])
    with_mask = encode_prompts(clip, t5, tokens, apply_t5_attn_mask=True)
    without = encode_prompts(clip, t5, tokens, apply_t5_attn_mask=False)
    assert with_mask["clip_pooled"].shape == (3, 32) and with_mask["clip_pooled"].dtype == torch.float32
    assert with_mask["t5_out"].shape == (3, T5_LEN, 32)
    assert with_mask["t5_mask"].dtype == torch.bool and torch.equal(with_mask["t5_mask"], tokens.t5_mask.bool())
    with torch.no_grad():
        direct = t5(input_ids=tokens.t5_ids, attention_mask=tokens.t5_mask).last_hidden_state
        unmasked = t5(input_ids=tokens.t5_ids).last_hidden_state
    assert torch.equal(with_mask["t5_out"], direct) and torch.equal(without["t5_out"], unmasked)
    assert not torch.allclose(with_mask["t5_out"][0, :8], without["t5_out"][0, :8])  # the mask reaches T5
    assert not with_mask["clip_pooled"].requires_grad
    # Gradients only when asked for (a LoRA parameter on CLIP-L).
    clip.get_submodule("encoder.layers.0.mlp.fc1").weight.requires_grad_(True)
    assert encode_prompts(clip, t5, tokens, apply_t5_attn_mask=False, clip_grad=True)["clip_pooled"].requires_grad
    assert not encode_prompts(clip, t5, tokens, apply_t5_attn_mask=False)["clip_pooled"].requires_grad


# ---------------------------------------------------------------- dtypes, fp8, frozen


def test_loaded_encoders_are_frozen_eval_and_fully_materialised(clip_files, t5_files):
    for model in (load_clip_l(clip_files[0]), load_t5xxl(t5_files[0])):
        assert not any(m.training for m in model.modules())
        assert not any(p.requires_grad for p in model.parameters())
        assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    clip = load_clip_l(clip_files[0])
    assert torch.equal(clip.get_submodule("embeddings").position_ids, torch.arange(77)[None])


def test_half_precision_loading(clip_files, t5_files, tokens):
    clip = load_clip_l(clip_files[0], dtype=torch.bfloat16)
    assert {p.dtype for p in clip.parameters()} == {torch.bfloat16}
    t5 = load_t5xxl(t5_files[0], dtype=torch.float16)
    wo = {p.dtype for n, p in t5.named_parameters() if ".wo." in n}
    rest = {p.dtype for n, p in t5.named_parameters() if ".wo." not in n}
    assert wo == {torch.float32} and rest == {torch.float16}  # transformers' _keep_in_fp32_modules convention
    with torch.no_grad():
        out = t5(input_ids=tokens.t5_ids).last_hidden_state
        ref = load_t5xxl(t5_files[0])(input_ids=tokens.t5_ids).last_hidden_state
    assert torch.isfinite(out).all() and torch.allclose(out.float(), ref, atol=2e-2)


def test_fp8_t5_file_keeps_fp8_linears_and_matches_dequantized_reference(t5_files, tokens, tmp_path):
    from safetensors.torch import load_file

    state = load_file(str(t5_files[0]))
    fp8_path = tmp_path / "t5xxl_fp8_e4m3fn.safetensors"
    save_file({k: v.to(torch.float8_e4m3fn) for k, v in state.items()}, str(fp8_path))
    model = load_t5xxl(fp8_path)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            assert module.weight.dtype == torch.float8_e4m3fn, name
            assert module.forward.__func__ is _fp8_linear_forward, name  # up-cast per call
    others = {n: p.dtype for n, p in model.named_parameters() if not n.endswith(("q.weight", "k.weight", "v.weight",
              "o.weight", "wi_0.weight", "wi_1.weight", "wo.weight"))}
    assert set(others.values()) == {torch.bfloat16} and "shared.weight" in others

    # Reference: the plain transformers model holding the same (fp8-rounded) values in bfloat16.
    reference = build_t5xxl(tiny_t5xxl_config()).eval()
    dequantized = {k: v.to(torch.float8_e4m3fn).to(torch.bfloat16) for k, v in state.items()}
    dequantized["encoder.embed_tokens.weight"] = dequantized["shared.weight"]
    reference.load_state_dict(dequantized, strict=True)
    reference.to(torch.bfloat16)
    with torch.no_grad():
        out = model(input_ids=tokens.t5_ids, attention_mask=tokens.t5_mask).last_hidden_state
        ref = reference(input_ids=tokens.t5_ids, attention_mask=tokens.t5_mask).last_hidden_state
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert torch.allclose(out.float(), ref.float(), atol=1e-3, rtol=0)  # same bf16 ops: equal in practice

    # An fp8 storage dtype on a 16/32-bit file quantises the Linear weights the same way.
    stored = load_t5xxl(t5_files[0], dtype=torch.float8_e4m3fn)
    assert stored.get_submodule("encoder.block.0.layer.1.DenseReluDense.wo").weight.dtype == torch.float8_e4m3fn
    assert stored.shared.weight.dtype == torch.bfloat16


def test_real_file_extras_are_accepted(clip_files, t5_files, tmp_path, tokens):
    """Published clip_l / t5xxl files carry position_ids, a text projection, or T5's tied embed_tokens copy."""
    from safetensors.torch import load_file

    clip_state = load_file(str(clip_files[0]))
    clip_state["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    clip_state["text_projection.weight"] = torch.zeros(32, 32)
    save_file(clip_state, str(tmp_path / "clip_l.safetensors"))
    assert torch.equal(load_clip_l(tmp_path / "clip_l.safetensors")(tokens.clip_ids).pooler_output,
                       load_clip_l(clip_files[0])(tokens.clip_ids).pooler_output)

    t5_state = load_file(str(t5_files[0]))
    t5_state["encoder.embed_tokens.weight"] = t5_state["shared.weight"].clone()
    save_file(t5_state, str(tmp_path / "t5_both.safetensors"))
    t5 = load_t5xxl(tmp_path / "t5_both.safetensors")
    assert torch.equal(t5.shared.weight, t5_state["shared.weight"]) and t5.encoder.embed_tokens.weight is t5.shared.weight


# ---------------------------------------------------------------- bad input


def test_bad_files_are_refused_naming_file_and_flag(clip_files, t5_files, tmp_path):
    from safetensors.torch import load_file

    clip_state = load_file(str(clip_files[0]))
    t5_state = load_file(str(t5_files[0]))

    def write(name: str, state: dict) -> Path:
        save_file(state, str(tmp_path / name))
        return tmp_path / name

    ae_like = write("ae.safetensors", {"encoder.conv_in.weight": torch.zeros(1), "decoder.conv_in.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match=r"--clip_l .*ae\.safetensors.*autoencoder.*CLIP-L"):
        load_clip_l(ae_like)
    with pytest.raises(CheckpointError, match=r"--t5xxl .*clip_l\.safetensors.*CLIP-L.*T5-XXL"):
        load_t5xxl(clip_files[0])
    with pytest.raises(CheckpointError, match=r"--clip_l .*t5xxl\.safetensors.*T5-XXL"):
        load_clip_l(t5_files[0])

    missing = {k: v for k, v in clip_state.items() if k != "text_model.encoder.layers.1.self_attn.v_proj.bias"}
    with pytest.raises(CheckpointError, match=r"--clip_l .*missing\.safetensors.*missing.*layers\.1\.self_attn\.v_proj"):
        load_clip_l(write("missing.safetensors", missing))
    extra = dict(t5_state, **{"decoder.block.0.layer.0.SelfAttention.q.weight": torch.zeros(32, 32)})
    with pytest.raises(CheckpointError, match=r"--t5xxl .*extra\.safetensors.*unexpected.*decoder\.block\.0"):
        load_t5xxl(write("extra.safetensors", extra))
    wrong = dict(t5_state, **{"encoder.block.1.layer.1.DenseReluDense.wo.weight": torch.zeros(32, 65)})
    with pytest.raises(CheckpointError, match=r"--t5xxl .*wrong\.safetensors.*shape.*block\.1\.layer\.1\.DenseReluDense\.wo"):
        load_t5xxl(write("wrong.safetensors", wrong))
    scaled = dict(t5_state, scaled_fp8=torch.zeros(1))
    with pytest.raises(CheckpointError, match=r"scaled fp8"):
        load_t5xxl(write("scaled.safetensors", scaled))
    no_layers = {k: v for k, v in clip_state.items() if ".layers.0." not in k}
    with pytest.raises(CheckpointError, match=r"--clip_l .*nolayer0\.safetensors"):
        load_clip_l(write("nolayer0.safetensors", no_layers))
    with pytest.raises(CheckpointError, match=r"--t5xxl .*pickle"):
        load_t5xxl(tmp_path / "t5xxl.pt")
    bad_json = tmp_path / "bad.safetensors"
    bad_json.write_bytes((8).to_bytes(8, "little") + json.dumps([1]).encode().ljust(8))
    with pytest.raises(CheckpointError, match=r"--clip_l .*bad\.safetensors.*not a valid safetensors"):
        load_clip_l(bad_json)
