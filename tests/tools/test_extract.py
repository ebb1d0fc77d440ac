"""flux_extract_lora: SVD LoRA from an original and a tuned model (spec §10.1, fixes of §12.33)."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from fluxlora.errors import CheckpointError, ConfigError
from fluxlora.network.formats import effective_deltas
from fluxlora.tools.extract import main, quantile, svd_lora
from fluxlora.tools.merge import main as merge_main

LORA_KEYS = ["double_blocks.0.img_attn.qkv.weight", "double_blocks.1.txt_mlp.0.weight", "single_blocks.0.linear1.weight",
             "single_blocks.1.modulation.lin.weight"]


def _meta(path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def _expected_names(sd: dict) -> set[str]:
    """Block Linear weights, written out independently: 10 per double block, 3 per single block (spec §5.1)."""
    double = ["img_mod_lin", "txt_mod_lin", "img_attn_qkv", "txt_attn_qkv", "img_attn_proj", "txt_attn_proj",
              "img_mlp_0", "img_mlp_2", "txt_mlp_0", "txt_mlp_2"]
    n_double = len({k.split(".")[1] for k in sd if k.startswith("double_blocks.")})
    n_single = len({k.split(".")[1] for k in sd if k.startswith("single_blocks.")})
    return ({f"lora_unet_double_blocks_{i}_{m}" for i in range(n_double) for m in double}
            | {f"lora_unet_single_blocks_{i}_{m}" for i in range(n_single) for m in ("linear1", "linear2", "modulation_lin")})


def test_extract_of_merge_reproduces_the_lora_delta(h, write, tmp_path):
    """Acceptance: extract(merge(base, L)) gives back L's delta to SVD precision at full rank."""
    base = h.tiny_flux_sd(depth=2, single=2)
    lora = h.make_lora(base, LORA_KEYS, "lora_unet", rank=3, alpha=6.0, seed=7)
    base_path, lora_path = write("org.safetensors", base), write("l.safetensors", lora)
    tuned_path, out = tmp_path / "tuned.safetensors", tmp_path / "extracted.safetensors"
    merge_main(["--flux_model", str(base_path), "--models", str(lora_path), "--save_to", str(tuned_path)])
    assert main(["--model_org", str(base_path), "--model_tuned", str(tuned_path), "--save_to", str(out),
                 "--dim", "64", "--clamp_quantile", "1.0"]) == 0
    extracted = load_file(str(out))
    got, want = effective_deltas(extracted), effective_deltas(lora)
    assert set(got) == _expected_names(base)
    for name, delta in got.items():
        expected = want.get(name, torch.zeros_like(delta))
        torch.testing.assert_close(delta, expected, rtol=1e-4, atol=2e-5, msg=name)
    # alpha = rank of each module as a float tensor (scale 1), never int64
    alpha = extracted["lora_unet_single_blocks_0_linear1.alpha"]
    assert alpha.dtype == torch.float32 and alpha.item() == 16.0  # min(64, out, in=16)
    meta = _meta(out)  # every weight has a side of 16, so every rank is 16: metadata says what the tensors hold
    assert meta["ss_network_dim"] == "16" and meta["ss_network_alpha"] == "16.0"


def test_rank_dim_equals_lora_rank_and_metadata_agree(h, write, tmp_path):
    base = h.tiny_flux_sd(depth=1, single=1, dev=False)
    lora = h.make_lora(base, LORA_KEYS[:1] + ["single_blocks.0.linear2.weight"], "lora_unet", rank=3, alpha=1.0, seed=8)
    tuned = {k: v.clone() for k, v in base.items()}
    for name, delta in effective_deltas(lora).items():
        key = name[len("lora_unet_"):].replace("double_blocks_0_img_attn_qkv", "double_blocks.0.img_attn.qkv")
        key = key.replace("single_blocks_0_linear2", "single_blocks.0.linear2") + ".weight"
        tuned[key] = tuned[key] + delta
    prefixed = {h.PREFIX + k: v for k, v in tuned.items()}  # prefix on one side only
    org_path, tuned_path = write("org.safetensors", base), write("tuned.safetensors", prefixed)
    out = tmp_path / "x.safetensors"
    main(["--model_org", str(org_path), "--model_tuned", str(tuned_path), "--save_to", str(out), "--dim", "3",
          "--clamp_quantile", "1", "--save_precision", "bf16"])
    sd = load_file(str(out))
    assert all(v.dtype == torch.bfloat16 for v in sd.values())
    assert {sd[k].item() for k in sd if k.endswith(".alpha")} == {3.0}
    meta = _meta(out)
    assert meta["ss_network_dim"] == "3" and meta["ss_network_alpha"] == "3.0"
    assert meta["ss_network_module"] == "networks.lora_flux"
    assert meta["modelspec.architecture"] == "flux-1-schnell/lora" and meta["modelspec.title"] == "x"
    got, want = effective_deltas(sd), effective_deltas(lora)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=2e-2, atol=2e-2)  # bf16 storage
    assert not any(k.startswith("lora_unet_" + h.PREFIX.replace(".", "_")) for k in sd)


def test_svd_lora_and_clamp():
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(12, 3, generator=g) @ torch.randn(3, 10, generator=g)
    up, down = svd_lora(delta, 3, 1.0)
    assert up.shape == (12, 3) and down.shape == (3, 10)
    torch.testing.assert_close(up @ down, delta, rtol=1e-5, atol=1e-5)
    up, down = svd_lora(delta, 8, 0.9)
    assert up.shape == (12, 8)  # rank = min(dim, out, in) = 8
    hi = torch.quantile(torch.cat([u.flatten() for u in svd_lora(delta, 8, 1.0)]), 0.9)
    assert up.abs().max() <= hi + 1e-6 and down.abs().max() <= hi + 1e-6
    values = torch.randn(1001, generator=g)
    for q in (0.0, 0.5, 0.99, 0.999, 1.0):
        torch.testing.assert_close(quantile(values, q), torch.quantile(values, q))


def test_bad_inputs(h, write, tmp_path):
    base = h.tiny_flux_sd(depth=1, single=1)
    other = h.tiny_flux_sd(depth=1, single=1)
    other["double_blocks.0.img_mlp.0.weight"] = torch.zeros(8, h.HIDDEN)
    org, bad = write("org.safetensors", base), write("bad.safetensors", other)
    out = str(tmp_path / "o.safetensors")
    with pytest.raises(CheckpointError, match="double_blocks.0.img_mlp.0.weight"):
        main(["--model_org", str(org), "--model_tuned", str(bad), "--save_to", out])
    missing = {k: v for k, v in base.items() if k != "single_blocks.0.linear2.weight"}
    with pytest.raises(CheckpointError, match="single_blocks.0.linear2.weight.*missing"):
        main(["--model_org", str(org), "--model_tuned", str(write("m.safetensors", missing)), "--save_to", out])
    with pytest.raises(ConfigError, match="--dim"):
        main(["--model_org", str(org), "--model_tuned", str(org), "--save_to", out, "--dim", "0"])
    with pytest.raises(CheckpointError, match="pickle"):
        main(["--model_org", str(tmp_path / "org.ckpt"), "--model_tuned", str(org), "--save_to", out])
    with pytest.raises(SystemExit):  # argparse: --model_org is required
        main(["--model_tuned", str(org), "--save_to", out])
