"""LyCORIS' `--network_args` (lycoris.kohya) and `dora_wd` for networks.lora_flux: parsing, presets, factorization."""

from __future__ import annotations

import logging

import pytest
from lycoris.functional.general import factorization as lycoris_factorization
from network_helpers import small_flux, tiny_clip, tiny_t5

from fluxlora.config.network_args import parse_network_args
from fluxlora.errors import ConfigError
from fluxlora.network.lokr import factorization, lokr_layout
from fluxlora.network.lora import create_network

LYCORIS = "lycoris.kohya"


def test_lycoris_keys_are_typed():
    args = parse_network_args(["algo=LoKr", "factor=16", "decompose_both=True", "full_matrix=false", "dora_wd=True",
                               "wd_on_output=False", "rank_dropout=0.1", "module_dropout=0.2", "preset=attn-only"],
                              network_module=LYCORIS)
    spec = args.adapter
    assert (spec.algo, spec.factor, spec.decompose_both, spec.full_matrix, spec.dora_wd, spec.wd_on_output) == (
        "lokr", 16, True, False, True, False)
    assert spec.lycoris and spec.preset.name == "attn-only" and not spec.plain_lora
    assert (args.rank_dropout, args.module_dropout) == (0.1, 0.2)
    assert args.raw["algo"] == "LoKr"  # ss_network_args keeps what the user wrote
    assert parse_network_args(["algo=locon"], network_module=LYCORIS).adapter.plain_lora
    assert parse_network_args([], network_module=LYCORIS).adapter.algo == "lora"


@pytest.mark.parametrize(("args", "module", "message"), [
    (["algo=lokr"], None, "'algo' is not a known key of networks.lora_flux"),
    (["split_qkv=True"], LYCORIS, "'split_qkv' is not a known key of lycoris.kohya"),
    (["algo=dylora"], LYCORIS, "algo='dylora' is a LyCORIS algorithm fluxlora does not train"),
    (["algo=lokr", "factor=0"], LYCORIS, "factor"),
    (["algo=lokr", "dora_wd=maybe"], LYCORIS, "dora_wd"),
    (["preset=unet-convblock-only"], LYCORIS, "selects no FLUX layer"),
    (["preset=missing.toml"], LYCORIS, "neither a built-in preset"),
    (["dora_wd=True", "split_qkv=True"], None, "split_qkv=True is a plain-LoRA option"),
    (["dora_wd=True", "ggpo_sigma=0.1", "ggpo_beta=0.1"], None, "LoRA-GGPO"),
])
def test_bad_combinations_are_one_clear_error(args, module, message):
    with pytest.raises(ConfigError, match=message):
        parse_network_args(args, network_module=module)


def test_dropout_flag_counts_as_neuron_dropout():
    with pytest.raises(ConfigError, match="--network_dropout 0.1: neuron dropout is not defined for algo=lokr"):
        parse_network_args(["algo=lokr"], network_dropout=0.1, network_module=LYCORIS)
    assert parse_network_args(["algo=lokr"], network_dropout=0.0, network_module=LYCORIS).dropout == 0.0


def test_conv_only_keys_warn_and_output_axis_dora_warns(caplog):
    with caplog.at_level(logging.WARNING):
        parse_network_args(["algo=lokr", "use_tucker=True", "conv_dim=8"], network_module=LYCORIS)
        create_network(1.0, 2, 1, small_flux(), [], network_args=["dora_wd=True"])
    text = caplog.text
    assert "use_tucker has no effect" in text and "conv_dim/conv_alpha have no effect" in text
    assert "ComfyUI PR #15458" in text and "wd_on_output=False" in text


@pytest.mark.parametrize("dimension", [3, 24, 37, 64, 96, 128, 360, 3072, 9216, 12288, 15360, 21504])
@pytest.mark.parametrize("factor", [-1, 1, 2, 4, 8, 16, 32])
def test_factorization_equals_lycoris(dimension, factor):
    assert factorization(dimension, factor) == lycoris_factorization(dimension, factor)


def test_lokr_layout_for_flux_widths():
    # FLUX.1 double-block qkv: 9216 x 3072; factor 16 splits both sides by 16; a huge dim forces full matrices
    lay = lokr_layout(9216, 3072, 4, factor=16)
    assert (lay.a, lay.b, lay.c, lay.d, lay.w1_rank, lay.w2_rank) == (16, 16, 576, 192, None, 4)
    assert lokr_layout(9216, 3072, 100000, factor=16).full
    assert lokr_layout(3072, 3072, 4).a == 48  # factor -1: the most balanced split, 48 x 64


def test_preset_toml_names_and_exclusions(tmp_path):
    preset = tmp_path / "mine.toml"
    preset.write_text('unet_target_module = []\nunet_target_name = ["double_blocks.*img_attn.*"]\n'
                      'exclude_name = ["double_blocks.1.*"]\ntext_encoder_target_module = []\n', encoding="utf-8")
    network = create_network(1.0, 2, 1, small_flux(), [tiny_clip(), None],
                             network_args=["algo=loha", f"preset={preset}"], network_module=LYCORIS)
    assert sorted(m.lora_name for m in network.loras) == [
        "lora_unet_double_blocks_0_img_attn_proj", "lora_unet_double_blocks_0_img_attn_qkv"]
    bad = tmp_path / "bad.toml"
    bad.write_text('[module_algo_map.SelfAttention]\nalgo = "lokr"\n', encoding="utf-8")
    with pytest.raises(ConfigError, match="module_algo_map is not supported"):
        parse_network_args([f"preset={bad}"], network_module=LYCORIS)
    empty = tmp_path / "empty.toml"
    empty.write_text("unet_target_module = []\ntext_encoder_target_module = []\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="the network has no module"):
        create_network(1.0, 2, 1, small_flux(), [], network_args=[f"preset={empty}"], network_module=LYCORIS)


def test_t5_modules_follow_train_t5xxl_whatever_the_preset():
    network = create_network(1.0, 2, 1, small_flux(), [tiny_clip(), tiny_t5()], network_module=LYCORIS,
                             network_args=["algo=lokr", "factor=2", "preset=attn-only", "train_t5xxl=True"])
    names = [m.lora_name for m in network.loras]
    assert any(n.startswith("lora_te3_encoder_block_0_layer_1_DenseReluDense") for n in names)
    assert not any("single_blocks" in n or "_mlp_" in n for n in names)
