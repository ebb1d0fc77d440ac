"""`benchmarks/step.py --config medium`: the whole training step of the real trainer on the medium CPU config.

A model set in the real file formats is written (FLUX width 3072, 24 heads, 1 + 1 blocks; a 4096-wide 1-layer T5;
tiny CLIP-L and AE) with a few captioned images, and `fluxlora.training.cli.train` runs with the normal flags; a step
callback probes torch.mm after every step, so MFU is taken against the GEMM rate of the same moment. See
benchmarks/README.md ("Results: medium CPU config") and `step.py` for the FLOP model.

`--family` writes that transformer as the family's file instead: `chroma` (the same blocks without modulation
linears, the real 5 × 5120 approximator, no CLIP-L), `kontext` (the dev layout, `--model_type kontext`, a reference
image per training image: twice the image tokens), `fill` (`img_in` reading 384 channels, a mask per image).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from step import MEDIUM, Case, gemm_rate, peak_rss_bytes, rss_bytes, step_flops  # noqa: E402

from fluxlora.models.flux import FluxParams  # noqa: E402
from fluxlora.training.planner import estimate  # noqa: E402

# ---- the whole trainer step (medium) ----------------------------------------------------------------------------
MEDIUM_T5 = {"d_model": 4096, "num_layers": 1, "num_decoder_layers": 1, "d_ff": 256, "num_heads": 4, "d_kv": 64}
CAPTIONS = ("a photo of sks red square", "a red square on noise", "sks, a square, red", "noise with a red square")


def medium_file_params() -> FluxParams:
    """MEDIUM with the text-encoder widths of the written model set (tiny CLIP-L, 4096-wide T5)."""
    from dataclasses import replace

    from fluxlora.models.text_encoders import tiny_clip_l_config

    return replace(MEDIUM, vec_in_dim=tiny_clip_l_config().hidden_size, context_in_dim=MEDIUM_T5["d_model"])


MODEL_FILES = {"flux1": "flux1-dev.safetensors", "chroma": "chroma.safetensors",
               "kontext": "flux1-kontext-dev.safetensors", "fill": "flux1-fill-dev.safetensors"}


def write_family_model(models: Path, family: str) -> None:
    """The medium transformer as `family`'s file (flux1 and kontext: the file written with the text encoders)."""
    from dataclasses import replace

    from fluxlora.families.chroma.model import Chroma, ChromaParams
    from fluxlora.families.tiny import random_model
    from fluxlora.files import save_safetensors
    from fluxlora.models.flux import Flux

    p = medium_file_params()
    if family == "chroma":
        params = ChromaParams(context_in_dim=p.context_in_dim, depth=p.depth, depth_single_blocks=p.depth_single_blocks)
        model = random_model(Chroma, params, torch.Generator().manual_seed(0))
    elif family == "fill":
        model = random_model(Flux, replace(p, in_channels=384, out_channels=64), torch.Generator().manual_seed(0))
    else:
        (models / MODEL_FILES[family]).write_bytes((models / MODEL_FILES["flux1"]).read_bytes())
        return
    save_safetensors(models / MODEL_FILES[family], model.state_dict())


