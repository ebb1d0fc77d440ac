"""flux_merge_lora: LoRAs into FLUX / CLIP-L / T5 files and LoRA + LoRA merges (spec §10.3, fixes of §12.32)."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from fluxlora.cli import main as cli_main
from fluxlora.errors import CheckpointError, ConfigError
from fluxlora.network.formats import effective_deltas, kohya_to_diffusers
from fluxlora.tools.merge import main

DOUBLE_KEYS = ["double_blocks.0.img_attn.qkv.weight", "double_blocks.18.txt_mlp.2.weight",
               "single_blocks.1.linear1.weight", "img_in.weight", "double_blocks.5.img_mod.lin.weight"]


def _hand_merge(base: dict, lora: dict, prefix: str, ratio: float) -> dict:
    """W += ratio · alpha/rank · up @ down for every module, straight from the keys (spec §10.3)."""
    out = dict(base)
    for key in base:
        name = f"{prefix}_{key[:-len('.weight')].replace('.', '_')}"
        if f"{name}.lora_down.weight" in lora:
            down, up = lora[f"{name}.lora_down.weight"], lora[f"{name}.lora_up.weight"]
            alpha = lora.get(f"{name}.alpha", torch.tensor(float(down.shape[0]))).item()
            out[key] = out[key] + ratio * alpha / down.shape[0] * (up @ down)
    return out


def _meta(path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def test_merge_equals_hand_merge_in_fp32(h, write, tmp_path):
    base = h.tiny_flux_sd()
    lora_a = h.make_lora(base, DOUBLE_KEYS, "lora_unet", rank=2, alpha=1.0, seed=1)
    lora_b = h.make_lora(base, DOUBLE_KEYS[:2], "lora_unet", rank=4, alpha=None, seed=2)
    paths = [write("flux.safetensors", base), write("a.safetensors", lora_a, {"modelspec.title": "style A"}),
             write("b.safetensors", lora_b)]
    out = tmp_path / "merged.safetensors"
    assert main(["--flux_model", str(paths[0]), "--models", str(paths[1]), str(paths[2]), "--ratios", "0.7", "-1.5",
                 "--save_to", str(out)]) == 0
    got = load_file(str(out))
    expected = _hand_merge(_hand_merge(base, lora_a, "lora_unet", 0.7), lora_b, "lora_unet", -1.5)
    assert set(got) == set(base)
    for key in base:
        assert got[key].dtype == torch.float32
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-6, msg=key)
        if key not in DOUBLE_KEYS:
            assert torch.equal(got[key], base[key])
    meta = _meta(out)
    assert meta["modelspec.architecture"] == "flux-1-dev"
    assert meta["modelspec.merged_from"] == "style A, b" == meta["ss_merged_from"]


def test_prefixed_base_keeps_prefix_and_dtype(h, write, tmp_path):
    base = h.tiny_flux_sd(depth=2, dev=False)
    lora = h.make_lora(base, ["double_blocks.1.img_attn.proj.weight", "single_blocks.0.linear2.weight"], "lora_unet")
    prefixed = {h.PREFIX + k: v.to(torch.bfloat16) for k, v in base.items()}
    base_path, lora_path = write("flux.safetensors", prefixed), write("l.safetensors", lora)
    out = tmp_path / "m.safetensors"
    main(["--flux_model", str(base_path), "--models", str(lora_path), "--save_to", str(out)])
    got = load_file(str(out))
    assert set(got) == set(prefixed)  # prefix kept; sd-scripts matched nothing here (§12.32)
    assert {v.dtype for v in got.values()} == {torch.bfloat16}  # base dtype, not fp32
    expected = _hand_merge({k: v.to(torch.bfloat16).float() for k, v in base.items()}, lora, "lora_unet", 1.0)
    key = "single_blocks.0.linear2.weight"
    torch.testing.assert_close(got[h.PREFIX + key], expected[key].to(torch.bfloat16))
    assert not torch.equal(got[h.PREFIX + key], prefixed[h.PREFIX + key])
    assert _meta(out)["modelspec.architecture"] == "flux-1-schnell"
    main(["--flux_model", str(base_path), "--models", str(lora_path), "--save_to", str(out), "--save_precision", "fp16"])
    assert {v.dtype for v in load_file(str(out)).values()} == {torch.float16}


def test_diffusers_lora_covers_all_19_double_blocks(h, write, tmp_path):
    base = h.tiny_flux_sd()
    keys = [f"double_blocks.{i}.img_attn.qkv.weight" for i in range(19)] + ["single_blocks.1.linear1.weight"]
    kohya = h.make_lora(base, keys, "lora_unet", rank=2, alpha=4.0, seed=3)
    diffusers_lora = kohya_to_diffusers(kohya)
    assert "transformer.transformer_blocks.18.attn.to_v.lora_A.weight" in diffusers_lora
    paths = write("flux.safetensors", base), write("d.safetensors", diffusers_lora)
    out = tmp_path / "m.safetensors"
    main(["--flux_model", str(paths[0]), "--models", str(paths[1]), "--save_to", str(out), "--diffusers"])
    got = load_file(str(out))
    for i in range(19):
        key = f"double_blocks.{i}.img_attn.qkv.weight"
        # the q, k, v deltas land in their row bands of the fused weight
        for j, part in enumerate(("to_q", "to_k", "to_v")):
            p = f"transformer.transformer_blocks.{i}.attn.{part}"
            delta = diffusers_lora[f"{p}.lora_B.weight"] @ diffusers_lora[f"{p}.lora_A.weight"]
            rows = slice(j * h.HIDDEN, (j + 1) * h.HIDDEN)
            torch.testing.assert_close(got[key][rows], base[key][rows] + delta, rtol=1e-5, atol=1e-6)
    expected = _hand_merge(base, kohya, "lora_unet", 1.0)["single_blocks.1.linear1.weight"]
    torch.testing.assert_close(got["single_blocks.1.linear1.weight"], expected, rtol=1e-5, atol=1e-6)


def test_text_encoders_merge_with_their_own_outputs(h, write, tmp_path):
    flux, clip, t5 = h.tiny_flux_sd(depth=1, single=1), h.clip_sd(), h.t5_sd()
    lora = h.make_lora(flux, ["double_blocks.0.img_mlp.0.weight"], "lora_unet")
    lora |= h.make_lora(clip, ["text_model.encoder.layers.1.self_attn.k_proj.weight", "text_model.encoder.layers.0.mlp.fc1.weight"],
                        "lora_te1", alpha=0.5, seed=4)
    lora |= h.make_lora(t5, ["encoder.block.1.layer.1.DenseReluDense.wi_1.weight"], "lora_te3", rank=3, seed=5)
    p = {n: write(f"{n}.safetensors", sd) for n, sd in [("flux", flux), ("clip", clip), ("t5", t5), ("lora", lora)]}
    outs = {n: tmp_path / f"out_{n}.safetensors" for n in ("flux", "clip", "t5")}
    main(["--flux_model", str(p["flux"]), "--clip_l", str(p["clip"]), "--t5xxl", str(p["t5"]), "--models", str(p["lora"]),
          "--ratios", "0.5", "--save_to", str(outs["flux"]), "--clip_l_save_to", str(outs["clip"]),
          "--t5xxl_save_to", str(outs["t5"])])
    for name, sd, prefix in [("flux", flux, "lora_unet"), ("clip", clip, "lora_te1"), ("t5", t5, "lora_te3")]:
        got, expected = load_file(str(outs[name])), _hand_merge(sd, lora, prefix, 0.5)
        assert set(got) == set(sd)
        changed = [k for k in sd if not torch.equal(got[k], sd[k])]
        assert changed, name
        for key in sd:
            torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-6)
    with pytest.raises(ConfigError, match="--clip_l_save_to"):
        main(["--clip_l", str(p["clip"]), "--models", str(p["lora"])])


def test_unmatched_modules_are_an_error_unless_ignored(h, write, tmp_path):
    base = h.tiny_flux_sd(depth=2, single=1)
    other = h.tiny_flux_sd(depth=4, single=1)  # a LoRA trained for a deeper model
    lora = h.make_lora(other, ["double_blocks.3.img_attn.proj.weight", "double_blocks.0.img_attn.proj.weight"], "lora_unet")
    paths = write("flux.safetensors", base), write("l.safetensors", lora)
    out = tmp_path / "m.safetensors"
    with pytest.raises(CheckpointError, match="1 LoRA module.*lora_unet_double_blocks_3_img_attn_proj"):
        main(["--flux_model", str(paths[0]), "--models", str(paths[1]), "--save_to", str(out)])
    assert not out.exists()
    not_linear = write("n.safetensors", lora | {"lora_unet_final_layer_norm.lora_down.weight": torch.ones(2, 4),
                                                 "lora_unet_final_layer_norm.lora_up.weight": torch.ones(4, 2)})
    with pytest.raises(CheckpointError, match="lora_unet_final_layer_norm.*--ignore_unmatched"):
        main(["--flux_model", str(paths[0]), "--models", str(not_linear), "--save_to", str(out)])
    paths = paths[0], not_linear
    main(["--flux_model", str(paths[0]), "--models", str(paths[1]), "--save_to", str(out), "--ignore_unmatched"])
    key = "double_blocks.0.img_attn.proj.weight"
    torch.testing.assert_close(load_file(str(out))[key], _hand_merge(base, lora, "lora_unet", 1.0)[key])


def test_bad_inputs_give_clear_errors(h, write, tmp_path, monkeypatch):
    base = h.tiny_flux_sd(depth=1, single=1)
    wide = {k: torch.zeros(v.shape[0], 2 * v.shape[1]) for k, v in base.items() if k == "img_in.weight"}
    lora = h.make_lora(wide, ["img_in.weight"], "lora_unet")
    paths = write("flux.safetensors", base), write("l.safetensors", lora)
    with pytest.raises(CheckpointError, match="img_in.weight"):
        main(["--flux_model", str(paths[0]), "--models", str(paths[1]), "--save_to", str(tmp_path / "x.safetensors")])
    with pytest.raises(ConfigError, match="--ratios has 2 value"):
        main(["--flux_model", str(paths[0]), "--models", str(paths[1]), "--ratios", "1", "2", "--save_to", "x"])
    pickle = tmp_path / "lora.pt"
    torch.save({}, pickle)
    with pytest.raises(CheckpointError, match="pickle"):
        main(["--flux_model", str(paths[0]), "--models", str(pickle), "--save_to", "x.safetensors"])
    with pytest.raises(CheckpointError, match="not found"):
        main(["--flux_model", str(tmp_path / "missing.safetensors"), "--models", str(paths[1]), "--save_to", "x"])
    with pytest.raises(CheckpointError, match="expects a FLUX transformer"):
        main(["--flux_model", str(paths[1]), "--models", str(paths[1]), "--save_to", "x"])
    # the command line turns these into exit code 2 with a one-line message
    assert cli_main(["merge", "--models", str(pickle), "--save_to", "x.safetensors"]) == 2
    # --save_to without a directory component works (sd-scripts failed)
    monkeypatch.chdir(tmp_path)
    good = h.make_lora(base, ["img_in.weight"], "lora_unet")
    main(["--flux_model", str(paths[0]), "--models", str(write("g.safetensors", good)), "--save_to", "plain.safetensors"])
    assert (tmp_path / "plain.safetensors").is_file()


def test_lora_lora_merge_is_linear_in_ratio(h, write, tmp_path):
    base = h.tiny_flux_sd(depth=1, single=1)
    lora = h.make_lora(base, DOUBLE_KEYS[:1] + ["single_blocks.0.linear2.weight"], "lora_unet", rank=4, alpha=2.0)
    path, out = write("a.safetensors", lora), tmp_path / "m.safetensors"
    main(["--models", str(path), "--ratios", "-0.5", "--save_to", str(out)])
    got, ref = effective_deltas(load_file(str(out))), effective_deltas(lora)
    for name in ref:  # sd-scripts would give ratio·|ratio| = -0.25
        torch.testing.assert_close(got[name], -0.5 * ref[name], rtol=1e-5, atol=1e-6)
    meta = _meta(out)
    assert meta["ss_network_module"] == "networks.lora_flux"
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2.0"
    assert meta["modelspec.architecture"] == "flux-1-dev/lora" and meta["ss_merged_from"] == "a"
    assert len(meta["sshs_model_hash"]) == 64 and len(meta["sshs_legacy_hash"]) == 8


def test_concat_keeps_the_effective_scale(h, write, tmp_path):
    base = h.tiny_flux_sd(depth=1, single=1)
    keys = ["double_blocks.0.img_attn.proj.weight", "single_blocks.0.modulation.lin.weight"]
    a = h.make_lora(base, keys, "lora_unet", rank=2, alpha=1.0, seed=1)
    b = h.make_lora(base, keys[:1] + ["img_in.weight"], "lora_unet", rank=3, alpha=12.0, seed=2)
    pa, pb = write("a.safetensors", a), write("b.safetensors", b)
    for extra in ([], ["--shuffle"]):
        out = tmp_path / "c.safetensors"
        main(["--models", str(pa), str(pb), "--ratios", "0.8", "-0.3", "--concat", "--save_to", str(out), *extra])
        merged = load_file(str(out))
        got, da, db = effective_deltas(merged), effective_deltas(a), effective_deltas(b)
        assert set(got) == set(da) | set(db)
        for name in got:
            expected = 0.8 * da.get(name, 0) + -0.3 * db.get(name, 0)
            torch.testing.assert_close(got[name], expected, rtol=1e-5, atol=1e-5)
        assert merged["lora_unet_double_blocks_0_img_attn_proj.lora_down.weight"].shape[0] == 5
        assert _meta(out)["ss_network_dim"] == "Dynamic"
    with pytest.raises(CheckpointError, match="use --concat"):
        main(["--models", str(pa), str(pb), "--save_to", str(tmp_path / "s.safetensors")])


def test_sum_merge_of_equal_ranks(h, write, tmp_path):
    base = h.tiny_flux_sd(depth=1, single=1)
    a = h.make_lora(base, ["img_in.weight"], "lora_unet", rank=2, alpha=2.0, seed=1)
    b = {k: v * 0 if k.endswith("up.weight") else v for k, v in h.make_lora(base, ["img_in.weight"], "lora_unet",
                                                                                 rank=2, alpha=8.0, seed=2).items()}
    out = tmp_path / "s.safetensors"
    main(["--models", str(write("a.safetensors", a)), str(write("b.safetensors", b)), "--ratios", "1.5", "1",
          "--save_to", str(out), "--save_precision", "bf16"])
    merged = load_file(str(out))
    assert merged["lora_unet_img_in.alpha"].dtype == torch.bfloat16
    assert merged["lora_unet_img_in.alpha"].item() == 2.0  # alpha of the first file
    # summed factors: (√1.5·d_a + 2·d_b)(√1.5·u_a + 0), scaled by alpha_a/rank = 1 — worked out by hand
    d = 1.5 ** 0.5 * a["lora_unet_img_in.lora_down.weight"] + 2 * b["lora_unet_img_in.lora_down.weight"]
    u = 1.5 ** 0.5 * a["lora_unet_img_in.lora_up.weight"]
    torch.testing.assert_close(effective_deltas(merged)["lora_unet_img_in"], u @ d, rtol=2e-2, atol=2e-2)


def test_streaming_writer_reads_back_with_safetensors(tmp_path):
    from fluxlora.models.checkpoints import read_header
    from fluxlora.tools.merge import save_streaming

    g = torch.Generator().manual_seed(0)
    tensors = {"b.weight": torch.randn(3, 5, generator=g).to(torch.bfloat16), "a.alpha": torch.tensor(2.0),
               "c": torch.randn(7, generator=g).to(torch.float8_e4m3fn), "d": torch.arange(5, dtype=torch.int64),
               "e": torch.randn(2, 2, generator=g).t()}  # non-contiguous
    path = tmp_path / "s.safetensors"
    save_streaming(path, tensors, {"k": "v"})
    got = load_file(str(path))
    assert set(got) == set(tensors)
    for key, value in tensors.items():
        assert got[key].dtype == value.dtype and torch.equal(got[key].reshape(-1).view(torch.uint8), value.reshape(-1).view(torch.uint8))
    assert _meta(path) == {"k": "v"}
    assert read_header(path).data_start % 8 == 0


def test_tiny_real_format_checkpoints_every_linear(tiny_ckpts, h, write, tmp_path):
    """The shared tiny FLUX / CLIP-L / T5 files: a LoRA on every 2-D weight of all three merges like the hand merge."""
    bases = {"lora_unet": load_file(str(tiny_ckpts.flux_dev)), "lora_te1": load_file(str(tiny_ckpts.clip_l)),
             "lora_te3": load_file(str(tiny_ckpts.t5xxl))}
    lora: dict[str, torch.Tensor] = {}
    for i, (prefix, sd) in enumerate(bases.items()):
        keys = [k for k, v in sd.items() if k.endswith(".weight") and v.dim() == 2 and "embed" not in k
                and "relative_attention_bias" not in k and k.startswith(("double_blocks", "single_blocks", "text_model.encoder", "encoder.block"))]
        lora |= h.make_lora(sd, keys, prefix, rank=2, alpha=0.5, seed=10 + i)
    outs = [tmp_path / f"{n}.safetensors" for n in ("flux", "clip", "t5")]
    main(["--flux_model", str(tiny_ckpts.flux_dev), "--clip_l", str(tiny_ckpts.clip_l), "--t5xxl", str(tiny_ckpts.t5xxl),
          "--models", str(write("all.safetensors", lora)), "--ratios", "0.9", "--save_to", str(outs[0]),
          "--clip_l_save_to", str(outs[1]), "--t5xxl_save_to", str(outs[2])])
    for out, (prefix, sd) in zip(outs, bases.items(), strict=True):
        got, expected = load_file(str(out)), _hand_merge(sd, lora, prefix, 0.9)
        assert set(got) == set(sd) and sum(not torch.equal(got[k], sd[k]) for k in sd) > 5
        for key in sd:
            assert got[key].dtype == sd[key].dtype
            torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-5, msg=key)
