"""Caption files and the spec §2.4 pipeline: each step, their order, the guide's `|||` example, encodings."""

from __future__ import annotations

import logging
import math
import random

import pytest

from fluxlora.data.captions import (
    CaptionOptions,
    caption_is_static,
    process_caption,
    read_caption,
    static_caption,
)
from fluxlora.errors import DatasetError


def run(raw: str, seed: int = 0, epoch: int = 1, step: int = 0, max_train_steps: int = 100, **opts) -> str:
    return process_caption(
        raw, CaptionOptions(**opts), rng=random.Random(seed), epoch=epoch, step=step, max_train_steps=max_train_steps
    )


# ---------------------------------------------------------------------------------------------- reading files


def test_read_caption_first_line_stripped(tmp_path):
    (tmp_path / "a.txt").write_text("  cat, dog  \r\nsecond line\r\n", newline="")
    assert read_caption(tmp_path / "a.png", ".txt", class_tokens=None, enable_wildcard=False) == "cat, dog"
    # the extension's dot is optional; with wildcards all non-empty lines are kept
    assert read_caption(tmp_path / "a.png", "txt", class_tokens=None, enable_wildcard=True) == "cat, dog\nsecond line"


def test_read_caption_utf8_bom_stripped(tmp_path):
    (tmp_path / "a.caption").write_bytes(b"\xef\xbb\xbfcaf\xc3\xa9")
    assert read_caption(tmp_path / "a.jpg", ".caption", class_tokens=None, enable_wildcard=False) == "café"


def test_missing_caption_uses_class_tokens_with_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        assert read_caption(tmp_path / "a.png", ".txt", class_tokens="sks dog", enable_wildcard=False) == "sks dog"
    assert "a.png" in caplog.text
    assert read_caption(tmp_path / "a.png", ".txt", class_tokens=None, enable_wildcard=False) is None


def test_empty_caption_file_counts_as_missing(tmp_path, caplog):
    (tmp_path / "a.txt").write_text(" \n\n")
    with caplog.at_level(logging.WARNING):
        assert read_caption(tmp_path / "a.png", ".txt", class_tokens="sks", enable_wildcard=False) == "sks"
    assert "a.txt" in caplog.text and "empty" in caplog.text


def test_face_box_stem_variant(tmp_path):
    (tmp_path / "portrait.txt").write_text("face caption")
    image = tmp_path / "portrait_10_20_30_40.png"
    assert read_caption(image, ".txt", class_tokens=None, enable_wildcard=False) == "face caption"
    (tmp_path / "portrait_10_20_30_40.txt").write_text("exact caption")  # the exact name wins
    assert read_caption(image, ".txt", class_tokens=None, enable_wildcard=False) == "exact caption"
    assert read_caption(tmp_path / "a_b_c_d.png", ".txt", class_tokens="x", enable_wildcard=False, warn=False) == "x"


