"""--config_file merging (flattened TOML, CLI wins) and --output_config (write, refuse to overwrite, round trip)."""

from __future__ import annotations

import math
import tomllib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fluxlora.config.config_file import (
    config_path,
    dumps_toml,
    load_config_file,
    maybe_write_output_config,
    write_output_config,
)
from fluxlora.config.train_config import describe_differences, parse_train_config
from fluxlora.errors import ConfigError


@pytest.fixture
def paths(tmp_path: Path) -> dict[str, Path]:
    names = {"flux": "flux1-dev.safetensors", "clip_l": "clip_l.safetensors", "t5xxl": "t5xxl_fp16.safetensors",
             "ae": "ae.safetensors", "dataset": "dataset.toml"}
    out = {key: tmp_path / name for key, name in names.items()}
    for path in out.values():
        path.write_bytes(b"x")
    out["out"] = tmp_path / "output"
    return out


def _write(tmp_path: Path, text: str, name: str = "args.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _model_table(paths: dict[str, Path]) -> str:
    return (f'[model]\npretrained_model_name_or_path = "{paths["flux"]}"\nclip_l = "{paths["clip_l"]}"\n'
            f't5xxl = "{paths["t5xxl"]}"\nae = "{paths["ae"]}"\n')


def test_tables_are_flattened_and_the_command_line_wins(tmp_path, paths):
    config = _write(tmp_path, _model_table(paths) + f'''
[dataset]
dataset_config = "{paths["dataset"]}"
resolution = "1024,768"
[training]
output_dir = "{paths["out"]}"
network_dim = 8
learning_rate = 1e-3
cache_latents = true
shuffle_caption = false
network_args = ["train_blocks=single", "split_qkv=True"]
text_encoder_lr = 5e-5
guidance_scale = 1
''')
    cfg = parse_train_config(["--config_file", str(config), "--learning_rate", "2e-4"])
    assert cfg.model.clip_l == paths["clip_l"]
    assert cfg.network.network_dim == 8
    assert cfg.optim.learning_rate == 2e-4  # command line wins
    assert cfg.caching.cache_latents and not cfg.dataset_flags.shuffle_caption
    assert cfg.network.network_args == ("train_blocks=single", "split_qkv=True")
    assert cfg.network.text_encoder_lr == (5e-5,)  # a scalar for a nargs='*' flag becomes one value
    assert cfg.flow.guidance_scale == 1.0 and isinstance(cfg.flow.guidance_scale, float)
    assert cfg.dataset_flags.resolution == (1024, 768)
    assert cfg.config_file == config
    # values from the file count as given: the start-up block does not claim them as our defaults
    assert "guidance_scale" not in describe_differences(cfg)
    assert {"network_dim", "guidance_scale", "clip_l"} <= cfg.explicit and "shuffle_caption" not in cfg.explicit


def test_toml_suffix_is_added_like_sd_scripts(tmp_path, paths):
    _write(tmp_path, "network_dim = 32\n", "recipe.toml")
    assert config_path(tmp_path / "recipe") == tmp_path / "recipe.toml"
    assert load_config_file(tmp_path / "recipe") == {"network_dim": 32}


def test_value_conversions(tmp_path):
    path = _write(tmp_path, '''
resolution = 1024
max_train_steps = 100.0
lr_warmup_steps = "10%"
blocks_to_swap = "auto"
bucket_reso_steps = 32
caption_extension = ".txt"
flip_aug = true
''')
    assert load_config_file(path) == {
        "resolution": "1024", "max_train_steps": 100, "lr_warmup_steps": 0.1, "blocks_to_swap": "auto",
        "bucket_reso_steps": 32, "caption_extension": ".txt", "flip_aug": True}
    assert load_config_file(_write(tmp_path, "resolution = [1024, 768]\n", "r.toml")) == {"resolution": "1024,768"}


def test_every_problem_is_reported_with_its_key(tmp_path):
    path = _write(tmp_path, '''
network_dim = 1.5
cache_latents = "yes"
mixed_precision = "fp32"
[a]
seed = 1
[b]
seed = 2
''')
    with pytest.raises(ConfigError) as err:
        load_config_file(path)
    message = str(err.value)
    assert "network_dim: expected an integer" in message
    assert "cache_latents: expected true or false" in message
    assert "mixed_precision: 'fp32' is not one of no, fp16, bf16" in message
    assert "seed is set twice ([a] and [b])" in message
    assert str(path) in message and "\n" not in message
    assert err.value.path == str(path) and err.value.key == "network_dim"


def test_nested_tables_and_self_reference_are_rejected(tmp_path):
    with pytest.raises(ConfigError, match="one table deep"):
        load_config_file(_write(tmp_path, "[a.b]\nseed = 1\n"))
    with pytest.raises(ConfigError, match="config_file cannot be set inside a config file"):
        load_config_file(_write(tmp_path, 'config_file = "x"\n', "c.toml"))


def test_missing_or_broken_file(tmp_path):
    with pytest.raises(ConfigError, match="--config_file .*missing.toml does not exist"):
        load_config_file(tmp_path / "missing")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config_file(_write(tmp_path, "seed = = 1\n"))


def _parse(config: Path, paths, *extra: str):
    return parse_train_config(["--config_file", str(config), "--dataset_config", str(paths["dataset"]),
                               "--output_dir", str(paths["out"]), *extra])


def test_gui_keys_and_accelerate_spellings_are_accepted_silently(tmp_path, paths):
    """kohya_ss writes `epoch`, `noise_offset_type` and accelerate's `dynamo_backend = "no"` for every run, and
    switches as 0/1; sd-scripts trains with that file, and so do we, without a word."""
    config = _write(tmp_path, _model_table(paths) + '''epoch = 1
noise_offset_type = "Original"
dynamo_backend = "no"
persistent_data_loader_workers = 1
wandb_run_name = "my-run"
''')
    cfg = _parse(config, paths)
    assert cfg.ignored == () and cfg.warnings == ()
    assert cfg.memory.dynamo_backend == "no" and not cfg.memory.torch_compile
    assert cfg.dataset_flags.persistent_data_loader_workers and cfg.logging.wandb_run_name == "my-run"
    upper = _write(tmp_path, _model_table(paths) + 'dynamo_backend = "INDUCTOR"\n', "upper.toml")
    assert _parse(upper, paths).memory.dynamo_backend == "inductor"
    compiled = _write(tmp_path, _model_table(paths) + 'dynamo_backend = "no"\ntorch_compile = true\n', "c.toml")
    cfg = _parse(compiled, paths)
    assert not cfg.memory.torch_compile and any("no compilation" in n for n in cfg.notes)


def test_unknown_config_key_is_a_warning_with_did_you_mean(tmp_path, paths):
    config = _write(tmp_path, _model_table(paths) + "network_dimm = 16\nloraplus_lr_ratio = 4\n")
    cfg = _parse(config, paths)
    assert cfg.network.network_dim == 4  # the typo changed nothing, as in sd-scripts
    ((typo, moved),) = [cfg.ignored]
    assert str(config) in typo and "unknown key network_dimm (did you mean network_dim?)" in typo
    assert 'network_args = ["loraplus_lr_ratio=..."]' in moved
    with pytest.raises(ConfigError) as err:
        _parse(config, paths, "--strict")
    assert "network_dimm" in str(err.value) and "--strict" in str(err.value) and "2 problems" in str(err.value)


def test_unknown_command_line_flag_stays_an_error(paths):
    with pytest.raises(ConfigError, match="unknown flag --network_dimm: did you mean --network_dim"):
        parse_train_config(["--pretrained_model_name_or_path", str(paths["flux"]), "--network_dimm", "16"])
    with pytest.raises(ConfigError, match="unknown flag --epoch"):  # GUI keys are config-file bookkeeping only
        parse_train_config(["--pretrained_model_name_or_path", str(paths["flux"]), "--epoch", "1"])


def test_output_config_round_trip(tmp_path, paths):
    argv = [
        "--pretrained_model_name_or_path", str(paths["flux"]), "--clip_l", str(paths["clip_l"]),
        "--t5xxl", str(paths["t5xxl"]), "--ae", str(paths["ae"]), "--dataset_config", str(paths["dataset"]),
        "--output_dir", str(paths["out"]), "--output_name", 'my "quoted" lora', "--network_dim", "16",
        "--learning_rate", "1e-4", "--text_encoder_lr", "1e-5", "2e-5", "--network_args", "train_blocks=single",
        "--lr_warmup_steps", "0.05", "--blocks_to_swap", "auto", "--gradient_checkpointing", "--resolution", "512",
        "--training_comment", "line one\nline two \\ ünïcode", "--wandb_api_key", "SECRET",
    ]
    target = tmp_path / "saved"
    written = write_output_config(argv + ["--config_file", str(target), "--output_config"])
    assert written == tmp_path / "saved.toml"
    text = written.read_text(encoding="utf-8")
    data = tomllib.loads(text)
    assert "SECRET" not in text and not {"wandb_api_key", "output_config", "config_file"} & data.keys()
    assert data["network_dim"] == 16 and data["text_encoder_lr"] == [1e-5, 2e-5]
    assert data["gradient_checkpointing"] is True and "shuffle_caption" not in data  # only given flags
    from_file = parse_train_config(["--config_file", str(written), "--wandb_api_key", "SECRET"]).flat()
    direct = parse_train_config(argv).flat()
    assert from_file == direct
    with pytest.raises(ConfigError, match="already exists"):
        write_output_config(argv + ["--config_file", str(target), "--output_config"])
    assert written.read_text(encoding="utf-8") == text  # never overwritten


def test_output_config_needs_a_path_and_is_handled_before_parsing(tmp_path, paths):
    with pytest.raises(ConfigError, match="--output_config needs --config_file"):
        write_output_config(["--output_config", "--network_dim", "4"])
    assert maybe_write_output_config(["--network_dim", "4"]) is None
    assert maybe_write_output_config(["--config_file", str(tmp_path / "o"), "--output_config"]) == tmp_path / "o.toml"
    with pytest.raises(ConfigError, match="--output_config"):
        parse_train_config(["--config_file", str(tmp_path / "p"), "--output_config"])


_scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False),
    st.text(),
)


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.from_regex(r"[a-z_][a-z0-9_]{0,20}", fullmatch=True),
                       st.one_of(_scalars, st.lists(_scalars, max_size=4)), max_size=8))
def test_dumps_toml_is_read_back_exactly_by_tomllib(values):
    loaded = tomllib.loads(dumps_toml(values))
    assert loaded.keys() == values.keys()
    for key, value in values.items():
        expected, got = (value, loaded[key]) if isinstance(value, list) else ([value], [loaded[key]])
        assert len(got) == len(expected)
        for a, b in zip(expected, got, strict=False):
            assert type(a) is type(b)
            assert a == b or (isinstance(a, float) and math.isinf(a) and a == b)