def write_model_set(folder: Path, resolution: int, images: int, family: str = "flux1") -> None:
    """Model files in the real formats plus a captioned dataset and its TOML, under `folder`."""
    import numpy as np
    from PIL import Image

    from fluxlora.models.tiny import write_tiny_checkpoints

    write_tiny_checkpoints(folder / "models", seed=0, flux_params=medium_file_params(), t5_overrides=MEDIUM_T5,
                           schnell=False)
    if family != "flux1":
        write_family_model(folder / "models", family)
    img_dir = folder / "img"
    img_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(images):
        pixels = (rng.random((resolution, resolution, 3)) * 255).astype("uint8")
        pixels[resolution // 4: 3 * resolution // 4, resolution // 4: 3 * resolution // 4] = (230, 20, 20)
        Image.fromarray(pixels).save(img_dir / f"{i:02d}.png")
        (img_dir / f"{i:02d}.txt").write_text(CAPTIONS[i % len(CAPTIONS)], encoding="utf-8")
    pairs = ""
    if family in ("kontext", "fill"):  # a reference image (the image inverted) or a mask (its centre) per image
        control_dir = folder / "control"
        control_dir.mkdir(exist_ok=True)
        for i in range(images):
            pixels = np.asarray(Image.open(img_dir / f"{i:02d}.png"))
            if family == "kontext":
                Image.fromarray(255 - pixels).save(control_dir / f"{i:02d}.png")
            else:
                mask = np.zeros(pixels.shape[:2], np.uint8)
                mask[resolution // 4: 3 * resolution // 4, resolution // 4: 3 * resolution // 4] = 255
                Image.fromarray(mask, "L").save(control_dir / f"{i:02d}.png")
        pairs = f'  conditioning_data_dir = "{control_dir.as_posix()}"\n'
    (folder / "dataset.toml").write_text(
        f'[general]\ncaption_extension = ".txt"\n\n[[datasets]]\nresolution = {resolution}\nbatch_size = 1\n'
        f'  [[datasets.subsets]]\n  image_dir = "{img_dir.as_posix()}"\n  num_repeats = 1\n{pairs}', encoding="utf-8")


def write_model_set_in_child(folder: Path, resolution: int, images: int, family: str = "flux1") -> None:
    """`write_model_set` in a spawned process: building 2 GB of weights must not raise this process's peak RSS."""
    import multiprocessing

    child = multiprocessing.get_context("spawn").Process(target=write_model_set,
                                                         args=(folder, resolution, images, family))
    child.start()
    child.join()
    if child.exitcode != 0:
        raise SystemExit(f"writing the model set into {folder} failed (exit code {child.exitcode})")


def medium_argv(folder: Path, args) -> list[str]:
    models = folder / "models"
    out = folder / "runs" / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"  # kept folders hold several runs
    family = getattr(args, "family", "flux1")
    argv = [
        f"--pretrained_model_name_or_path={models / MODEL_FILES[family]}",
        *([] if family == "chroma" else [f"--clip_l={models / 'clip_l.safetensors'}"]),
        *(["--model_type=kontext"] if family == "kontext" else []),
        f"--t5xxl={models / 't5xxl.safetensors'}", f"--ae={models / 'ae.safetensors'}",
        f"--dataset_config={folder / 'dataset.toml'}", f"--output_dir={out}", "--output_name=bench",
        f"--network_module={args.network_module}", f"--network_dim={args.rank}", f"--network_alpha={args.rank}",
        "--network_train_unet_only", "--optimizer_type=AdamW", "--learning_rate=1e-4", "--seed=1",
        f"--mixed_precision={'bf16' if args.dtype == 'bf16' else 'no'}", f"--t5xxl_max_token_length={args.text_tokens}",
        "--cache_latents", "--cache_text_encoder_outputs", f"--max_train_steps={args.warmup + args.steps}",
        "--max_data_loader_n_workers=0", "--log_with=tensorboard", f"--logging_dir={out / 'logs'}",
    ]
    argv += ["--network_args", *args.network_args] if args.network_args else []
    return argv + (["--gradient_checkpointing"] if args.ckpt else [])


class GemmProbe:
    """Step callback: torch.mm's FLOP/s on the model's GEMM shapes after every step from `first_step` on, and the
    planner's estimate for the run (taken from the prepared `Run` at its first step)."""

    def __init__(self, p: FluxParams, m: int, dtype: torch.dtype, first_step: int):
        self.p, self.m, self.dtype, self.first_step = p, m, dtype, first_step
        self.rates: dict[int, float] = {}
        self.first_step_done_at: float | None = None
        self.planner: dict[str, float] = {}

    def __call__(self, run, global_step: int) -> None:
        if self.first_step_done_at is None:
            self.first_step_done_at = time.perf_counter()
            plan = estimate(run.plan.workload)
            self.planner = {"device_peak": plan.device_peak, "host_peak": plan.host_peak, "cpu_peak": plan.cpu_peak,
                            "runtime": plan.host["runtime"]}
        if global_step >= self.first_step:
            self.rates[global_step] = gemm_rate(self.p, self.m, self.dtype, torch.device("cpu"), repeats=1)


def quantiles(values: list[float]) -> tuple[float, float, float]:
    """(p10, median, p90)."""
    q = statistics.quantiles(values, n=10) if len(values) >= 2 else [values[0]] * 9
    return q[0], statistics.median(values), q[-1]


def medium_trainer(args) -> None:
    """The whole training step of the real trainer (see the module docstring)."""
    import tempfile

    from fluxlora.training.cli import train

    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    case = Case(resolution=args.resolution, text_tokens=args.text_tokens, rank=args.rank, dtype=args.dtype,
                ckpt=args.ckpt, image_sequences=2 if args.family == "kontext" else 1)
    m = (args.resolution // 16) ** 2 * case.image_sequences + args.text_tokens
    p = medium_file_params()
    with tempfile.TemporaryDirectory(prefix="fluxlora-bench-") as tmp:
        folder = args.keep or Path(tmp)
        folder = folder if args.family == "flux1" else folder / args.family
        t = time.perf_counter()
        if not (folder / "dataset.toml").is_file():  # a kept folder from an earlier run is reused
            write_model_set_in_child(folder, args.resolution, args.images, args.family)
        written = time.perf_counter() - t
        before = gemm_rate(p, m, dtype, device)
        baseline = rss_bytes()
        probe = GemmProbe(p, m, dtype, first_step=args.warmup)
        start = time.perf_counter()
        result = train(medium_argv(folder, args), callbacks=[probe])
        after = gemm_rate(p, m, dtype, device)
    peak = peak_rss_bytes()
    flops = step_flops(p, case)
    timed = list(range(args.warmup, args.warmup + args.steps))  # indices into step_seconds; global step = index + 1
    seconds = [result.step_seconds[i] for i in timed]
    mfus = [flops / result.step_seconds[i] / ((probe.rates[i] + probe.rates[i + 1]) / 2) for i in timed]
    probes = [probe.rates[i] for i in range(args.warmup, args.warmup + args.steps + 1)]
    s10, s50, s90 = quantiles(seconds)
    m10, m50, m90 = quantiles(mfus)
    g10, g50, g90 = quantiles(probes)
    planner = probe.planner["cpu_peak"]
    planner_rss = probe.planner["device_peak"] + baseline  # the planner's runtime allowance replaced by this process's
    r = {"case": f"trainer {args.family} {case.name}", "s_per_step": s50, "p10": s10, "p90": s90, "step_tflop": flops / 1e12,
         "mfu": m50, "mfu_p10": m10, "mfu_p90": m90, "probe_gflops_p10_median_p90": [g10 / 1e9, g50 / 1e9, g90 / 1e9],
         "p_gemm_before_gflops": before / 1e9, "p_gemm_after_gflops": after / 1e9, "mfu_vs_before": flops / s50 / before,
         "mfu_vs_after": flops / s50 / after, "first_step_s": result.step_seconds[0],
         "train_call_to_first_step_end_s": probe.first_step_done_at - start, "files_written_s": written,
         "peak_rss_gb": peak / 1e9, "rss_before_train_gb": baseline / 1e9, "planner_gb": planner / 1e9,
         "planner_device_plus_rss_before_gb": planner_rss / 1e9, "losses": result.losses[:5],
         "step_seconds": result.step_seconds, "load": os.getloadavg()}
    print(f"{r['case']}: {s50:.3f} s/step (p10 {s10:.3f}, p90 {s90:.3f}) over {len(seconds)} steps after "
          f"{args.warmup} warm-up; {flops / 1e12:.3f} TFLOP/step; probe P_gemm {g50 / 1e9:.1f} GFLOP/s "
          f"(p10 {g10 / 1e9:.1f}, p90 {g90 / 1e9:.1f}); per-step MFU p10 {100 * m10:.1f} %, p90 {100 * m90:.1f} %")
    print(f"MFU {100 * m50:.1f} %")
    print(f"classic: P_gemm before {before / 1e9:.1f} / after {after / 1e9:.1f} GFLOP/s "
          f"(drift {100 * (after / before - 1):+.1f} %), MFU vs before {100 * r['mfu_vs_before']:.1f} %, "
          f"vs after {100 * r['mfu_vs_after']:.1f} %")
    print(f"first step {r['first_step_s']:.2f} s (train() call to end of first step "
          f"{r['train_call_to_first_step_end_s']:.1f} s: loading, caching, first batch); peak RSS {peak / 1e9:.2f} GB; "
          f"planner {planner / 1e9:.2f} GB (`fluxlora check` on a CPU: the larger phase + runtime, MemoryPlan.cpu_peak), "
          f"{planner_rss / 1e9:.2f} GB with RSS before train() ({baseline / 1e9:.2f} GB) as the runtime; "
          f"first losses {[round(x, 5) for x in result.losses[:3]]}; load {os.getloadavg()}")
    print(json.dumps(r), flush=True)