def test_cp1252_caption_error_names_file_and_offset(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes(b"it\x92s a dog")  # cp1252 right quote
    with pytest.raises(DatasetError) as err:
        read_caption(tmp_path / "a.png", ".txt", class_tokens=None, enable_wildcard=False)
    assert err.value.path == str(path) and str(path) in str(err.value)
    assert "offset 2" in str(err.value) and "0x92" in str(err.value)


def test_utf16_caption_error_names_file(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes("a dog".encode("utf-16"))
    with pytest.raises(DatasetError) as err:
        read_caption(tmp_path / "a.png", ".txt", class_tokens=None, enable_wildcard=False)
    assert err.value.path == str(path) and "UTF-16" in str(err.value)


# ----------------------------------------------------------------------------------------- each step alone

STEP_TABLE = [
    # (raw, options, expected) for deterministic cases
    ("a, b", {}, "a, b"),
    ("a, b", {"caption_prefix": "pre"}, "pre a, b"),
    ("a, b", {"caption_suffix": "suf"}, "a, b suf"),
    ("a, b", {"caption_prefix": "pre", "caption_suffix": "suf"}, "pre a, b suf"),
    ("a, b", {"caption_dropout_rate": 1.0}, ""),
    ("a, b", {"caption_prefix": "pre", "caption_dropout_rate": 1.0}, ""),
    ("line one\nline two", {}, "line one"),
    ("x, {{retro style}}", {"enable_wildcard": True}, "x, {retro style}"),
    ("a, b, c", {"caption_tag_dropout_rate": 1.0, "keep_tokens": 1}, "a"),
    ("a,b ,  c", {"caption_tag_dropout_rate": 0.0, "token_warmup_step": 0}, "a,b ,  c"),  # nothing active: untouched
    ("a,,b", {"keep_tokens": 1, "token_warmup_step": 10, "token_warmup_min": 5}, "a, , b"),  # empties kept
    ("a, sky;;;cloud;;;day, b", {"secondary_separator": ";;;"}, "a, sky,cloud,day, b"),
    ("a; b; c", {"caption_separator": ";", "caption_tag_dropout_rate": 1.0, "keep_tokens": 2}, "a, b"),
]


@pytest.mark.parametrize("raw,opts,expected", STEP_TABLE)
def test_deterministic_steps(raw, opts, expected):
    assert run(raw, **opts) == expected


def test_dropout_every_n_epochs_uses_one_based_epochs():
    assert run("a", caption_dropout_every_n_epochs=2, epoch=2) == ""
    assert run("a", caption_dropout_every_n_epochs=2, epoch=3) == "a"


def test_dropout_rate_draws_first():
    # The first rng draw decides the dropout: compare with an independent replica of the draw.
    for seed in range(20):
        dropped = random.Random(seed).random() < 0.5
        assert run("a, b", seed=seed, caption_dropout_rate=0.5) == ("" if dropped else "a, b")


def test_wildcards_pick_line_then_alternatives():
    raw = "{red|blue} cat\n{big|small} dog"
    for seed in range(10):
        rng = random.Random(seed)
        line = rng.choice(raw.split("\n"))
        first, second = line.split(" ")[0].strip("{}").split("|"), line.split(" ")[1]
        expected = f"{rng.choice(first)} {second}"
        assert run(raw, seed=seed, enable_wildcard=True) == expected


def test_keep_tokens_then_shuffle():
    raw = "sks, a, b, c, d, e"
    for seed in range(5):
        flex = ["a", "b", "c", "d", "e"]
        random.Random(seed).shuffle(flex)
        assert run(raw, seed=seed, keep_tokens=1, shuffle_caption=True) == ", ".join(["sks", *flex])


def test_token_warmup_counts():
    raw = ", ".join(f"t{i}" for i in range(10))
    # step 2 of 4, min 1: floor(2 * (10 - 1) / 4) + 1 = 5 tags
    assert run(raw, token_warmup_step=4, token_warmup_min=1, step=2) == "t0, t1, t2, t3, t4"
    # fractional step: 0.5 of 8 steps = 4, so the same count at step 2
    assert run(raw, token_warmup_step=0.5, token_warmup_min=1, step=2, max_train_steps=8) == "t0, t1, t2, t3, t4"
    assert run(raw, token_warmup_step=4, token_warmup_min=1, step=4) == raw
    # the fixed keep_tokens are not counted: 1 fixed + floor(0 * ...) + 2 flex at step 0
    assert run(raw, keep_tokens=1, token_warmup_step=4, token_warmup_min=2, step=0) == "t0, t1, t2"


def test_tag_dropout_replica():
    raw = "k, a, b, c, d, e, f"
    for seed in range(5):
        rng = random.Random(seed)
        kept = [t for t in ["a", "b", "c", "d", "e", "f"] if rng.random() >= 0.5]
        assert run(raw, seed=seed, keep_tokens=1, caption_tag_dropout_rate=0.5) == ", ".join(["k", *kept])


# ------------------------------------------------------------------------------------------- the order


def test_full_order_replica():
    """prefix/suffix -> dropout -> wildcard -> keep split -> warm-up -> shuffle -> tag dropout -> join -> secondary."""
    opts = dict(
        caption_prefix="sks ||| {x|y},", caption_suffix="||| tail;;;end", caption_dropout_rate=0.1,
        enable_wildcard=True, keep_tokens_separator="|||", token_warmup_step=10, token_warmup_min=3,
        shuffle_caption=True, caption_tag_dropout_rate=0.3, secondary_separator=";;;",
    )
    raw = "a, b, c, d, e, f"
    for seed in range(30):
        rng = random.Random(seed)
        if rng.random() < 0.1:
            expected = ""
        else:
            xy = rng.choice(["x", "y"])
            flex = [xy, "a", "b", "c", "d", "e", "f"]
            count = math.floor(4 * (len(flex) - 3) / 10) + 3  # step 4 of 10
            flex = flex[:count]
            rng.shuffle(flex)
            flex = [t for t in flex if rng.random() >= 0.3]
            expected = ", ".join(["sks", *flex, "tail,end"])
        assert run(raw, seed=seed, step=4, **opts) == expected


def test_secondary_separator_item_moves_as_one_tag():
    out = run("a, sky;;;cloud;;;day, b, c", seed=3, shuffle_caption=True, secondary_separator=";;;")
    assert sorted(out.split(", ")) == ["a", "b", "c", "sky,cloud,day"]


# ---------------------------------------------------------------------------------- the guide's ||| example

DOC_CAPTION = "1girl, hatsune miku, vocaloid ||| stage, microphone, white shirt, smile ||| best quality, rating: general"


def test_keep_tokens_separator_documented_result_with_shuffle():
    # sd-scripts docs: "1girl, hatsune miku, vocaloid, microphone, stage, white shirt, best quality, rating: general"
    # or "..., white shirt, smile, stage, microphone, best quality, rating: general" etc.
    seen = set()
    for seed in range(40):
        out = run(DOC_CAPTION, seed=seed, keep_tokens_separator="|||", shuffle_caption=True).split(", ")
        assert out[:3] == ["1girl", "hatsune miku", "vocaloid"]
        assert out[-2:] == ["best quality", "rating: general"]
        assert sorted(out[3:-2]) == sorted(["stage", "microphone", "white shirt", "smile"])
        seen.add(tuple(out[3:-2]))
    assert len(seen) > 5  # really shuffled


def test_guide_config_without_shuffle_drops_the_marker():
    # The guide's TOML: keep_tokens_separator="|||", shuffle_caption=false, caption_tag_dropout_rate=0.
    expected = "1girl, hatsune miku, vocaloid, stage, microphone, white shirt, smile, best quality, rating: general"
    assert run(DOC_CAPTION, keep_tokens_separator="|||") == expected
    # the docs' prefix/suffix form gives the same structure
    out = run(
        "stage, microphone", keep_tokens_separator="|||", caption_prefix="1girl, hatsune miku, vocaloid |||",
        caption_suffix=", anime screencap ||| masterpiece, rating: general",
    )
    assert out == "1girl, hatsune miku, vocaloid, stage, microphone, anime screencap, masterpiece, rating: general"


def test_keep_tokens_separator_tag_dropout_spares_fixed_parts():
    out = run(DOC_CAPTION, keep_tokens_separator="|||", caption_tag_dropout_rate=1.0)
    assert out == "1girl, hatsune miku, vocaloid, best quality, rating: general"


# ------------------------------------------------------------------------------------ reproducibility, static


def test_same_seed_same_caption():
    opts = dict(shuffle_caption=True, caption_tag_dropout_rate=0.2, enable_wildcard=True)
    raw = "{a|b}, c, d, e, f, g"
    assert all(run(raw, seed=s, **opts) == run(raw, seed=s, **opts) for s in range(10))
    assert len({run(raw, seed=s, **opts) for s in range(10)}) > 1


def test_static_caption_matches_process_caption():
    opts = CaptionOptions(
        caption_prefix="sks |||", caption_suffix="photo;;;style", keep_tokens_separator="|||",
        secondary_separator=";;;",
    )
    assert caption_is_static(opts)
    for raw, text in [("a, b", "sks, a, b photo,style"), ("a, b\nsecond line", "sks, a, b")]:
        # (the suffix goes after the whole file text, so a multi-line caption's first line has none, as sd-scripts)
        expected = process_caption(raw, opts, rng=random.Random(5), epoch=3, step=7, max_train_steps=10)
        assert static_caption(raw, opts) == expected == text


@pytest.mark.parametrize(
    "opts,blocker",
    [
        ({"shuffle_caption": True}, "shuffle_caption"),
        ({"caption_dropout_rate": 0.1}, "caption_dropout_rate"),
        ({"caption_dropout_every_n_epochs": 3}, "caption_dropout_every_n_epochs"),
        ({"caption_tag_dropout_rate": 0.1}, "caption_tag_dropout_rate"),
        ({"token_warmup_step": 5}, "token_warmup_step"),
        ({"enable_wildcard": True}, "enable_wildcard"),
    ],
)
def test_static_caption_refuses_per_sample_options(opts, blocker):
    options = CaptionOptions(**opts)
    assert not caption_is_static(options)
    with pytest.raises(DatasetError) as err:
        static_caption("a {b|c}", options)
    assert err.value.key == blocker and blocker in str(err.value)


def test_wildcard_without_alternatives_is_static():
    opts = CaptionOptions(enable_wildcard=True)
    assert caption_is_static(opts, "a, {{literal}} b")
    assert static_caption("a, {{literal}} b", opts) == "a, {literal} b"
    assert not caption_is_static(opts, "a\nb")
