"""The dataset option table is the one declaration: flags, TOML schema, typed classes and caching rules follow it."""

from __future__ import annotations

import dataclasses

import pytest

from fluxlora.config.args import build_parser, flag_actions
from fluxlora.config.dataset_options import (
    DATASET_OPTIONS,
    OPTIONS,
    DatasetConfig,
    DatasetFlags,
    SubsetConfig,
    cache_conflicts,
)
from fluxlora.config.dataset_schema import DATASET, GENERAL, SUBSET, Problems, read_table
from fluxlora.config.train_config import check_caching_conflicts, parse_train_config
from fluxlora.data.captions import CaptionOptions, caching_blockers
from fluxlora.errors import ConfigError

SAMPLE = {"bool": True, "int": 3, "pos_int": 3, "nonneg_int": 3, "float": 0.5, "nonneg_float": 0.5, "fraction": 0.5,
          "str": "x", "path": "some/dir", "interpolation": "lanczos", "resolution": [512, 256], "range": [0.1, 0.5],
          "table": {"a": 1}}
ON = {"bool": True, "fraction": 0.25, "nonneg_int": 2, "nonneg_float": 10.0}  # a value that switches an option on


def test_every_row_with_a_flag_is_a_training_flag_with_the_table_default():
    parser = build_parser()
    actions = flag_actions(parser)
    for option in DATASET_OPTIONS:
        if option.flag_name is None:
            assert option.name not in actions or option.name == "network_multiplier", option.name
            continue
        assert option.flag_name in actions, option.name
        expected = False if option.kind == "bool" and option.default is None else option.default
        assert parser.sd_defaults[option.flag_name] == expected, option.name
        assert (actions[option.flag_name].nargs == 0) == (option.kind == "bool"), option.name


def test_the_dataset_flag_group_holds_only_table_rows():
    group = next(g for g in build_parser()._action_groups if g.title.startswith("dataset"))
    flags = {a.dest for a in group._group_actions}
    assert flags - {o.flag_name for o in DATASET_OPTIONS} == {"caption_extention"}  # sd-scripts' old spelling


@pytest.mark.parametrize("option", [o for o in DATASET_OPTIONS if o.levels], ids=lambda o: o.name)
def test_every_toml_key_is_accepted_exactly_at_its_levels(option):
    for level in (GENERAL, DATASET, SUBSET):
        problems = Problems("test")
        table = read_table({option.name: SAMPLE[option.kind]}, level, "t", problems)
        if level in option.levels:
            assert problems.items == [] and option.name in table, (level, problems.items)
        else:
            assert problems.items and "not allowed here" in problems.items[0][1], (level, problems.items)


def test_command_line_only_rows_are_refused_in_the_toml():
    for option in (o for o in DATASET_OPTIONS if not o.levels):
        problems = Problems("test")
        read_table({option.name: SAMPLE[option.kind]}, SUBSET, "s", problems)
        assert problems.items and "unknown key" in problems.items[0][1], option.name


def test_the_typed_classes_take_their_fields_and_defaults_from_the_table():
    flags = {f.name: f for f in dataclasses.fields(DatasetFlags)}
    assert list(flags) == [o.flag_name for o in DATASET_OPTIONS if o.flag_name]
    for option in DATASET_OPTIONS:
        for cls in (SubsetConfig, DatasetConfig, CaptionOptions):
            found = {f.name: f for f in dataclasses.fields(cls)}.get(option.name)
            if found is not None and option.kind != "table" and option.name not in ("resolution", "image_dir"):  # required
                assert found.default == option.default, (cls.__name__, option.name)
    assert SubsetConfig(key="k", image_dir=None).num_repeats == OPTIONS["num_repeats"].default
    assert DatasetConfig(key="k", subsets=(), resolution=(64, 64)).bucket_reso_steps == 64


CACHE_ROWS = [o for o in DATASET_OPTIONS if o.cache]


@pytest.mark.parametrize("option", CACHE_ROWS, ids=lambda o: o.name)
def test_one_caching_rule_per_option_from_flag_toml_and_caption(option, base):
    caching = "--cache_latents" if option.cache == "latents" else "--cache_text_encoder_outputs"
    value = ON[option.kind]
    flag = [f"--{option.name}"] if option.kind == "bool" else [f"--{option.name}", str(value)]
    with pytest.raises(ConfigError) as err:  # on the command line
        parse_train_config([*base, caching, "--network_train_unet_only", *flag])
    assert f"--{option.name}" in str(err.value) and caching in str(err.value)
    cfg = parse_train_config([*base, caching, "--network_train_unet_only"])
    with pytest.raises(ConfigError) as err:  # in a dataset TOML subset
        check_caching_conflicts(cfg, [{"key": "datasets[0].subsets[0]", option.name: value}])
    assert f"datasets[0].subsets[0].{option.name}" in str(err.value) and caching in str(err.value)
    found = cache_conflicts({option.name: value}, cache_latents=True, cache_text_encoder_outputs=True)
    assert [c.name for c in found] == [option.name] and found[0].why == option.why
    if option.cache == "text":  # the caption pipeline asks the same rule
        assert caching_blockers(CaptionOptions(**{option.name: value})) == [option.name]
    assert cache_conflicts({option.name: value}, cache_latents=False, cache_text_encoder_outputs=False) == []
