"""`flux_minimal_inference.py` / `fluxlora generate` on the tiny checkpoints: flags, files, LoRAs, interactive mode."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fluxlora.cli import main as cli_main
from fluxlora.errors import CheckpointError, ConfigError
from fluxlora.families.flux1.family import FLUX1
from fluxlora.files import save_safetensors
from fluxlora.inference.generate import (
    Generator,
    interactive_loop,
    main,
    parse_generate_args,
    parse_interactive_line,
    parse_lora_spec,
)
from fluxlora.inference.prompts import SamplePrompt
from fluxlora.inference.sampler import (
    decode_latents,
    denoise,
    encode_texts,
    flux_schedule,
    generate_images,
)
from fluxlora.network.formats import from_kohya
from fluxlora.network.lora import create_network


def _flags(ckpts, *extra: str, variant: str = "dev") -> list[str]:
    return ["--ckpt_path", str(getattr(ckpts, f"flux_{variant}")), "--clip_l", str(ckpts.clip_l),
            "--t5xxl", str(ckpts.t5xxl), "--ae", str(ckpts.ae), "--dtype", "float32", "--device", "cpu", *extra]


def _generator(ckpts, *extra: str, variant: str = "dev") -> Generator:
    return Generator(parse_generate_args(_flags(ckpts, *extra, variant=variant)))


def _float_image(gen: Generator, prompt: SamplePrompt) -> torch.Tensor:
    """The image before 8-bit rounding, through the generator's own models and encoder."""
    cond = encode_texts(gen.encode_fn, [prompt.prompt])[prompt.prompt]
    seq_len = (prompt.height // 16) * (prompt.width // 16)
    x = denoise(gen.family, gen.model, gen.family.initial_noise(prompt.seed, prompt.height, prompt.width),
                flux_schedule(prompt.steps, seq_len, shift=gen.variant == "dev"), cond,
                guidance=prompt.guidance if gen.variant == "dev" else None)
    return decode_latents(gen.ae, x)


PROMPT = SamplePrompt("a photo of a cat", width=32, height=32, seed=11, steps=2)


@pytest.fixture(autouse=True)
def _shared_tokenizers(tiny_models, monkeypatch):
    """Reading the real tokenizer files costs ~1.3 s; every Generator here gets the same (real) ones."""
    import fluxlora.models.tokenizers

    monkeypatch.setattr(fluxlora.models.tokenizers, "load_tokenizers", lambda *a, **k: tiny_models.tokenizers)


@pytest.fixture(scope="module")
def lora_file(tiny_models, tmp_path_factory) -> Path:
    """A rank-4 LoRA on every DiT Linear and on CLIP-L, with random (non-zero) up weights."""
    network = create_network(1.0, 4, 2.0, tiny_models.flux["dev"], [tiny_models.clip, None])
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for lora in network.loras:
            for up in lora.up_weights():
                up.copy_(torch.randn(up.shape, generator=gen) * 0.3)
    path = tmp_path_factory.mktemp("lora") / "my_lora.safetensors"
    network.save(path)
    return path


# -------------------------------------------------------------------------------------- command line


def test_cli_writes_a_png_with_its_settings(tiny_ckpts, tiny_models, tmp_path):
    out = tmp_path / "out"
    code = cli_main(["generate", *_flags(tiny_ckpts, "--prompt", "a red car", "--width", "40", "--height", "32",
                                         "--steps", "2", "--seed", "5", "--guidance", "2.5", "--output_dir", str(out))])
    assert code == 0
    (path,) = sorted(out.glob("*.png"))
    assert len(path.stem) == len("20250101_120000")  # <YYYYmmdd_HHMMSS>.png
    with Image.open(path) as image:
        assert image.size == (48, 32)  # 40 rounded up to a multiple of 16
        text = dict(image.text)
        pixels = np.asarray(image.convert("RGB"))
    assert (text["prompt"], text["seed"], text["steps"], text["guidance"]) == ("a red car", "5", "2", "2.5")
    assert text["width"] == "48" and text["model"] == "flux1-dev.safetensors" and "Seed: 5" in text["parameters"]
    # the same image as the library call with the same settings
    (expected,) = generate_images(FLUX1, tiny_models.info["dev"], tiny_models.flux["dev"], tiny_models.ae,
                                  tiny_models.encode_fn("dev"),
                                  [SamplePrompt("a red car", width=48, height=32, seed=5, steps=2, guidance=2.5)],
                                  device="cpu")
    assert np.array_equal(pixels, np.asarray(expected))


@pytest.mark.parametrize("variant, steps", [("schnell", 4), ("dev", 50)])
def test_default_steps_follow_the_variant(tiny_ckpts, tmp_path, monkeypatch, variant, steps):
    runs = []
    monkeypatch.setattr(Generator, "run", lambda self, prompts, output_dir: runs.append((self, prompts)) or [])
    assert main(_flags(tiny_ckpts, "--output_dir", str(tmp_path), variant=variant)) == 0
    ((gen, (prompt,)),) = runs
    assert gen.variant == variant and prompt.steps == steps
    assert (prompt.prompt, prompt.width, prompt.height, prompt.guidance, prompt.cfg_scale) == (
        "A photo of a cat", 1360, 768, 3.5, 1.0)  # spec §10.4 defaults


def test_from_file_uses_the_flags_as_defaults_and_never_overwrites(tiny_ckpts, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat --d 3\na dog --w 80 --s 1\n", encoding="utf-8")
    out = tmp_path / "out"
    for _ in range(2):
        assert main(_flags(tiny_ckpts, "--from_file", str(prompts), "--width", "16", "--height", "16", "--steps", "2",
                           "--seed", "9", "--output_dir", str(out))) == 0
    paths = sorted(out.glob("*.png"))
    assert len(paths) == 4  # the second run did not overwrite the first
    indices = sorted(re.fullmatch(r"\d{8}_\d{6}_(\d\d)(?:_\d+)?", p.stem).group(1) for p in paths)
    assert indices == ["00", "00", "01", "01"]
    info = set()
    for path in paths:
        with Image.open(path) as image:
            info.add((image.text["prompt"], image.size, image.text["steps"], image.text["seed"]))
    # the file's settings win; the flags fill the rest (file sizes follow spec §8: multiples of 16, at least 64)
    assert info == {("a cat", (16, 16), "2", "3"), ("a dog", (80, 16), "1", "9")}


def test_offload_gives_the_same_image(tiny_ckpts, tmp_path):
    plain = _generator(tiny_ckpts)
    offloaded = _generator(tiny_ckpts, "--offload")
    stages = []
    original = offloaded._stage
    offloaded._stage = lambda name: (stages.append(name), original(name))
    a = plain.run([PROMPT], tmp_path / "a")
    b = offloaded.run([PROMPT], tmp_path / "b")
    assert stages == ["encode", "denoise", "decode"]
    with Image.open(a[0]) as ia, Image.open(b[0]) as ib:
        assert np.array_equal(np.asarray(ia), np.asarray(ib))


def test_fp8_transformer_runs_close_to_fp32(tiny_ckpts):
    reference = _float_image(_generator(tiny_ckpts), PROMPT)
    fp8 = _generator(tiny_ckpts, "--flux_dtype", "fp8")
    assert fp8.model.double_blocks[0].img_attn.qkv.weight.dtype == torch.float8_e4m3fn
    assert fp8.compute_dtype == torch.bfloat16
    image = generate_images(fp8.family, fp8.info, fp8.model, fp8.ae, fp8.encode_fn, [PROMPT], device="cpu",
                            dtype=fp8.compute_dtype)[0]
    got = torch.from_numpy(np.asarray(image)).permute(2, 0, 1).float() / 127.5 - 1
    corr = torch.corrcoef(torch.stack([got.flatten(), reference[0].flatten()]))[0, 1]
    assert corr > 0.9


# ------------------------------------------------------------------------------------------- LoRA


def test_lora_on_the_fly_equals_merged_and_multiplier_zero_is_the_base(tiny_ckpts, lora_file):
    base = _float_image(_generator(tiny_ckpts), PROMPT)
    applied = _float_image(_generator(tiny_ckpts, "--lora_weights", f"{lora_file};0.7"), PROMPT)
    merged_gen = _generator(tiny_ckpts, "--lora_weights", f"{lora_file};0.7", "--merge_lora_weights")
    merged = _float_image(merged_gen, PROMPT)
    zero = _float_image(_generator(tiny_ckpts, "--lora_weights", f"{lora_file};0"), PROMPT)
    assert (applied - base).abs().max() > 1e-2  # the LoRA matters
    assert (applied - merged).abs().max() <= 1e-5
    assert torch.equal(zero, base)
    assert merged_gen.networks and all(lora._org_forward is None for lora in merged_gen.networks[0].loras)


def test_diffusers_format_lora_gives_the_same_image(tiny_ckpts, lora_file, tmp_path):
    from safetensors.torch import load_file

    converted = tmp_path / "diffusers_lora.safetensors"
    save_safetensors(converted, from_kohya(load_file(str(lora_file)), "diffusers"))
    kohya = _float_image(_generator(tiny_ckpts, "--lora_weights", str(lora_file)), PROMPT)
    diffusers = _float_image(_generator(tiny_ckpts, "--lora_weights", str(converted)), PROMPT)
    assert (kohya - diffusers).abs().max() <= 1e-5


def test_two_loras_and_interactive_multipliers(tiny_ckpts, lora_file, tmp_path, capsys):
    gen = _generator(tiny_ckpts, "--lora_weights", f"{lora_file};0.5", str(lora_file))
    assert [n.multiplier for n in gen.networks] == [0.5, 1.0]
    lines = iter(["a cat --w 16 --h 16 --s 1 --d 2 --m 0,0.25", "a cat --bogus 3", "a dog --n - --c 1.0 --w 16 --h 16",
                  ""])
    count = interactive_loop(gen, PROMPT, tmp_path, read_line=lambda _: next(lines))
    assert count == 2 and len(list(tmp_path.glob("*.png"))) == 2
    assert [n.multiplier for n in gen.networks] == [0.0, 0.25]
    assert "error: unknown option --bogus" in capsys.readouterr().out  # reported, and the loop went on


def test_lora_for_another_model_is_a_clear_error(tiny_ckpts, tmp_path):
    bad = tmp_path / "bad.safetensors"
    save_safetensors(bad, {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(4, 999),
                           "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(192, 4)})
    with pytest.raises(CheckpointError, match="--lora_weights"):
        _generator(tiny_ckpts, "--lora_weights", str(bad))
    oft = tmp_path / "oft.safetensors"
    save_safetensors(oft, {"oft_unet_double_blocks_0_img_attn_qkv.oft_blocks": torch.zeros(4, 4, 4)})
    with pytest.raises(ConfigError, match="OFT"):
        _generator(tiny_ckpts, "--lora_weights", str(oft))


# ------------------------------------------------------------------------------------------ parsing


@pytest.mark.parametrize("line, fields, multipliers", [
    ("a cat", {}, None),
    ("a cat --w 100 --h 64", {"width": 112, "height": 64}, None),
    ("a cat --s 7 --d 42 --g 2.5 --c 3", {"steps": 7, "seed": 42, "guidance": 2.5, "cfg_scale": 3.0}, None),
    ("a cat --n ugly hands", {"negative_prompt": "ugly hands"}, None),
    ("a cat --n -", {"negative_prompt": ""}, None),
    ("a cat --m 0.5,1", {}, [0.5, 1.0]),
])
def test_interactive_options(line, fields, multipliers):
    base = SamplePrompt("x", negative_prompt="base neg", width=1360, height=768, seed=None, steps=50)
    prompt, mults = parse_interactive_line(line, base)
    assert prompt == SamplePrompt(**{**base.__dict__, "prompt": "a cat", **fields})
    assert mults == multipliers


@pytest.mark.parametrize("line, message", [("a --q 1", "unknown option --q"), ("a --w big", "--w 'big'")])
def test_interactive_bad_options(line, message):
    with pytest.raises(ConfigError, match=message):
        parse_interactive_line(line, SamplePrompt("x"))


def test_lora_spec():
    assert parse_lora_spec("a/b.safetensors") == (Path("a/b.safetensors"), 1.0)
    assert parse_lora_spec("c:/x;y/b.safetensors;0.8") == (Path("c:/x;y/b.safetensors"), 0.8)
    with pytest.raises(ConfigError, match="multiplier 'x' is not a number"):
        parse_lora_spec("b.safetensors;x")


@pytest.mark.parametrize("extra, message", [
    (["--model_type", "sd3"], "--model_type sd3: not a known model type"),
    (["--dtype", "int8"], "--dtype 'int8': unknown dtype"),
    (["--width", "0"], "--width 0: must be positive"),
    (["--steps", "0"], "--steps 0"),
])
def test_bad_flags_are_clear_errors(tiny_ckpts, tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message):
        main(_flags(tiny_ckpts, "--output_dir", str(tmp_path), *extra))


def test_missing_text_encoder_flag(tiny_ckpts, tmp_path):
    flags = _flags(tiny_ckpts, "--output_dir", str(tmp_path))
    i = flags.index("--clip_l")
    with pytest.raises(ConfigError, match="--clip_l is required"):
        main(flags[:i] + flags[i + 2:])
