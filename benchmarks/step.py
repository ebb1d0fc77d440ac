"""Training-step speed and memory: s/step, model-FLOP utilisation and peak memory beside the planner's estimate.

    python benchmarks/step.py --config medium                 # CPU: the whole trainer step, width 3072, 1 + 1 blocks, 256²
    python benchmarks/step.py --config medium --ckpt          # the same with --gradient_checkpointing
    python benchmarks/step.py --config medium --network_module lycoris.kohya --network_args algo=lokr  # an adapter
    python benchmarks/step.py --config medium --family kontext # the same for chroma | kontext | fill (default flux1)
    python benchmarks/step.py --config medium-step            # only the isolated step below, same model size
    PYTHONPATH=. python3 benchmarks/step.py --config gpu-suite # full-size FLUX, random weights, GPU cases

`medium` is the real trainer: a model set in the real file formats (FLUX with width 3072, 24 heads, 1 double + 1
single block, guidance embedding, random weights, BFL keys; a 1-layer T5 of d_model 4096; tiny CLIP-L and AE) and
four captioned 256² images are written to a temporary folder (in a child process, so they do not count in peak
RSS), then `fluxlora.training.cli.train` runs the normal command line (cached latents and text-encoder outputs,
rank-16 LoRA, AdamW, default --max_grad_norm, fp32, T5 length 512, TensorBoard logging, no sampling or saving
until the end). Its step time is the trainer's own `TrainResult.step_seconds`: batch from the cache, forward, loss,
backward, clip, optimizer, logging and progress bar. A step callback measures torch.mm after every timed step
(`gemm_rate` with one timed mm per shape after a warm one); each step's MFU uses the mean of the probes just before
and after it, so the machine's drifting matmul rate cancels; the median over steps is printed as `MFU <n> %`.

`medium-step` times only `training_loss` (σ/noise from the step generator, packing, the DiT with LoRA on every
block Linear, loss) → backward → AdamW step → zero_grad on random cached-conditioning style inputs (no files, no
loader, no clipping or logging); the difference to `medium` is the loop's overhead.

FLOP model (performance.md §1, per sample; h = width, L = image + text tokens, D/S = double/single blocks):
    per-token Linear FLOPs  lin = 2·(D + S)·12·h²·L + 2·T·4096·h (txt_in) + 2·N·64·h·2 (img_in, final layer)
      (12·h² per token per block: a double block's stream qkv 3h² + proj h² + MLP 8h²; a single block's linear1
       7h² + linear2 5h²; the modulation Linears act once per sample and are left out, as is the LoRA: < 1 %)
    attention FLOPs         att = (D + S)·4·L²·h
    LoRA step = 2·lin + 3.5·att; with checkpointing 3·lin + 4.5·att (frozen base: backward needs dX only).
MFU = model FLOPs per step / step time / P_gemm, where P_gemm is torch.mm's FLOP/s measured in this process, in the
step's dtype, on the step's own GEMM shapes (M = L·batch).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fluxlora.families.flux1.family import FLUX1  # noqa: E402
from fluxlora.families.flux1.shape import flux_shape  # noqa: E402
from fluxlora.models.flux import Flux, FluxParams  # noqa: E402
from fluxlora.network.lora import create_network  # noqa: E402
from fluxlora.training.blocks import apply_block_policy  # noqa: E402
from fluxlora.training.memory import BlockSwapper, move_except, swapped_positions  # noqa: E402
from fluxlora.training.planner import Workload, estimate  # noqa: E402
from fluxlora.training.step import step_generator, training_loss  # noqa: E402


def Conditioning(clip_pooled, t5_out, t5_mask):  # noqa: N802 - FLUX.1's text conditioning of the benchmark batch
    return {"clip_pooled": clip_pooled, "t5_out": t5_out, "t5_mask": t5_mask}

MEDIUM = FluxParams(depth=1, depth_single_blocks=1)  # width 3072, 24 heads, real GEMM shapes
FULL = FluxParams()  # FLUX.1-dev: 19 + 38 blocks


@dataclass(frozen=True)
class Case:
    resolution: int = 256
    batch: int = 1
    text_tokens: int = 512
    rank: int = 16
    dtype: str = "fp32"  # fp32 (no autocast) | bf16 (bf16 weights, bf16 autocast)
    fp8: bool = False
    ckpt: bool = False
    swap: int = 0
    image_sequences: int = 1  # Kontext: the reference's tokens ride along with the noisy ones (2)

    @property
    def name(self) -> str:
        return (f"{self.resolution}² b{self.batch} {self.dtype}{'+fp8' if self.fp8 else ''} "
                f"{'ckpt' if self.ckpt else 'no-ckpt'} swap {self.swap}")


def flow_settings():
    from fluxlora.config.train_config import FlowSettings

    return FlowSettings(
        t5xxl_max_token_length=None, apply_t5_attn_mask=False, guidance_scale=1.0, timestep_sampling="sigmoid",
        sigmoid_scale=1.0, discrete_flow_shift=3.1582, model_prediction_type="raw", weighting_scheme="none",
        logit_mean=0.0, logit_std=1.0, mode_scale=1.29, ip_noise_gamma=None, ip_noise_gamma_random_strength=False,
        loss_type="l2", huber_schedule="snr", huber_c=0.1, huber_scale=1.0)


# ---- FLOPs ------------------------------------------------------------------------------------------------------
def step_flops(p: FluxParams, case: Case) -> float:
    n = (case.resolution // 16) ** 2 * case.image_sequences
    length = n + case.text_tokens
    h, blocks = p.hidden_size, p.depth + p.depth_single_blocks
    lin = 2 * blocks * 12 * h * h * length + 2 * case.text_tokens * p.context_in_dim * h + 2 * n * p.in_channels * h * 2
    att = blocks * 4 * length * length * h
    flops = (3 * lin + 4.5 * att) if case.ckpt else (2 * lin + 3.5 * att)
    return flops * case.batch


def gemm_shapes(p: FluxParams, m: int) -> list[tuple[int, int, int]]:
    h, mlp = p.hidden_size, p.mlp_hidden_dim
    return [(m, h, 3 * h), (m, h, mlp), (m, mlp, h), (m, h, 3 * h + mlp), (m, h + mlp, h)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gemm_rate(p: FluxParams, m: int, dtype: torch.dtype, device: torch.device, repeats: int = 3) -> float:
    """FLOP-weighted harmonic mean of torch.mm FLOP/s over the model's GEMM shapes (total FLOPs / total time)."""
    flops = seconds = 0.0
    for mm, k, n in gemm_shapes(p, m):
        a = torch.randn(mm, k, dtype=dtype, device=device)
        b = torch.randn(k, n, dtype=dtype, device=device)
        torch.mm(a, b)
        sync(device)
        best = math.inf
        for _ in range(repeats):
            t = time.perf_counter()
            torch.mm(a, b)
            sync(device)
            best = min(best, time.perf_counter() - t)
        flops += 2 * mm * k * n
        seconds += best
    return flops / seconds


