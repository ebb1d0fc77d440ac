"""Prompt files: the three formats, every inline flag and table key, defaults, rounding and the errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fluxlora.errors import ConfigError
from fluxlora.inference.prompts import SamplePrompt, load_prompt_file, parse_prompt_line, split_inline_flags

DEFAULT = SamplePrompt("x", "", 512, 512, None, 20, 3.5, 1.0)  # spec §8 defaults, written out independently


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# One row per inline flag: (line, expected fields that differ from the defaults).
INLINE_CASES = [
    ("a cat --w 768", {"width": 768}),
    ("a cat --h 640", {"height": 640}),
    ("a cat --d 1234", {"seed": 1234}),
    ("a cat --s 28", {"steps": 28}),
    ("a cat --l 4.5", {"cfg_scale": 4.5}),
    ("a cat --g 2", {"guidance": 2.0}),
    ("a cat --n blurry, low quality", {"negative_prompt": "blurry, low quality"}),
    ("a cat --W 768 --H 1024", {"width": 768, "height": 1024}),  # flag names are case-insensitive
    ("a cat --w 770 --h 63", {"width": 768, "height": 64}),  # rounded down to 16, at least 64
    ("a cat --s 0", {"steps": 1}),  # steps clamped to 1..1000
    ("a cat --s 5000", {"steps": 1000}),
    ("a cat --ss euler --cn c.png --ctr 0.3 --rcfg 1 --fs 3", {}),  # read and ignored, as in sd-scripts
    ("a cat   --w 512   --n   ", {"negative_prompt": ""}),
    ("a cat --w 640 --h 384 --d 7 --s 12 --l 1.5 --g 4.0 --n ugly",
     {"width": 640, "height": 384, "seed": 7, "steps": 12, "cfg_scale": 1.5, "guidance": 4.0, "negative_prompt": "ugly"}),
]


@pytest.mark.parametrize("line, fields", INLINE_CASES)
def test_every_inline_flag_in_each_format(tmp_path: Path, line: str, fields: dict) -> None:
    expected = SamplePrompt(**{**DEFAULT.__dict__, "prompt": "a cat", **fields})
    txt = _write(tmp_path, "p.txt", f"# comment\n\n{line}\n")
    js = _write(tmp_path, "p.json", json.dumps([line]))
    assert load_prompt_file(txt) == [expected]
    assert load_prompt_file(js) == [expected]


# One row per table key: (key, value, expected fields).
TABLE_CASES = [
    ("negative_prompt", "blurry", {"negative_prompt": "blurry"}),
    ("width", 1024, {"width": 1024}),
    ("height", 520, {"height": 512}),
    ("seed", 99, {"seed": 99}),
    ("sample_steps", 8, {"steps": 8}),
    ("scale", 3.0, {"cfg_scale": 3.0}),
    ("guidance_scale", 5.5, {"guidance": 5.5}),
    ("controlnet_image", "c.png", {}),
]


@pytest.mark.parametrize("key, value, fields", TABLE_CASES)
def test_every_table_key_in_json_and_toml(tmp_path: Path, key: str, value, fields: dict) -> None:
    expected = SamplePrompt(**{**DEFAULT.__dict__, "prompt": "a dog", **fields})
    js = _write(tmp_path, "p.json", json.dumps([{"prompt": "a dog", key: value}]))
    toml_value = f'"{value}"' if isinstance(value, str) else value
    toml = _write(tmp_path, "p.toml", f'[prompt]\n{key} = {toml_value}\n\n[[prompt.subset]]\nprompt = "a dog"\n')
    assert load_prompt_file(js) == [expected]
    assert load_prompt_file(toml) == [expected]


def test_toml_shared_keys_and_subset_overrides(tmp_path: Path) -> None:
    path = _write(tmp_path, "p.toml", """
[prompt]
width = 768
sample_steps = 10
negative_prompt = "lowres"

[[prompt.subset]]
prompt = "first"

