"""`--network_args` parsing: every key of spec §5.3 with good and bad values (table-driven)."""

from __future__ import annotations

import re

import pytest

from fluxlora.config.network_args import VALID_KEYS, last_match, parse_network_args
from fluxlora.errors import ConfigError

# (entry, attribute, expected value) — expected values written by hand from the spec / guide.
GOOD = [
    ("img_attn_dim=8", "type_dims", {"img_attn_dim": 8}),
    ("txt_attn_dim=0", "type_dims", {"txt_attn_dim": 0}),
    ("img_mlp_dim=2", "type_dims", {"img_mlp_dim": 2}),
    ("txt_mlp_dim=3", "type_dims", {"txt_mlp_dim": 3}),
    ("img_mod_dim=1", "type_dims", {"img_mod_dim": 1}),
    ("txt_mod_dim=16", "type_dims", {"txt_mod_dim": 16}),
    ("single_dim=4", "type_dims", {"single_dim": 4}),
    ("single_mod_dim=2", "type_dims", {"single_mod_dim": 2}),
    ("in_dims=[4,2,2,2,4]", "in_dims", (4, 2, 2, 2, 4)),
    ("in_dims=4, 0,0, 0,4", "in_dims", (4, 0, 0, 0, 4)),
    ("train_double_block_indices=0,1,8-12,18", "train_double_block_indices", frozenset({0, 1, 8, 9, 10, 11, 12, 18})),
    ("train_double_block_indices=all", "train_double_block_indices", None),
    ("train_single_block_indices=none", "train_single_block_indices", frozenset()),
    ("train_single_block_indices=", "train_single_block_indices", frozenset()),
    ("train_single_block_indices=3, 10 ,20-22", "train_single_block_indices", frozenset({3, 10, 20, 21, 22})),
    ("train_blocks=single", "train_blocks", "single"),
    ("train_blocks=Double", "train_blocks", "double"),
    ("split_qkv=True", "split_qkv", True),
    ("split_qkv=true", "split_qkv", True),
    ("split_qkv=1", "split_qkv", True),
    ("split_qkv=False", "split_qkv", False),
    ("split_qkv=0", "split_qkv", False),
    ("train_t5xxl=True", "train_t5xxl", True),
    ("verbose=true", "verbose", True),
    ("rank_dropout=0.1", "rank_dropout", 0.1),
    ("module_dropout=0.25", "module_dropout", 0.25),
    ("dropout=0.05", "dropout", 0.05),
    ("loraplus_lr_ratio=16", "loraplus_lr_ratio", 16.0),
    ("loraplus_unet_lr_ratio=4", "loraplus_unet_lr_ratio", 4.0),
    ("loraplus_text_encoder_lr_ratio=2.5", "loraplus_text_encoder_lr_ratio", 2.5),
    ("conv_dim=4", "conv_dim", 4),
    ("conv_alpha=1", "conv_alpha", 1.0),
]

BAD = [
    ("img_attn_dim=-1", "img_attn_dim"),
    ("img_attn_dim=4.5", "img_attn_dim"),
    ("single_mod_dim=abc", "single_mod_dim"),
    ("in_dims=[4,2,2,2]", "in_dims"),
    ("in_dims=[4,2,2,2,x]", "in_dims"),
    ("train_double_block_indices=0,a", "train_double_block_indices"),
    ("train_double_block_indices=5-2", "train_double_block_indices"),
    ("train_single_block_indices=-1", "train_single_block_indices"),
    ("train_blocks=middle", "train_blocks"),
    ("network_reg_dims=double_blocks", "network_reg_dims"),
    ("network_reg_dims=double_blocks=x", "network_reg_dims"),
    ("network_reg_dims=([=4", "network_reg_dims"),
    ("network_reg_lrs=single=abc", "network_reg_lrs"),
    ("network_reg_lrs=", "network_reg_lrs"),
    ("split_qkv=yes please", "split_qkv"),
    ("train_t5xxl=maybe", "train_t5xxl"),
    ("verbose=2", "verbose"),
    ("rank_dropout=1.0", "rank_dropout"),
    ("module_dropout=-0.1", "module_dropout"),
    ("dropout=nan", "dropout"),
    ("ggpo_sigma=abc", "ggpo_sigma"),
    ("ggpo_beta=-1", "ggpo_beta"),
    ("loraplus_lr_ratio=0", "loraplus_lr_ratio"),
    ("loraplus_unet_lr_ratio=-2", "loraplus_unet_lr_ratio"),
    ("loraplus_text_encoder_lr_ratio=inf", "loraplus_text_encoder_lr_ratio"),
    ("conv_dim=x", "conv_dim"),
]