# ---- model ------------------------------------------------------------------------------------------------------
@torch.no_grad()
def random_model(p: FluxParams, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Flux:
    torch.manual_seed(seed)
    with torch.device("meta"):
        flux = Flux(p)
    flux = flux.to_empty(device=device).to(dtype)
    for name, t in flux.named_parameters():
        if t.ndim >= 2:
            t.normal_(0.0, 1.0 / math.sqrt(t.shape[1]))
        elif name.endswith("bias"):
            t.normal_(0.0, 0.02)
        else:
            t.fill_(1.0)
    flux.requires_grad_(False)
    return flux.train()


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_case(flux: Flux, p: FluxParams, case: Case, device: torch.device, *, steps: int, warmup: int,
             p_gemm: float | None = None, host_baseline: int | None = None) -> dict:
    """Time one case; on a CPU the planner's estimate is compared with peak RSS, its fixed runtime allowance
    replaced by `host_baseline` (this process's RSS before the model was built)."""
    dtype = torch.bfloat16 if case.dtype == "bf16" else torch.float32
    swapper = None
    if case.swap:
        layout = FLUX1.blocks(flux)
        swapper = BlockSwapper(layout.sequence, swapped_positions(layout, case.swap), device)
        move_except(flux, device, swapper.swapped_parameters())
    apply_block_policy(FLUX1.blocks(flux), checkpointed=None if case.ckpt else frozenset(), offload=False,
                       device=device)
    network = create_network(1.0, case.rank, case.rank, flux, [], train_text_encoder=False,
                             generator=torch.Generator().manual_seed(0))
    network.apply_to()
    network.to(device)
    network.requires_grad_(True)
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(1)
    side = case.resolution // 8
    latents = torch.randn(case.batch, 16, side, side, generator=g)
    cond = Conditioning(torch.randn(case.batch, p.vec_in_dim, generator=g),
                        torch.randn(case.batch, case.text_tokens, p.context_in_dim, generator=g),
                        torch.ones(case.batch, case.text_tokens, dtype=torch.bool))
    settings = flow_settings()

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16) if dtype == torch.bfloat16 else torch.autocast(
            device.type, enabled=False)

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    times, losses = [], []
    for i in range(warmup + steps):
        sync(device)
        t = time.perf_counter()
        out = training_loss(FLUX1, flux, latents.to(device), cond, settings, generator=step_generator(0, 1, i),
                            guidance=1.0 if p.guidance_embed else None, compute_dtype=dtype, autocast=autocast)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t)
        losses.append(float(out.loss.detach()))
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_rss_bytes()
    network.remove()
    if swapper is not None:
        swapper.remove(device)
    if p_gemm is None:
        p_gemm = gemm_rate(p, case.batch * ((case.resolution // 16) ** 2 + case.text_tokens), dtype, device)
    median = statistics.median(times)
    q = statistics.quantiles(times, n=10) if len(times) >= 2 else [median] * 9
    flops = step_flops(p, case)
    workload = Workload(shape=flux_shape(p), batch_size=case.batch, image_tokens=(case.resolution // 16) ** 2,
                        text_tokens=case.text_tokens, weight_dtype=dtype, fp8=case.fp8,
                        compute_dtype=torch.bfloat16 if dtype == torch.bfloat16 else None, lora_rank=case.rank,
                        gradient_checkpointing=case.ckpt, blocks_to_swap=case.swap)
    plan = estimate(workload)
    runtime = plan.host["runtime"] if host_baseline is None else host_baseline
    est = plan.device_peak + (runtime if device.type == "cpu" else 0)
    return {"case": case.name, "s_per_step": median, "p10": q[0], "p90": q[-1], "step_tflop": flops / 1e12,
            "p_gemm_tflops": p_gemm / 1e12, "mfu": flops / median / p_gemm, "peak_gb": peak / 1e9,
            "planner_gb": est / 1e9, "planner_vs_peak": est / peak, "losses": losses[:3]}


def report(r: dict) -> None:
    print(f"{r['case']}: {r['s_per_step']:.3f} s/step (p10 {r['p10']:.3f}, p90 {r['p90']:.3f}); "
          f"{r['step_tflop']:.3f} TFLOP/step; P_gemm {r['p_gemm_tflops']:.3f} TFLOP/s; "
          f"peak {r['peak_gb']:.2f} GB, planner {r['planner_gb']:.2f} GB ({100 * r['planner_vs_peak']:.0f} %)")
    print(f"MFU {100 * r['mfu']:.1f} %", flush=True)


# ---- configurations -------------------------------------------------------------------------------------------------
def medium_step(args) -> None:
    """The isolated step (`run_case`) at the medium size, P_gemm measured before and after."""
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    baseline = rss_bytes()
    case = Case(resolution=args.resolution, text_tokens=args.text_tokens, rank=args.rank, dtype=args.dtype,
                ckpt=args.ckpt)
    m = (args.resolution // 16) ** 2 + args.text_tokens
    before = gemm_rate(MEDIUM, m, dtype, device)
    flux = random_model(MEDIUM, dtype, device)
    r = run_case(flux, MEDIUM, case, device, steps=args.steps, warmup=args.warmup, p_gemm=before,
                 host_baseline=baseline)
    after = gemm_rate(MEDIUM, m, dtype, device)
    r["p_gemm_drift"] = after / before - 1
    r["baseline_rss_gb"] = baseline / 1e9
    report(r)
    print(f"P_gemm before {before / 1e9:.1f} / after {after / 1e9:.1f} GFLOP/s (drift {100 * r['p_gemm_drift']:+.1f} %); "
          f"process RSS before the model {baseline / 1e9:.2f} GB; load {os.getloadavg()}")
    print(json.dumps(r))


def swap_check(device: torch.device) -> None:
    """Block swap on the real device: outputs and LoRA gradients with 4 swapped blocks vs none (width 3072)."""
    p = FluxParams(depth=4, depth_single_blocks=6)
    flux = random_model(p, torch.bfloat16, device, seed=3)
    apply_block_policy(FLUX1.blocks(flux), checkpointed=None, offload=False, device=device)
    network = create_network(1.0, 8, 8, flux, [], train_text_encoder=False, generator=torch.Generator().manual_seed(0))
    network.apply_to()
    network.to(device)
    with torch.no_grad():
        for lora in network.loras:
            for w in lora.up_weights():
                w.normal_(0.0, 0.01)
    network.requires_grad_(True)
    g = torch.Generator().manual_seed(1)
    cond = Conditioning(torch.randn(1, 768, generator=g), torch.randn(1, 128, 4096, generator=g),
                        torch.ones(1, 128, dtype=torch.bool))
    latents = torch.randn(1, 16, 64, 64, generator=g)

    def once():
        for q in network.parameters():
            q.grad = None
        out = training_loss(FLUX1, flux, latents.to(device), cond, flow_settings(), generator=step_generator(0, 1, 0),
                            guidance=1.0, compute_dtype=torch.bfloat16,
                            autocast=lambda: torch.autocast("cuda", dtype=torch.bfloat16))
        out.loss.backward()
        return float(out.loss.detach()), [q.grad.float().clone() for q in network.parameters()]

    ref_loss, ref = once()
    _, again = once()  # the same step again without swap: the device's own run-to-run noise
    noise = max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)) for a, b in zip(again, ref, strict=False))
    print(f"no-swap repeat: max relative LoRA-grad difference {noise:.2e}", flush=True)
    swapper = BlockSwapper(FLUX1.blocks(flux).sequence, swapped_positions(FLUX1.blocks(flux), 4), device)
    move_except(flux, device, swapper.swapped_parameters())
    results = [once() for _ in range(2)]
    for loss, grads in results:
        worst = max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)) for a, b in zip(grads, ref, strict=False))
        print(f"swap check (CUDA, 2 double + 4 single of 4 + 6 swapped): loss {loss!r} vs {ref_loss!r}, "
              f"max relative LoRA-grad difference {worst:.2e}, exact={loss == ref_loss and worst == 0.0}, "
              f"late loads {swapper.stats.late}", flush=True)
    swapper.remove()
    network.remove()
    torch.cuda.empty_cache()


