"""Dataset TOML/JSON schema: precedence, aliases, the flags-only path and every user mistake with its key path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fluxlora.config.dataset import (
    DatasetFlags,
    blueprint_from_flags,
    load_dataset_config,
)
from fluxlora.errors import DatasetError

# The guide's multi-resolution example (seed guide, Japanese section 6), with a real image folder.
GUIDE_TOML = """
[general]
flip_aug = true
color_aug = false
keep_tokens_separator= "|||"
shuffle_caption = false
caption_tag_dropout_rate = 0
caption_extension = ".txt"

[[datasets]]
batch_size = 2
enable_bucket = true
resolution = [1024, 1024]

  [[datasets.subsets]]
  image_dir = "{d}"
  num_repeats = 1

[[datasets]]
batch_size = 3
enable_bucket = true
resolution = [768, 768]

  [[datasets.subsets]]
  image_dir = "{d}"
  num_repeats = 1

[[datasets]]
batch_size = 4
enable_bucket = true
resolution = [512, 512]

  [[datasets.subsets]]
  image_dir = "{d}"
  num_repeats = 1
"""


def write(tmp_path: Path, text: str, name: str = "dataset.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def problems_of(path: Path, defaults: DatasetFlags | None = None) -> list[str]:
    with pytest.raises(DatasetError) as info:
        load_dataset_config(path, defaults or DatasetFlags())
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)
    return info.value.problems  # type: ignore[attr-defined]


@pytest.fixture
def img_dir(tmp_path: Path) -> Path:
    d = tmp_path / "images"
    d.mkdir()
    return d


def test_guide_multi_resolution_toml(tmp_path: Path, img_dir: Path) -> None:
    bp = load_dataset_config(write(tmp_path, GUIDE_TOML.format(d=img_dir.as_posix())), DatasetFlags())
    assert [d.batch_size for d in bp.datasets] == [2, 3, 4]
    assert [d.resolution for d in bp.datasets] == [(1024, 1024), (768, 768), (512, 512)]
    assert all(d.enable_bucket and d.is_dreambooth for d in bp.datasets)
    for d in bp.datasets:
        (s,) = d.subsets
        assert s.image_dir == img_dir and s.num_repeats == 1
        assert s.flip_aug is True and s.color_aug is False and s.shuffle_caption is False
        assert s.caption_extension == ".txt" and s.keep_tokens_separator == "|||"
        assert s.caption_tag_dropout_rate == 0.0 and isinstance(s.caption_tag_dropout_rate, float)
        # untouched keys fall back to sd-scripts' defaults
        assert (d.min_bucket_reso, d.max_bucket_reso, d.bucket_reso_steps) == (256, 1024, 64)


def test_precedence_subset_dataset_general_cli_default(tmp_path: Path, img_dir: Path) -> None:
    text = f"""
[general]
flip_aug = true
keep_tokens = 3
resolution = 512
[[datasets]]
keep_tokens = 2
  [[datasets.subsets]]
  image_dir = "{img_dir.as_posix()}"
  flip_aug = false
  [[datasets.subsets]]
  image_dir = "{img_dir.as_posix()}/../images/."
  is_reg = true
"""
    # second subset resolves to the same folder: reported; use a distinct one instead
    other = tmp_path / "reg"
    other.mkdir()
    text = text.replace(f"{img_dir.as_posix()}/../images/.", other.as_posix())
    cli = DatasetFlags(caption_extension="cap", train_batch_size=5, shuffle_caption=True, resolution=1024)
    bp = load_dataset_config(write(tmp_path, text), cli)
    (d,) = bp.datasets
    a, b = d.subsets
    assert (a.flip_aug, b.flip_aug) == (False, True)  # subset beats general
    assert a.keep_tokens == b.keep_tokens == 2  # dataset beats general
    assert d.resolution == (512, 512)  # general beats the command line
    assert d.batch_size == 5  # --train_batch_size when no level sets batch_size
    assert a.caption_extension == ".cap"  # leading dot added, as sd-scripts does
    assert a.shuffle_caption is True  # command line beats the built-in default
    assert a.num_repeats == 1 and a.class_tokens is None  # built-in defaults
    assert (a.is_reg, b.is_reg) == (False, True)


def test_interpolation_type_is_an_alias(tmp_path: Path, img_dir: Path) -> None:
    text = f"""
[[datasets]]
resolution = [1024, 1024]
interpolation_type = "Lanczos"
  [[datasets.subsets]]
  image_dir = "{img_dir.as_posix()}"
  [[datasets.subsets]]
  image_dir = "{img_dir.as_posix()}/sub"
  resize_interpolation = "area"
