"""`flux_minimal_inference.py` / `fluxlora generate`: FLUX.1 images from the command line (flags of spec §10.4).

    python flux_minimal_inference.py --ckpt_path flux1-dev.safetensors --clip_l clip_l.safetensors \
        --t5xxl t5xxl_fp16.safetensors --ae ae.safetensors --prompt "a cat" --lora_weights my.safetensors;0.8

Steps default to 4 for schnell and 50 for dev; the T5 length is 256 / 512 likewise. Sizes are rounded up to
multiples of 16 (as the latent grid of sd-scripts' script is), with a notice. `--from_file` runs a .txt/.json/.toml
prompt file (the flags are its defaults) under one progress bar; `--interactive` reads prompts with the inline flags
`--w --h --s --d --g --m <multipliers> --n <negative, or - for none> --c <cfg>`. Images go to
`<output_dir>/<YYYYmmdd_HHMMSS>.png` (with `_NN` for batches, never overwriting), their settings in PNG text chunks.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from fluxlora.errors import ConfigError, FluxLoraError
from fluxlora.inference.prompts import SamplePrompt, load_prompt_file, split_inline_flags
from fluxlora.inference.sampler import EncodeFn, generate_images, save_png
from fluxlora.models.fp8 import store_linears_in_fp8

logger = logging.getLogger(__name__)

FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "fp8": torch.float8_e4m3fn, "fp8_e4m3fn": torch.float8_e4m3fn, "float8_e4m3fn": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2, "float8_e5m2": torch.float8_e5m2,
}


# ---------------------------------------------------------------------------------------- flags


@dataclass(frozen=True)
class GenerateOptions:
    """The flags of `flux_minimal_inference.py` (sd-scripts names), typed and checked (`parse_generate_args`)."""

    ckpt_path: Path
    clip_l: Path | None  # which text encoders are required is the model family's (checked when loading)
    t5xxl: Path | None
    ae: Path
    dtypes: dict[str, torch.dtype]  # per model: clip_l, t5xxl, ae, flux (--dtype unless set per model)
    tokenizer_cache_dir: Path | None = None
    apply_t5_attn_mask: bool = False
    prompt: str = "A photo of a cat"
    negative_prompt: str = ""
    cfg_scale: float = 1.0
    guidance: float = 3.5
    steps: int | None = None  # None: the variant's default
    seed: int | None = None
    width: int = 1360  # a multiple of 16
    height: int = 768
    output_dir: Path = Path(".")
    device: str | None = None
    offload: bool = False
    lora_weights: tuple[tuple[Path, float], ...] = ()
    merge_lora_weights: bool = False
    from_file: Path | None = None
    interactive: bool = False
    model_type: str | None = None  # None: the family is detected from the transformer file
    control_image: str | None = None  # Kontext: the reference; Fill: the image to paint into
    mask_image: str | None = None  # Fill: white = the region to paint


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flux_minimal_inference.py", description=__doc__.splitlines()[0])
    p.add_argument("--ckpt_path", type=str, required=True, help="the transformer (BFL or diffusers layout)")
    p.add_argument("--model_type", type=str, help="model family (flux, ...); default: detected from the file")
    p.add_argument("--clip_l", type=str, help="CLIP-L text encoder (clip_l.safetensors)")
    p.add_argument("--t5xxl", type=str, help="T5-XXL text encoder (t5xxl_fp16.safetensors or fp8)")
    p.add_argument("--ae", type=str, help="autoencoder (ae.safetensors)")
    p.add_argument("--tokenizer_cache_dir", type=str, help="folder with the tokenizers (default: the shipped copies)")
    p.add_argument("--apply_t5_attn_mask", action="store_true", help="mask T5 padding in T5 and in the DiT")
    p.add_argument("--prompt", type=str, default="A photo of a cat", help="prompt (default 'A photo of a cat')")
    p.add_argument("--negative_prompt", type=str, default="", help="negative prompt (used when --cfg_scale != 1)")
    p.add_argument("--control_image", type=str, help="FLUX.1 Kontext: the reference image; FLUX.1 Fill: the image to "
                   "paint into (resized and centre-cropped to --width x --height)")
    p.add_argument("--mask_image", type=str, help="FLUX.1 Fill: the mask, white = the region to paint")
    p.add_argument("--cfg_scale", type=float, default=1.0, help="true CFG scale, for de-distilled bases (default 1: off)")
    p.add_argument("--guidance", type=float, default=3.5, help="embedded guidance of dev models (default 3.5)")
    p.add_argument("--steps", type=int, help="sampling steps (default 4 for schnell, 50 for dev)")
    p.add_argument("--seed", type=int, help="seed (default: a random 32-bit seed, written in the PNG)")
    p.add_argument("--width", type=int, default=1360, help="image width, rounded up to a multiple of 16 (1360)")
    p.add_argument("--height", type=int, default=768, help="image height, rounded up to a multiple of 16 (768)")
    p.add_argument("--output_dir", type=str, default=".", help="folder for the images (default .)")
    p.add_argument("--dtype", type=str, default="bfloat16", help="dtype of every model unless set per model "
                   "(bfloat16, float16, float32, fp8 = float8_e4m3fn, float8_e5m2); fp8 computes in bfloat16")
    for name in ("clip_l", "t5xxl", "ae", "flux"):
        p.add_argument(f"--{name}_dtype", type=str, help=f"dtype of {name} (default --dtype)")
    p.add_argument("--device", type=str, help="device (default cuda when available, else cpu)")
    p.add_argument("--offload", action="store_true", help="keep models on the CPU and move each to the device only "
                   "for its stage (text encoding, denoising, decoding)")
    p.add_argument("--lora_weights", type=str, nargs="*", default=[], metavar="PATH[;MULTIPLIER]",
                   help="LoRA files (sd-scripts, diffusers/PEFT or ai-toolkit format), each with an optional multiplier")
    p.add_argument("--merge_lora_weights", action="store_true", help="merge the LoRAs into the weights instead of "
                   "applying them on the fly")
    p.add_argument("--from_file", type=str, help="generate every prompt of a .txt/.json/.toml prompt file")
    p.add_argument("--interactive", action="store_true", help="read prompts from the terminal (empty line to quit)")
    return p


def parse_dtype(name: str, flag: str) -> torch.dtype:
    key = name.strip().lower()
    if key not in DTYPE_NAMES:
        raise ConfigError(f"{flag} {name!r}: unknown dtype; use one of bfloat16, float16, float32, fp8, "
                          "float8_e5m2", key=flag)
    return DTYPE_NAMES[key]


def parse_lora_spec(spec: str) -> tuple[Path, float]:
    """`path[;multiplier]` → (path, multiplier); the multiplier defaults to 1."""
    path, sep, value = spec.rpartition(";")
    if not sep:
        return Path(spec), 1.0
    try:
        return Path(path), float(value)
    except ValueError:
        raise ConfigError(f"--lora_weights {spec!r}: multiplier {value!r} is not a number; write path;0.8",
                          key="--lora_weights") from None


def parse_generate_args(argv: Sequence[str]) -> GenerateOptions:
    """The command line as `GenerateOptions`: required files, model type, dtypes, LoRA specs and sizes checked."""
    a = build_parser().parse_args(list(argv))
    if not a.ae:
        raise ConfigError("--ae is required: pass the autoencoder safetensors file", key="--ae")
    base = parse_dtype(a.dtype, "--dtype")
    dtypes = {n: parse_dtype(getattr(a, f"{n}_dtype"), f"--{n}_dtype") if getattr(a, f"{n}_dtype") else base
              for n in ("clip_l", "t5xxl", "ae", "flux")}
    if a.steps is not None and a.steps < 1:
        raise ConfigError(f"--steps {a.steps}: must be at least 1", key="--steps")
    for flag, value in (("--control_image", a.control_image), ("--mask_image", a.mask_image)):
        if value is not None and not Path(value).is_file():
            raise ConfigError(f"{flag} {value}: file not found; check the path", path=value, key=flag)
    return GenerateOptions(
        ckpt_path=Path(a.ckpt_path), clip_l=Path(a.clip_l) if a.clip_l else None,
        t5xxl=Path(a.t5xxl) if a.t5xxl else None, ae=Path(a.ae), dtypes=dtypes, model_type=a.model_type,
        tokenizer_cache_dir=Path(a.tokenizer_cache_dir) if a.tokenizer_cache_dir else None,
        apply_t5_attn_mask=a.apply_t5_attn_mask, prompt=a.prompt, negative_prompt=a.negative_prompt,
        cfg_scale=a.cfg_scale, guidance=a.guidance, steps=a.steps, seed=a.seed,
        width=round_up_16(a.width, "--width"), height=round_up_16(a.height, "--height"),
        output_dir=Path(a.output_dir), device=a.device, offload=a.offload,
        lora_weights=tuple(parse_lora_spec(spec) for spec in a.lora_weights),
        merge_lora_weights=a.merge_lora_weights, from_file=Path(a.from_file) if a.from_file else None,
        interactive=a.interactive, control_image=a.control_image, mask_image=a.mask_image)


def round_up_16(value: int, flag: str) -> int:
    if value <= 0:
        raise ConfigError(f"{flag} {value}: must be positive", key=flag)
    rounded = math.ceil(value / 16) * 16
    if rounded != value:
        logger.warning("%s %d is not a multiple of 16; using %d", flag, value, rounded)
    return rounded


# ---------------------------------------------------------------------------------------- LoRA


def read_lora_network(path: Path, multiplier: float, flux: nn.Module, text_encoders: Sequence[nn.Module | None]):
    """Build and load (not yet apply) a LoRA network from a file in any supported format, strictly."""
    from fluxlora.network.formats import detect_lora_format, to_kohya
    from fluxlora.network.lora import create_network_from_weights
    from fluxlora.network.saving import read_lora

    tensors, metadata = read_lora(path, flag="--lora_weights")
    if any(k.startswith("oft_") or ".oft_blocks" in k for k in tensors):
        raise ConfigError(f"--lora_weights {path}: an OFT file (networks.oft_flux), which fluxlora does not "
                          "support; pass a LoRA file", path=path, key="--lora_weights")
    fmt = detect_lora_format(tensors, metadata)
    if fmt != "kohya":
        tensors = to_kohya(tensors, fmt, hidden_size=getattr(getattr(flux, "params", None), "hidden_size", None))
    network, weights = create_network_from_weights(multiplier, None, flux, list(text_encoders), weights_sd=tensors)
    network.load_lora_state_dict(weights, path=path, flag="--lora_weights")
    network.eval().requires_grad_(False)
    logger.info("LoRA %s (%s format, %d modules, multiplier %g)", path, fmt, len(network.loras), multiplier)
    return network


# ---------------------------------------------------------------------------------------- models


class Generator:
    """The loaded models and settings of one `generate` run."""

    def __init__(self, args: GenerateOptions):
        from fluxlora.families import resolve_family
        from fluxlora.models.checkpoints import read_header, require_kind

        self.family, self.info = resolve_family(args.ckpt_path, args.model_type, flag="--ckpt_path")
        family = self.family
        files = {}
        for e in family.encoders:  # the family says which text encoders it needs
            path = getattr(args, e.component, None)
            if path is None:
                raise ConfigError(f"{e.flag} is required for {family.name} models: pass its safetensors file",
                                  key=e.flag)
            require_kind(read_header(path, flag=e.flag), e.kind, flag=e.flag)
            files[e.component] = Path(path)
        dtypes = args.dtypes
        self.flux_fp8 = dtypes["flux"] if dtypes["flux"] in FP8 else None
        self.compute_dtype = torch.bfloat16 if self.flux_fp8 else dtypes["flux"]
        self.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.offload = args.offload
        load_device = "cpu" if args.offload else self.device

        self.model = family.load_transformer(self.info, dtype=self.compute_dtype, device=load_device)
        self.model.eval().requires_grad_(False)
        self.text = family.load_text_encoders(
            files, dtype={c: dtypes[c] for c in files}, keep_fp8=any(dtypes[c] in FP8 for c in files),
            device=load_device, tokenizer_dir=args.tokenizer_cache_dir, max_length=family.text_length(self.info, None),
            mask_padding=args.apply_t5_attn_mask, autocast=contextlib.nullcontext)
        self.ae = family.load_autoencoder(args.ae, dtype=dtypes["ae"], device=load_device)

        self.merged = args.merge_lora_weights
        text_modules = [self.text.modules.get("clip_l"), self.text.modules.get("t5xxl")]
        self.networks = [read_lora_network(path, mult, self.model, text_modules) for path, mult in args.lora_weights]
        if self.merged:
            for network in self.networks:
                network.merge_into_base()  # before any fp8 storage, so the sum is taken in the compute dtype
        if self.flux_fp8 is not None:
            logger.info("transformer: %d Linear weights stored as %s",
                        store_linears_in_fp8(self.model, dtype=self.flux_fp8, keep=family.fp8_keep), self.flux_fp8)
        if not self.merged:
            for network in self.networks:
                network.to(self.device)
                network.apply_to()

        self.encode_fn: EncodeFn = lambda texts: self.text.encode(list(texts))  # noqa: E731
        self.apply_t5_attn_mask = args.apply_t5_attn_mask
        self.extra_info = {"model": args.ckpt_path.name,
                           "loras": ", ".join(f"{path};{mult:g}" for path, mult in args.lora_weights)}

    @property
    def variant(self) -> str:
        return self.info.variant

    def _stage(self, name: str) -> None:
        groups = {"encode": [m for m in self.text.modules.values() if m is not None], "denoise": [self.model],
                  "decode": [self.ae]}
        for stage, modules in groups.items():
            for module in modules:
                module.to(self.device if stage == name else "cpu")

    def set_multipliers(self, multipliers: Sequence[float]) -> None:
        if self.merged:
            logger.warning("--m has no effect: the LoRAs were merged (--merge_lora_weights)")
            return
        if len(multipliers) != len(self.networks):
            raise ConfigError(f"--m: {len(multipliers)} multiplier(s) for {len(self.networks)} LoRA(s); give one per "
                              "--lora_weights file, comma-separated", key="--m")
        for network, multiplier in zip(self.networks, multipliers, strict=True):
            network.set_multiplier(multiplier)

    def run(self, prompts: Sequence[SamplePrompt], output_dir: Path) -> list[Path]:
        images = generate_images(
            self.family, self.info, self.model, self.ae, self.encode_fn, prompts, device=self.device,
            dtype=self.compute_dtype, mask_text=self.apply_t5_attn_mask, progress=True,
            on_stage=self._stage if self.offload else None, extra_info=self.extra_info)
        stamp = time.strftime("%Y%m%d_%H%M%S")
        paths = []
        for i, image in enumerate(images):
            path = unique_path(output_dir, stamp if len(images) == 1 else f"{stamp}_{i:02d}")
            paths.append(save_png(image, path))
            logger.info("saved %s (seed %s)", path, image.info.get("seed"))
        return paths


def unique_path(folder: Path, stem: str) -> Path:
    """`folder/stem.png`, or `stem_1.png`, `stem_2.png`, ... if it exists: never overwrite an image."""
    path, n = folder / f"{stem}.png", 0
    while path.exists():
        n += 1
        path = folder / f"{stem}_{n}.png"
    return path


# ------------------------------------------------------------------------------------- interactive


def parse_interactive_line(line: str, base: SamplePrompt) -> tuple[SamplePrompt, list[float] | None]:
    """A terminal line with `--w --h --s --d --g --m --n --c` → (prompt, LoRA multipliers or None)."""
    prompt, flags = split_inline_flags(line)
    fields: dict = {"prompt": prompt}
    multipliers = None
    for name, value in flags:
        try:
            if name in ("w", "h"):
                fields["width" if name == "w" else "height"] = round_up_16(int(value), f"--{name}")
            elif name == "s":
                fields["steps"] = max(1, int(value))
            elif name == "d":
                fields["seed"] = int(value)
            elif name == "g":
                fields["guidance"] = float(value)
            elif name == "c":
                fields["cfg_scale"] = float(value)
            elif name == "n":
                fields["negative_prompt"] = "" if value == "-" else value
            elif name == "m":
                multipliers = [float(v) for v in value.split(",")]
            else:
                raise ConfigError(f"unknown option --{name}; use --w --h --s --d --g --m --n --c", key=f"--{name}")
        except ValueError:
            raise ConfigError(f"--{name} {value!r}: not a valid number", key=f"--{name}") from None
    return replace(base, **fields), multipliers


def interactive_loop(generator: Generator, base: SamplePrompt, output_dir: Path,
                     read_line: Callable[[str], str] = input) -> int:
    """Prompt, generate, repeat; an empty line or end of input quits. A bad line is reported and skipped."""
    help_line = ("prompt (empty to quit); options: --w W --h H --s STEPS --d SEED --g GUIDANCE "
                 "--m MULT[,MULT...] --n NEGATIVE (- for none) --c CFG")
    count = 0
    while True:
        try:
            line = read_line(f"{help_line}\n> ").strip()
        except EOFError:
            break
        if not line:
            break
        try:
            prompt, multipliers = parse_interactive_line(line, base)
            if multipliers is not None:
                generator.set_multipliers(multipliers)
            for path in generator.run([prompt], output_dir):
                print(path)
                count += 1
        except FluxLoraError as err:
            print(f"error: {err}")
    return count


# ------------------------------------------------------------------------------------------ main


def main(argv: Sequence[str]) -> int:
    """Run `flux_minimal_inference.py` / `fluxlora generate` with sd-scripts' flags; returns the exit code."""
    args = parse_generate_args(argv)
    output_dir = args.output_dir
    output_dir.mkdir(parents=True, exist_ok=True)
    generator = Generator(args)
    steps = args.steps if args.steps is not None else generator.family.default_sample_steps(generator.info)
    base = SamplePrompt(prompt=args.prompt, negative_prompt=args.negative_prompt, width=args.width,
                        height=args.height, seed=args.seed, steps=steps, guidance=args.guidance, cfg_scale=args.cfg_scale,
                        control_image=args.control_image, mask_image=args.mask_image)
    if args.interactive:
        interactive_loop(generator, base, output_dir)
        return 0
    prompts = load_prompt_file(args.from_file, defaults=base, flag="--from_file") if args.from_file else [base]
    for path in generator.run(prompts, output_dir):
        print(path)
    return 0