def gpu_suite(args) -> None:
    device = torch.device("cuda")
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    swap_check(device)
    if args.swap_check_only:
        return
    flux = random_model(FULL, torch.bfloat16, device)
    results = []
    cases = [Case(resolution=r, dtype="bf16", ckpt=c, swap=s) for r in (1024, 512) for (c, s) in
             ((False, 0), (True, 0), (True, 19))]
    cases += [Case(resolution=1024, dtype="bf16", ckpt=True, swap=35)]
    for case in cases:
        if case.name.split()[0] in args.skip:
            continue
        r = run_case(flux, FULL, case, device, steps=args.steps, warmup=args.warmup)
        report(r)
        results.append(r)
    from fluxlora.models.fp8 import store_linears_in_fp8

    store_linears_in_fp8(flux)
    for case in (Case(resolution=1024, dtype="bf16", fp8=True, ckpt=True), Case(resolution=1024, dtype="bf16", fp8=True),
                 Case(resolution=1024, dtype="bf16", fp8=True, ckpt=True, swap=19)):
        r = run_case(flux, FULL, case, device, steps=args.steps, warmup=args.warmup)
        report(r)
        results.append(r)
    by = {r["case"]: r for r in results}
    for res in (1024, 512):
        a, b = by.get(f"{res}² b1 bf16 ckpt swap 19"), by.get(f"{res}² b1 bf16 ckpt swap 0")
        if a and b:
            print(f"{res}²: swap-19 / no-swap step time = {a['s_per_step'] / b['s_per_step']:.3f}")
    print(json.dumps(results))