"""
    (img_dir / "sub").mkdir()
    (d,) = load_dataset_config(write(tmp_path, text), DatasetFlags()).datasets
    assert d.resize_interpolation == "lanczos"
    assert [s.resize_interpolation for s in d.subsets] == ["lanczos", "area"]


def test_unambiguous_numbers_are_accepted(tmp_path: Path, img_dir: Path) -> None:
    text = f"""
[general]
validation_split = 1
batch_size = 2.0
caption_dropout_rate = 0
token_warmup_step = 3
custom_attributes = {{ diff_output_preservation = true, note = "x" }}
[[datasets]]
resolution = 512
  [[datasets.subsets]]
  image_dir = "{img_dir.as_posix()}"
"""
    (d,) = load_dataset_config(write(tmp_path, text), DatasetFlags()).datasets
    assert d.validation_split == 1.0 and isinstance(d.validation_split, float)
    assert d.batch_size == 2 and isinstance(d.batch_size, int)
    (s,) = d.subsets
    assert s.caption_dropout_rate == 0.0 and s.token_warmup_step == 3.0
    assert s.custom_attributes == {"diff_output_preservation": True, "note": "x"}
    assert s.diff_output_preservation is True


def test_json_config_equals_toml(tmp_path: Path, img_dir: Path) -> None:
    toml_bp = load_dataset_config(write(tmp_path, GUIDE_TOML.format(d=img_dir.as_posix())), DatasetFlags())
    data = {
        "general": {"flip_aug": True, "color_aug": False, "keep_tokens_separator": "|||", "shuffle_caption": False,
                    "caption_tag_dropout_rate": 0, "caption_extension": ".txt"},
        "datasets": [{"batch_size": b, "enable_bucket": True, "resolution": [r, r],
                      "subsets": [{"image_dir": str(img_dir), "num_repeats": 1}]}
                     for b, r in ((2, 1024), (3, 768), (4, 512))],
    }
    json_bp = load_dataset_config(write(tmp_path, json.dumps(data), "dataset.json"), DatasetFlags())
    assert json_bp.datasets == toml_bp.datasets


def test_unknown_key_has_path_and_suggestion(tmp_path: Path, img_dir: Path) -> None:
    text = f"""
[[datasets]]
resolution = 512
  [[datasets.subsets]]
  image_dir = "{img_dir.as_posix()}"
  [[datasets.subsets]]
  image_dir = "{tmp_path.as_posix()}"
  flip_ag = true
  caption_seperator = ";"
"""
    probs = problems_of(write(tmp_path, text))
    assert "datasets[0].subsets[1].flip_ag: unknown key (did you mean flip_aug?)" in probs
    assert "datasets[0].subsets[1].caption_seperator: unknown key (did you mean caption_separator?)" in probs


def test_misplaced_keys_say_where_they_belong(tmp_path: Path, img_dir: Path) -> None:
    text = f"""
[general]
alpha_mask = true
image_dir = "{img_dir.as_posix()}"
[[datasets]]
resolution = 512
  [[datasets.subsets]]
  image_dir = "{img_dir.as_posix()}"
  batch_size = 4
  validation_split = 0.1
"""
    probs = problems_of(write(tmp_path, text))
    joined = " | ".join(probs)
    assert "general.alpha_mask: alpha_mask is not allowed here; set it in each [[datasets.subsets]]" in joined
    assert "general.image_dir: image_dir is not allowed here" in joined
    assert "datasets[0].subsets[0].batch_size: batch_size is not allowed here; set it in [general] or [[datasets]]" in joined
    assert "datasets[0].subsets[0].validation_split" in joined


def test_wrong_types_name_key_and_expected_type(tmp_path: Path, img_dir: Path) -> None:
    text = f"""
[general]
flip_aug = "true"
batch_size = 2.5
validation_split = 10
resize_interpolation = "sinc"
[[datasets]]
resolution = "big"
num_repeats = 0
  [[datasets.subsets]]
  image_dir = "{img_dir.as_posix()}"
