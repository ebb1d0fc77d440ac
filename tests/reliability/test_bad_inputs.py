"""Bad input: each case raises fluxlora's typed error with one line naming the file, key or flag at fault and what to
do — before any model weight is read where the input allows it — and leaves the output folder untouched (not even
created). Each case builds a command line from the working one, changes one thing and calls `train(argv)`."""

from __future__ import annotations

import shutil
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from PIL import Image
from reliability_data import write_dataset

from fluxlora.errors import CheckpointError, ConfigError, DatasetError, FluxLoraError
from fluxlora.files import save_safetensors
from fluxlora.training.cli import train


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(path: Path, width: int = 30000, height: int = 30000) -> None:
    """A valid PNG header claiming a huge image (900 M pixels) with almost no data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + _png_chunk(b"IEND", b""))


class Case:
    """Context a case builds its command line from."""

    def __init__(self, argv_for: Callable[..., list[str]], tmp: Path, tiny) -> None:
        self.argv_for, self.tmp, self.tiny = argv_for, tmp, tiny
        self.out = tmp / "out"

    def images(self, name: str = "img") -> Path:
        return write_dataset(self.tmp / name)

    def argv(self, *extra: str, **kw) -> list[str]:
        return self.argv_for("--max_train_steps=2", *extra, out=self.out, **kw)

    def toml(self, text: str) -> list[str]:
        path = self.tmp / "custom.toml"
        path.write_text(text, encoding="utf-8")
        return [a if not a.startswith("--dataset_config=") else f"--dataset_config={path}" for a in self.argv()]

    def swap(self, flag: str, value: object) -> list[str]:
        return [f"{flag}={value}" if a.startswith(f"{flag}=") else a for a in self.argv()]


def _bad_image(c: Case, name: str, data: bytes | None) -> list[str]:
    images = c.images()
    if data is None:
        bomb_png(images / name)
    else:
        (images / name).write_bytes(data)
    (images / name).with_suffix(".txt").write_text("caption", encoding="utf-8")
    return c.argv(images=images)


def _truncated_png(c: Case) -> bytes:
    real = (c.images("src") / "00.png").read_bytes()
    return real[: len(real) // 2]


def _lora_file(c: Case, name: str, tensors: dict, metadata: dict | None = None) -> Path:
    path = c.tmp / name
    save_safetensors(path, tensors, metadata)
    return path


QKV = "lora_unet_double_blocks_0_img_attn_qkv"


def _schnell_lora(c: Case) -> Path:
    return _lora_file(c, "schnell.safetensors", {f"{QKV}.lora_down.weight": torch.zeros(4, 64)},
                      {"modelspec.architecture": "flux-1-schnell/lora"})


def _wrong_lora(c: Case) -> Path:
    return _lora_file(c, "wrong.safetensors", {f"{QKV}.lora_down.weight": torch.zeros(4, 7),
                                               f"{QKV}.lora_up.weight": torch.zeros(192, 4)})


def _pickle_file(c: Case) -> Path:
    path = c.tmp / "flux1-dev.ckpt"
    torch.save({"state_dict": {}}, path)
    return path


# (id, build(case) -> argv, error type, fragments the message must contain)
CASES: list[tuple[str, Callable[[Case], list[str]], type, tuple[str, ...]]] = [
    ("toml-syntax", lambda c: c.toml("[general\nbatch_size = 1\n"), DatasetError, ("custom.toml", "line 1", "column")),
    ("toml-unknown-key", lambda c: c.toml(
        f'[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = "{c.images().as_posix()}"\n'
        'caption_seperator = ","\n'), DatasetError, ("caption_seperator", "caption_separator")),
    ("toml-wrong-type", lambda c: c.toml(
        f'[[datasets]]\nresolution = "big"\n[[datasets.subsets]]\nimage_dir = "{c.images().as_posix()}"\n'),
     DatasetError, ("resolution",)),
    ("missing-image-dir", lambda c: c.argv(images=c.tmp / "nowhere"), DatasetError, ("image_dir", "nowhere")),
    ("empty-dataset", lambda c: c.argv(images=(c.tmp / "empty").resolve()) if (c.tmp / "empty").mkdir() is None
     else [], DatasetError, ("empty",)),
    ("corrupt-image", lambda c: _bad_image(c, "05.png", b"this is not a png at all" * 10), DatasetError,
     ("05.png", "re-export")),
    ("truncated-image", lambda c: _bad_image(c, "05.png", _truncated_png(c)), DatasetError, ("05.png",)),
    ("zero-byte-image", lambda c: _bad_image(c, "05.png", b""), DatasetError, ("05.png",)),
    ("decompression-bomb", lambda c: _bad_image(c, "05.png", None), DatasetError, ("05.png",)),
    ("non-utf8-caption", lambda c: (lambda im: ((im / "01.txt").write_bytes(b"caf\xe9 au lait"), c.argv(images=im))[1])(
        c.images()), DatasetError, ("01.txt", "UTF-8")),
    ("resolution-not-16", lambda c: c.toml(
        f'[[datasets]]\nresolution = 72\n[[datasets.subsets]]\nimage_dir = "{c.images().as_posix()}"\n'),
     DatasetError, ("resolution", "16")),
    ("resolution-below-bucket-steps", lambda c: c.toml(
        f'[[datasets]]\nresolution = 32\nenable_bucket = true\nmin_bucket_reso = 32\n[[datasets.subsets]]\n'
        f'image_dir = "{c.images().as_posix()}"\n'), DatasetError,
     ("bucket_reso_steps", "min_bucket_reso 32", "bucket_reso_steps = 32")),
    ("missing-checkpoint", lambda c: c.swap("--ae", c.tmp / "ae-missing.safetensors"), ConfigError,
     ("--ae", "ae-missing.safetensors", "does not exist")),
    ("pickle-checkpoint", lambda c: c.swap("--pretrained_model_name_or_path", _pickle_file(c)), CheckpointError,
     ("flux1-dev.ckpt", "pickle", ".safetensors")),
    ("ae-as-clip", lambda c: c.swap("--clip_l", c.tiny.ae), CheckpointError, ("--clip_l",)),
    ("truncated-checkpoint", lambda c: c.swap("--t5xxl", (lambda p: (p.write_bytes(
        Path(c.tiny.t5xxl).read_bytes()[:-100]), p)[1])(c.tmp / "t5-cut.safetensors")), CheckpointError,
     ("--t5xxl", "t5-cut.safetensors", "truncated")),
    ("schnell-lora-on-dev", lambda c: c.argv(f"--network_weights={_schnell_lora(c)}"), CheckpointError,
     ("--network_weights", "schnell", "dev")),
    ("lora-wrong-shape", lambda c: c.argv(f"--network_weights={_wrong_lora(c)}"), CheckpointError,
     ("--network_weights", "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight", "--dim_from_weights")),
    ("unknown-network-arg", lambda c: c.argv("--network_args", "trian_blocks=single"), ConfigError,
     ("trian_blocks",)),
    ("lycoris-meaningless-arg", lambda c: c.argv("--network_module=lycoris.kohya", "--network_args", "algo=lokr",
                                                 "dropout=0.1"), ConfigError, ("dropout", "algo=lokr", "rank_dropout")),
    ("lycoris-unknown-algo", lambda c: c.argv("--network_module=lycoris.kohya", "--network_args", "algo=boft"),
     ConfigError, ("algo='boft'", "lokr")),
    ("conflicting-flags", lambda c: c.argv("--blocks_to_swap=2", "--cpu_offload_checkpointing",
                                           "--gradient_checkpointing"), ConfigError,
     ("--blocks_to_swap", "--cpu_offload_checkpointing")),
    ("output-dir-is-a-file", lambda c: (lambda f: (f.write_text("x"), c.argv_for(
        "--max_train_steps=2", out=f / "out"))[1])(c.tmp / "a-file"), ConfigError, ("--output_dir", "a-file")),
    ("prompt-file-extension", lambda c: (lambda p: (p.write_text("a cat"), c.argv(
        f"--sample_prompts={p}", "--sample_every_n_steps=1"))[1])(c.tmp / "prompts.yaml"), FluxLoraError,
     ("prompts.yaml",)),
    ("zero-steps", lambda c: c.argv_for("--max_train_steps=0", out=c.out), ConfigError, ("--max_train_steps",)),
    ("negative-epochs", lambda c: c.argv("--max_train_epochs=-1"), ConfigError, ("--max_train_epochs",)),
    ("zero-learning-rate", lambda c: c.argv("--learning_rate=0"), ConfigError, ("--learning_rate",)),
    ("resume-from-foreign-folder", lambda c: (lambda d: (d.mkdir(), (d / "train_state.json").write_text(
        '{"current_step": 3}'), c.argv(f"--resume={d}"))[2])(c.tmp / "sd-scripts-state"), ConfigError,
     ("--resume", "sd-scripts-state", "COMPLETE")),
    ("resume-missing", lambda c: c.argv(f"--resume={c.tmp / 'no-state'}"), ConfigError, ("--resume", "no-state")),
    ("unknown-optimizer", lambda c: c.argv("--optimizer_type=AdamWW"), ConfigError, ("AdamWW",)),
    ("optimizer-args-the-class-refuses", lambda c: c.argv("--optimizer_args", "betass=(0.9,0.99)"), ConfigError,
     ("--optimizer_args", "betass", "AdamW")),
    ("unknown-lr-scheduler", lambda c: c.argv("--lr_scheduler=cosin"), ConfigError, ("--lr_scheduler", "cosin")),
    ("warmup-longer-than-the-run", lambda c: c.argv("--lr_scheduler=cosine", "--lr_warmup_steps=10"), ConfigError,
     ("--lr_warmup_steps", "10", "2 training steps")),
    ("warmup-longer-than-the-epochs", lambda c: c.argv_for("--max_train_epochs=1", "--lr_scheduler=linear",
                                                         "--lr_warmup_steps=100", out=c.out), ConfigError,
     ("--lr_warmup_steps", "100")),
    ("min-lr-ratio-missing", lambda c: c.argv("--lr_scheduler=cosine_with_min_lr"), ConfigError,
     ("--lr_scheduler_min_lr_ratio",)),
    ("scheduler-args-the-schedule-refuses", lambda c: c.argv("--lr_scheduler=cosine", "--lr_scheduler_args",
                                                             "gamma=0.5"), ConfigError,
     ("--lr_scheduler_args", "gamma")),
    ("config-file-unknown-key-strict", lambda c: (lambda p: (p.write_text("learning_rat = 1e-4\n"), c.argv(
        f"--config_file={p}", "--strict"))[1])(c.tmp / "args.toml"), ConfigError,
     ("learning_rat", "args.toml", "did you mean learning_rate")),
    ("ignored-option-strict", lambda c: c.argv("--noise_offset=0.05", "--strict"), ConfigError,
     ("--noise_offset 0.05", "sd-scripts ignores it for FLUX too")),
]


@pytest.mark.parametrize(("build", "error", "fragments"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_early_error(argv_for, tmp_path, tiny_ckpts, monkeypatch, build, error, fragments):
    import fluxlora.training.setup as setup

    case = Case(argv_for, tmp_path, tiny_ckpts)
    argv = build(case)
    loaded: list[str] = []
    real_load_models = setup.load_models  # the name build_run calls
    monkeypatch.setattr(setup, "load_models", lambda *a, **k: loaded.append("models") or real_load_models(*a, **k))
    with pytest.raises(error) as info:
        train(argv)
    message = str(info.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert not case.out.exists(), "the output folder was touched"
    # everything but a LoRA that does not fit the network is found before any weight is read
    if "wrong.safetensors" not in message:
        assert loaded == [], f"weights were loaded before the error: {message}"


def test_existing_lora_is_not_overwritten_without_overwrite(argv_for, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "lora.safetensors").write_bytes(b"another run's LoRA")
    with pytest.raises(ConfigError) as info:
        train(argv_for("--max_train_steps=1", out=out))
    assert "--overwrite" in str(info.value) and "lora.safetensors" in str(info.value)
    assert sorted(p.name for p in out.iterdir()) == ["lora.safetensors"]
    assert (out / "lora.safetensors").read_bytes() == b"another run's LoRA"
    train(argv_for("--max_train_steps=1", "--overwrite", out=out))
    assert (out / "lora.safetensors").read_bytes() != b"another run's LoRA"


def test_full_output_disk_is_refused_at_start(argv_for, tmp_path, monkeypatch):
    import fluxlora.training.preflight as preflight

    real = shutil.disk_usage
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda p: real(p)._replace(free=10 * 2**20))
    with pytest.raises(ConfigError) as info:
        train(argv_for("--max_train_steps=1", out=tmp_path / "out"))
    assert "--output_dir" in str(info.value) and "10 MiB free" in str(info.value)
    assert not (tmp_path / "out").exists()


def test_corrupt_latent_cache_file_is_rebuilt(argv_for, tmp_path):
    images = write_dataset(tmp_path / "img")
    flags = ("--max_train_steps=1", "--cache_latents", "--cache_latents_to_disk")
    first = train(argv_for(*flags, out=tmp_path / "a", images=images))
    caches = sorted(p for p in images.iterdir() if p.suffix not in (".png", ".txt"))
    assert caches, "no cache file was written next to the images"
    caches[0].write_bytes(caches[0].read_bytes()[:40])  # truncated, as a crash mid-write would leave it
    second = train(argv_for(*flags, out=tmp_path / "b", images=images))
    assert second.losses == first.losses  # rebuilt exactly, the run is the same
    from safetensors.torch import load_file

    load_file(str(caches[0]))  # and the file is whole again
    assert Image.open(images / "00.png").size == (64, 64)