def gpu_compile(args) -> None:
    """Eager vs regional torch.compile (each block's forward compiled) at full size, same process and weights."""
    from fluxlora.training.compile import compile_blocks

    device = torch.device("cuda")
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    flux = random_model(FULL, torch.bfloat16, device)
    cases = [Case(resolution=r, dtype="bf16") for r in (1024, 512)]
    eager = [run_case(flux, FULL, c, device, steps=args.steps, warmup=args.warmup) for c in cases]
    for r in eager:
        report(r)
    start = time.perf_counter()
    compile_blocks(flux)
    compiled = []
    for case in cases:
        r = run_case(flux, FULL, case, device, steps=args.steps, warmup=args.warmup)
        r["case"] += " compiled"
        report(r)
        compiled.append(r)
    print(f"compile + compiled runs took {time.perf_counter() - start:.1f} s in all")
    for e, c in zip(eager, compiled, strict=True):
        print(f"{e['case']}: compiled / eager step time = {c['s_per_step'] / e['s_per_step']:.3f}")
    print(json.dumps(eager + compiled))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=["medium", "medium-step", "gpu-suite", "gpu-compile"], default="medium")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--ckpt", action="store_true", help="per-block gradient checkpointing")
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--text_tokens", type=int, default=512)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--network_module", default="networks.lora_flux",
                    help="medium: the trainer's --network_module (lycoris.kohya for LoKr / LoHa / full)")
    ap.add_argument("--network_args", nargs="*", default=[], help="medium: the trainer's --network_args, e.g. algo=lokr")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip", nargs="*", default=[])
    ap.add_argument("--swap_check_only", action="store_true")
    ap.add_argument("--images", type=int, default=4, help="medium: captioned images in the dataset (batch 1)")
    ap.add_argument("--family", choices=["flux1", "chroma", "kontext", "fill"], default="flux1",
                    help="medium: the model family (kontext: reference images, fill: masks, paired by file stem)")
    ap.add_argument("--keep", type=Path, default=None,
                    help="medium: write the model set, dataset and outputs here and keep them, or reuse the model "
                         "set and dataset already there (default: a temporary folder)")
    args = ap.parse_args()
    if args.config == "medium" and args.warmup < 1:
        ap.error("--config medium needs --warmup >= 1 (the first timed step's probe is taken after a warm-up step)")
    from step_trainer import medium_trainer  # the whole trainer step, in its own file

    configs = {"medium": medium_trainer, "medium-step": medium_step, "gpu-suite": gpu_suite, "gpu-compile": gpu_compile}
    configs[args.config](args)


if __name__ == "__main__":
    main()