"""
    probs = problems_of(write(tmp_path, text))
    by_key = {p.split(":")[0]: p for p in probs}
    assert "expected true or false" in by_key["general.flip_aug"] and "remove the quotes" in by_key["general.flip_aug"]
    assert "expected an integer >= 1" in by_key["general.batch_size"]
    assert "write 0.1" in by_key["general.validation_split"]
    assert "lanczos" in by_key["general.resize_interpolation"]
    assert "expected an integer or [width, height]" in by_key["datasets[0].resolution"]
    assert "expected an integer >= 1, got 0" in by_key["datasets[0].num_repeats"]


def test_malformed_toml_reports_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path, "[general]\nflip_aug = true\nbatch_size = = 2\n")
    with pytest.raises(DatasetError) as info:
        load_dataset_config(path, DatasetFlags())
    msg = str(info.value)
    assert str(path) in msg and "line 3, column" in msg and "batch_size = = 2" in msg
    assert info.value.path == str(path)


def test_windows_path_gets_single_quote_hint(tmp_path: Path) -> None:
    path = write(tmp_path, '[[datasets]]\n  [[datasets.subsets]]\n  image_dir = "C:\\Users\\me\\imgs"\n')
    with pytest.raises(DatasetError, match=r"line 3, column \d+.*single quotes"):
        load_dataset_config(path, DatasetFlags())


def test_malformed_json_and_bad_extension_and_encoding(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"dataset.json: line 2, column \d+"):
        load_dataset_config(write(tmp_path, '{"general": {}\n,,}', "dataset.json"), DatasetFlags())
    with pytest.raises(DatasetError, match=r"dataset.yaml.*use .toml or .json"):
        load_dataset_config(write(tmp_path, "a: 1", "dataset.yaml"), DatasetFlags())
    bad = tmp_path / "cp1252.toml"
    bad.write_bytes(b"[general]\ncaption_prefix = \"it\x92s\"\n")
    with pytest.raises(DatasetError, match=r"cp1252.toml: not UTF-8 \(byte 0x92 at offset 30\)"):
        load_dataset_config(bad, DatasetFlags())


def test_missing_image_dir_and_missing_folder(tmp_path: Path) -> None:
    text = """
[[datasets]]
resolution = 512
  [[datasets.subsets]]
  num_repeats = 2
  [[datasets.subsets]]
  image_dir = "does/not/exist"
"""
    probs = problems_of(write(tmp_path, text))
    assert any(p.startswith("datasets[0].subsets[0].image_dir: required") for p in probs)
    assert any(p.startswith("datasets[0].subsets[1].image_dir: folder 'does/not/exist' does not exist")
               for p in probs)


def test_mixed_dreambooth_and_finetuning(tmp_path: Path, img_dir: Path) -> None:
    meta = tmp_path / "meta.json"
    meta.write_text("{}")
    text = f"""
[[datasets]]
resolution = 512
  [[datasets.subsets]]
  image_dir = "{img_dir.as_posix()}"
  [[datasets.subsets]]
  metadata_file = "{meta.as_posix()}"
"""
    probs = problems_of(write(tmp_path, text))
    assert any(p.startswith("datasets[0].subsets: mixes DreamBooth") for p in probs)


def test_flux_size_rules(tmp_path: Path, img_dir: Path) -> None:
    text = f"""
[[datasets]]
resolution = [1000, 768]
bucket_reso_steps = 40
  [[datasets.subsets]]
  image_dir = "{img_dir.as_posix()}"
[[datasets]]
resolution = 512
enable_bucket = true
min_bucket_reso = 640
max_bucket_reso = 256
  [[datasets.subsets]]
  image_dir = "{img_dir.as_posix()}"
"""
    probs = problems_of(write(tmp_path, text))
    by_key = {p.split(":")[0]: p for p in probs}
    assert "not a multiple of 16" in by_key["datasets[0].resolution"] and "[1008, 768]" in by_key["datasets[0].resolution"]
    assert "use 48" in by_key["datasets[0].bucket_reso_steps"]
    assert "lower it to 512" in by_key["datasets[1].min_bucket_reso"]
    assert "raise it to 512" in by_key["datasets[1].max_bucket_reso"]


def test_resolution_from_cli_and_missing_resolution(tmp_path: Path, img_dir: Path) -> None:
    text = f'[[datasets]]\n  [[datasets.subsets]]\n  image_dir = "{img_dir.as_posix()}"\n'
    path = write(tmp_path, text)
    bp = load_dataset_config(path, DatasetFlags(resolution="768,512"))
    assert bp.datasets[0].resolution == (768, 512)
    assert any("pass --resolution" in p for p in problems_of(path))
    probs = problems_of(path, DatasetFlags(resolution="700"))
    assert any(p.startswith("--resolution: [700, 700] is not a multiple of 16") for p in probs)


def test_all_problems_of_one_file_reported_together(tmp_path: Path, img_dir: Path) -> None:
    text = f"""
[general]
shuffle_captions = true
[[datasets]]
resolution = 1000
  [[datasets.subsets]]
  image_dir = "{img_dir.as_posix()}"
  num_repeats = "10"
[[datasets]]
resolution = 512
network_multiplier = 0.5
  [[datasets.subsets]]
  face_crop_aug_range = [2.0, 4.0]
  conditioning_data_dir = "{img_dir.as_posix()}/missing"