@pytest.mark.parametrize(("entry", "attr", "expected"), GOOD)
def test_each_key_parses(entry: str, attr: str, expected) -> None:
    args = parse_network_args([entry])
    value = getattr(args, attr)
    if attr.startswith("train_") and attr.endswith("indices"):
        value = value.indices
    assert value == expected
    key = entry.split("=", 1)[0]
    assert args.raw[key] == entry.split("=", 1)[1]


@pytest.mark.parametrize(("entry", "key"), BAD)
def test_bad_values_name_the_key(entry: str, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_network_args([entry])
    assert key in str(err.value)
    assert "\n" not in str(err.value)
    assert err.value.key == key


def test_every_spec_key_is_in_the_tables() -> None:
    covered = {e.split("=", 1)[0] for e, *_ in GOOD} | {e.split("=", 1)[0] for e, _ in BAD}
    covered |= {"network_reg_dims", "network_reg_lrs", "ggpo_sigma", "ggpo_beta"}  # tested below
    assert set(VALID_KEYS) <= covered


def test_unknown_key_lists_valid_keys_and_suggests() -> None:
    with pytest.raises(ConfigError) as err:
        parse_network_args(["img_atn_dim=4"])
    message = str(err.value)
    assert "did you mean 'img_attn_dim'" in message
    assert all(k in message for k in VALID_KEYS)


def test_entry_without_equals_and_duplicates_are_errors() -> None:
    with pytest.raises(ConfigError, match="key=value"):
        parse_network_args(["split_qkv"])
    with pytest.raises(ConfigError, match="given twice"):
        parse_network_args(["rank_dropout=0.1", "rank_dropout=0.2"])


def test_regex_rules_parse_in_order_and_last_match_wins() -> None:
    args = parse_network_args(["network_reg_dims=double_blocks=8,double_blocks_1_=2", "network_reg_lrs=single=1e-4,attn=5e-5"])
    assert [(r.text, r.value) for r in args.network_reg_dims] == [("double_blocks", 8), ("double_blocks_1_", 2)]
    assert [(r.text, r.value) for r in args.network_reg_lrs] == [("single", 1e-4), ("attn", 5e-5)]
    # Documented semantics: the last matching pattern decides.
    assert last_match(args.network_reg_dims, "lora_unet_double_blocks_1_img_attn_qkv")[1].value == 2
    assert last_match(args.network_reg_dims, "lora_unet_double_blocks_0_img_attn_qkv")[1].value == 8
    assert last_match(args.network_reg_dims, "lora_unet_single_blocks_0_linear1") is None
    assert isinstance(args.network_reg_dims[0].pattern, re.Pattern)


def test_ggpo_needs_both_values() -> None:
    args = parse_network_args(["ggpo_sigma=0.03", "ggpo_beta=0.01"])
    assert (args.ggpo_sigma, args.ggpo_beta, args.ggpo) == (0.03, 0.01, True)
    for one in ("ggpo_sigma=0.03", "ggpo_beta=0.01"):
        with pytest.raises(ConfigError, match="needs both"):
            parse_network_args([one])


def test_network_dropout_is_used_and_recorded() -> None:
    args = parse_network_args(["rank_dropout=0.1"], network_dropout=0.2)
    assert args.dropout == 0.2
    assert args.raw == {"rank_dropout": "0.1", "dropout": "0.2"}
    # The CLI value wins over a dropout= entry (as in sd-scripts); the entry stays in the metadata.
    args = parse_network_args(["dropout=0.3"], network_dropout=0.2)
    assert args.dropout == 0.2 and args.raw["dropout"] == "0.3"
    with pytest.raises(ConfigError, match="--network_dropout"):
        parse_network_args([], network_dropout=1.5)


def test_loraplus_specific_ratio_overrides_general() -> None:
    args = parse_network_args(["loraplus_lr_ratio=16", "loraplus_unet_lr_ratio=4"])
    assert args.unet_plus_ratio == 4 and args.text_encoder_plus_ratio == 16


def test_dict_input_and_defaults() -> None:
    args = parse_network_args({"split_qkv": True, "in_dims": "[1,1,1,1,1]"})
    assert args.split_qkv is True and args.in_dims == (1, 1, 1, 1, 1)
    empty = parse_network_args(None)
    assert empty.train_blocks == "all" and empty.raw == {} and not empty.split_qkv and not empty.ggpo