[[prompt.subset]]
prompt = "second"
width = 1024
seed = 5
""")
    first, second = load_prompt_file(path)
    assert (first.prompt, first.width, first.steps, first.negative_prompt, first.seed) == ("first", 768, 10, "lowres", None)
    # sd-scripts raises when a subset repeats a shared key; here the subset wins (spec §12.28)
    assert (second.prompt, second.width, second.steps, second.seed) == ("second", 1024, 10, 5)


def test_json_mixes_strings_and_objects_in_order(tmp_path: Path) -> None:
    path = _write(tmp_path, "p.json", json.dumps(["one --w 640", {"prompt": "two", "sample_steps": "6"}]))
    one, two = load_prompt_file(path)
    assert (one.prompt, one.width) == ("one", 640)
    assert (two.prompt, two.steps) == ("two", 6)


def test_txt_keeps_order_and_skips_comments_and_blank_lines(tmp_path: Path) -> None:
    path = _write(tmp_path, "P.TXT", "\ufeff  first  \n#skip\n   # also skipped\n\nsecond --d 3\n")
    assert [(p.prompt, p.seed) for p in load_prompt_file(path)] == [("first", None), ("second", 3)]


def test_defaults_can_be_given(tmp_path: Path) -> None:
    path = _write(tmp_path, "p.txt", "a --w 640\nb\n")
    a, b = load_prompt_file(path, defaults={"width": 1360, "height": 770, "steps": 4, "guidance": 0.0})
    assert (a.width, a.height, a.steps, a.guidance) == (640, 768, 4, 0.0)
    assert (b.width, b.height) == (1360, 768)


def test_split_inline_flags() -> None:
    assert split_inline_flags("a --W 5 --n x y ") == ("a", [("w", "5"), ("n", "x y")])
    assert split_inline_flags("no flags here") == ("no flags here", [])


# ------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("name", ["p.yaml", "p.csv", "prompts"])
def test_unknown_extension_is_a_clear_error(tmp_path: Path, name: str) -> None:
    path = _write(tmp_path, name, "a cat\n")
    with pytest.raises(ConfigError, match=r"unknown prompt-file extension.*\.txt.*\.json.*\.toml") as err:
        load_prompt_file(path)
    assert err.value.path == str(path) and err.value.key == "--sample_prompts"


def test_toml_key_defined_twice_is_a_clear_error(tmp_path: Path) -> None:
    path = _write(tmp_path, "p.toml", '[prompt]\nwidth = 512\nwidth = 768\n\n[[prompt.subset]]\nprompt = "a"\n')
    with pytest.raises(ConfigError, match=r"p\.toml: invalid TOML.*line 3.*once per table"):
        load_prompt_file(path)


@pytest.mark.parametrize("name, text, message", [
    ("p.txt", "a cat --x 5\n", r"p\.txt:1: unknown inline flag --x"),
    ("p.txt", "ok\na cat --ww 5\n", r"p\.txt:2: unknown inline flag --ww \(did you mean 'w'\?\)"),
    ("p.txt", "a cat --w wide\n", r"--w 'wide' is not a whole number"),
    ("p.txt", "a cat --g high\n", r"--g 'high' is not a number"),
    ("p.txt", "a cat --w\n", r"--w needs a value"),
    ("p.txt", "# only a comment\n\n", r"holds no prompts"),
    ("p.json", '{"prompt": "a"}', r"must be a list"),
    ("p.json", '["a", 3]', r"item 1: expected a string or an object"),
    ("p.json", '[{"prompt": "a", "steps": 3}]', r"item 0: unknown key 'steps'"),
    ("p.json", '[{"negative_prompt": "a"}]', r"no 'prompt' key"),
    ("p.json", '[{"prompt": "a", "width": true}]', r"width True is not a whole number"),
    ("p.json", '[{"prompt": "a", "seed": -1}]', r"seed -1 must be between"),
    ("p.json", '[{"prompt": "a"', r"invalid JSON at line 1"),
    ("p.toml", 'prompt = "a"\n', r"needs a \[prompt\] table"),
    ("p.toml", '[prompt]\nwidth = 5\n', r"\[\[prompt.subset\]\]"),
    ("p.toml", '[prompt]\n[[prompt.subset]]\nprompt = "a"\n[other]\n', r"unknown top-level key"),
    ("p.toml", '[prompt]\n[[prompt.subset]]\nprompt = "a"\nscale = "big"\n', r"subset\]\] 0: scale 'big' is not a number"),
])
def test_bad_prompt_files_are_clear_errors(tmp_path: Path, name: str, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_prompt_file(_write(tmp_path, name, text))


def test_missing_file_and_folder(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_prompt_file(tmp_path / "none.txt")
    (tmp_path / "d.txt").mkdir()
    with pytest.raises(ConfigError, match="is a folder"):
        load_prompt_file(tmp_path / "d.txt")


def test_parse_prompt_line_returns_only_what_it_sets() -> None:
    assert parse_prompt_line("a --s 3") == {"prompt": "a", "steps": 3}