[validation]
batch_size = 1
"""
    probs = problems_of(write(tmp_path, text))
    keys = [p.split(":")[0] for p in probs]
    assert keys == [
        "validation",
        "general.shuffle_captions",
        "datasets[0].subsets[0].num_repeats",
        "datasets[0].resolution",
        "datasets[1].subsets[0].image_dir",
        "datasets[1].subsets[0].face_crop_aug_range",
        "datasets[1].subsets[0].conditioning_data_dir",
        "datasets[1].network_multiplier",
    ]
    assert "validation_split" in probs[0]


def test_network_multiplier_one_is_accepted(tmp_path: Path, img_dir: Path) -> None:
    text = f'[general]\nnetwork_multiplier = 1\n[[datasets]]\nresolution = 512\n  [[datasets.subsets]]\n  image_dir = "{img_dir.as_posix()}"\n'
    assert len(load_dataset_config(write(tmp_path, text), DatasetFlags()).datasets) == 1


def test_duplicate_image_dir_is_reported(tmp_path: Path, img_dir: Path) -> None:
    text = f"""
[[datasets]]
resolution = 512
  [[datasets.subsets]]
  image_dir = "{img_dir.as_posix()}"
  [[datasets.subsets]]
  image_dir = "{img_dir.as_posix()}/."
"""
    probs = problems_of(write(tmp_path, text))
    assert probs == ["datasets[0].subsets[1].image_dir: same folder as datasets[0].subsets[0]; merge the two subsets"]


def test_flags_dreambooth_folders(tmp_path: Path) -> None:
    train, reg = tmp_path / "train", tmp_path / "reg"
    for sub in (train / "10_sks dog", train / "3_cat_toy", train / "notes", reg / "1_dog"):
        sub.mkdir(parents=True)
    bp = blueprint_from_flags(DatasetFlags(
        train_data_dir=train, reg_data_dir=str(reg), resolution="512", enable_bucket=True, train_batch_size=2,
        caption_extension=".txt", prior_loss_weight=0.5, flip_aug=True,
    ))
    (d,) = bp.datasets
    assert bp.source is None and bp.prior_loss_weight == 0.5
    assert (d.resolution, d.batch_size, d.enable_bucket) == ((512, 512), 2, True)
    got = [(s.image_dir.name, s.num_repeats, s.class_tokens, s.is_reg, s.caption_extension, s.flip_aug)
           for s in d.subsets]
    assert got == [
        ("10_sks dog", 10, "sks dog", False, ".txt", True),
        ("3_cat_toy", 3, "cat_toy", False, ".txt", True),
        ("1_dog", 1, "dog", True, ".txt", True),
    ]


def test_flags_finetuning_and_errors(tmp_path: Path) -> None:
    meta = tmp_path / "meta.json"
    meta.write_text("{}")
    bp = blueprint_from_flags(DatasetFlags(in_json=meta, train_data_dir=tmp_path, dataset_repeats=4,
                                              resolution=(512, 512)))
    (s,) = bp.datasets[0].subsets
    assert (s.metadata_file, s.image_dir, s.num_repeats, s.is_dreambooth) == (meta, tmp_path, 4, False)

    with pytest.raises(DatasetError, match="--train_data_dir: no dataset given"):
        blueprint_from_flags(DatasetFlags(resolution=512))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match=r"--train_data_dir: .* has no sub-folder named <repeats>_<class tokens>"):
        blueprint_from_flags(DatasetFlags(train_data_dir=empty, resolution=512))
    with pytest.raises(DatasetError, match="--reg_data_dir: cannot be combined with --in_json"):
        blueprint_from_flags(DatasetFlags(in_json=meta, reg_data_dir=empty, resolution=512))


@pytest.mark.parametrize(("sizes", "advice"), [
    ("resolution = 32\nmin_bucket_reso = 32", ("bucket_reso_steps = 32", "at least 64")),
    ("resolution = 512\nmin_bucket_reso = 32", ("bucket_reso_steps = 32", "min_bucket_reso = 64 or more")),
])
def test_bucket_steps_above_min_bucket_reso_is_one_error_naming_what_works(tmp_path, sizes, advice):
    """sd-scripts floors min_bucket_reso to 0 here and divides by zero building the buckets (issue 14)."""
    (tmp_path / "img").mkdir()
    text = (f"[general]\nenable_bucket = true\n{sizes}\n[[datasets]]\n[[datasets.subsets]]\n"
            f'image_dir = "{(tmp_path / "img").as_posix()}"\n')
    (problem,) = problems_of(write(tmp_path, text))
    assert problem.startswith("--bucket_reso_steps: 64 is larger than min_bucket_reso 32"), problem
    for fragment in advice:
        assert fragment in problem, (fragment, problem)
    fixed = text.replace("enable_bucket = true", "enable_bucket = true\nbucket_reso_steps = 32")
    assert load_dataset_config(write(tmp_path, fixed), DatasetFlags()).datasets[0].bucket_reso_steps == 32
