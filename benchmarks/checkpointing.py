"""Gradient-checkpointing granularity: s/step against activation memory, per granularity, on the CPU at width 3072.

    OMP_NUM_THREADS=2 flock /tmp/cpu.lock .venv/bin/python benchmarks/checkpointing.py          # every case
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/checkpointing.py --cases none half --steps 3  # a subset

Model: width 3072, 24 heads, 2 double + 2 single blocks, random weights, fp32 (no autocast), rank-16 LoRA on every
block Linear, AdamW, batch 1, 256² (256 image tokens) + 512 T5 tokens. The step is the trainer's `training_loss` →
backward → AdamW step → zero_grad (as `benchmarks/step.py`'s `run_case`). Cases (`CASES`):

    none       no checkpointing
    all        every block checkpointed (sd-scripts --gradient_checkpointing; fluxlora's default)
    half       the first half of the blocks in execution order (the 2 double blocks; `--checkpoint_blocks 2`)
    sel-mm     selective, every block: outputs of matmuls (mm/addmm/bmm) and attention saved, the rest recomputed
               (norms, modulation, GELU, RoPE, LoRA scaling, residual adds) — `create_selective_checkpoint_contexts`
    sel-attn   selective, every block: only attention outputs saved; matmuls and everything else recomputed

Each case runs in its own process, so its peak RSS is its own. glibc is told to serve every allocation above 64 KB
with mmap (`MALLOC_MMAP_THRESHOLD_`), so freed activations leave RSS at once and RSS deltas are exact byte counts:
- `held`: RSS after the forward pass (loss computed, graph alive) minus RSS before it — what the step keeps for
  backward, whichever mechanism keeps it (autograd's saved tensors, checkpoint inputs, the selective cache);
- `saved`: bytes of distinct non-parameter storages autograd saved for backward, counted with
  `torch.autograd.graph.saved_tensors_hooks` (deterministic; blind to the selective-checkpoint cache, so only the
  per-block cases are meaningful there);
- `peak`: peak RSS of the process minus RSS before the first step (activations + backward's gradients + AdamW state).
The trade-off column is (s/step − s/step without checkpointing) / (GB of `held` saved): seconds added per GB.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.step import Conditioning, flow_settings, gemm_rate, random_model  # noqa: E402
from fluxlora.families.flux1.family import FLUX1  # noqa: E402
from fluxlora.families.flux1.shape import flux_shape  # noqa: E402
from fluxlora.models.flux import FluxParams  # noqa: E402
from fluxlora.network.lora import create_network  # noqa: E402
from fluxlora.training import blocks as blocks_module  # noqa: E402
from fluxlora.training.blocks import apply_block_policy, checkpointed_positions  # noqa: E402
from fluxlora.training.planner import Workload, estimate  # noqa: E402
from fluxlora.training.step import step_generator, training_loss  # noqa: E402

PARAMS = FluxParams(depth=2, depth_single_blocks=2)  # width 3072, 24 heads: the real GEMM shapes
CASES = ("none", "all", "half", "sel-mm", "sel-attn")
MMAP_THRESHOLD = "65536"
ATTENTION_OPS = {"_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
                 "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention"}
MATMUL_OPS = {"mm", "addmm", "bmm", "baddbmm"}


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def selective_policy(saved_ops: set[str]):
    """A `create_selective_checkpoint_contexts` policy: save the outputs of `saved_ops` (aten op names), recompute
    every other op in backward."""
    from torch.utils.checkpoint import CheckpointPolicy

    def policy(ctx, op, *args, **kwargs):
        name = str(op).split(".")[1] if str(op).startswith("aten.") else str(op)
        return CheckpointPolicy.MUST_SAVE if name in saved_ops else CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def configure(flux, case: str) -> None:
    """Set the model (and, for selective cases, the checkpoint function `training.blocks` calls) up for `case`."""
    from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

    p = flux.params
    blocks = p.depth + p.depth_single_blocks
    chosen = checkpointed_positions(blocks, blocks // 2) if case == "half" else None
    apply_block_policy(FLUX1.blocks(flux), checkpointed=frozenset() if case == "none" else chosen, offload=False,
                       device="cpu")
    if case.startswith("sel-"):
        ops = ATTENTION_OPS | (MATMUL_OPS if case == "sel-mm" else set())
        context = functools.partial(create_selective_checkpoint_contexts, selective_policy(ops))
        blocks_module.checkpoint = functools.partial(checkpoint, context_fn=context)


def planner_bytes(case: str, p: FluxParams, resolution: int, text_tokens: int, rank: int) -> int | None:
    """The planner's activation estimate for the per-block cases (it does not model selective checkpointing)."""
    if case.startswith("sel-"):
        return None
    blocks = p.depth + p.depth_single_blocks
    n = {"none": 0, "all": blocks, "half": blocks // 2}[case]
    w = Workload(shape=flux_shape(p), image_tokens=(resolution // 16) ** 2, text_tokens=text_tokens, weight_dtype=torch.float32,
                 compute_dtype=None, lora_rank=rank, gradient_checkpointing=n > 0, checkpoint_blocks=n)
    return sum(v for k, v in estimate(w).device.items() if k.startswith("activations"))


def run_one(case: str, args) -> dict:
    """Time `case` in this process; returns its measurements."""
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    p = PARAMS
    m = (args.resolution // 16) ** 2 + args.text_tokens
    gemm_before = gemm_rate(p, m, torch.float32, device)
    flux = random_model(p, torch.float32, device)
    configure(flux, case)
    network = create_network(1.0, args.rank, args.rank, flux, [], train_text_encoder=False,
                             generator=torch.Generator().manual_seed(0))
    network.apply_to()
    network.requires_grad_(True)
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(1)
    side = args.resolution // 8
    latents = torch.randn(1, 16, side, side, generator=g)
    cond = Conditioning(torch.randn(1, p.vec_in_dim, generator=g), torch.randn(1, args.text_tokens, p.context_in_dim,
                                                                                  generator=g),
                        torch.ones(1, args.text_tokens, dtype=torch.bool))
    settings = flow_settings()
    weights = {t.untyped_storage().data_ptr() for t in [*flux.parameters(), *network.parameters()]}

    def step(i: int, measure: bool = False) -> dict:
        saved: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            ptr = t.untyped_storage().data_ptr()
            if ptr not in weights:
                saved[ptr] = t.untyped_storage().nbytes()
            return t

        before = rss()
        if measure:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out = training_loss(FLUX1, flux, latents, cond, settings, generator=step_generator(0, 1, i),
                                    guidance=1.0 if p.guidance_embed else None, compute_dtype=torch.float32,
                                    autocast=lambda: torch.autocast("cpu", enabled=False))
        else:
            out = training_loss(FLUX1, flux, latents, cond, settings, generator=step_generator(0, 1, i),
                                guidance=1.0 if p.guidance_embed else None, compute_dtype=torch.float32,
                                autocast=lambda: torch.autocast("cpu", enabled=False))
        held = rss() - before
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return {"held": held, "saved": sum(saved.values()), "loss": float(out.loss.detach()), "before": before}

    first = step(0, measure=True)
    times, losses = [], [first["loss"]]
    for i in range(1, 1 + args.warmup + args.steps):
        t = time.perf_counter()
        losses.append(step(i)["loss"])
        if i > args.warmup:
            times.append(time.perf_counter() - t)
    peak = peak_rss() - first["before"]  # before the second P_gemm probe, whose operands are large
    gemm_after = gemm_rate(p, m, torch.float32, device)
    q = statistics.quantiles(times, n=10) if len(times) >= 2 else [times[0]] * 9
    return {"case": case, "s_per_step": statistics.median(times), "p10": q[0], "p90": q[-1], "steps": len(times),
            "held_gb": first["held"] / 1e9, "saved_gb": first["saved"] / 1e9,
            "peak_gb": peak / 1e9,
            "planner_gb": (lambda b: None if b is None else b / 1e9)(
                planner_bytes(case, p, args.resolution, args.text_tokens, args.rank)),
            "p_gemm_gflops": [gemm_before / 1e9, gemm_after / 1e9], "losses": losses[:3],
            "load": os.getloadavg()}


def table(results: list[dict]) -> list[str]:
    base = next((r for r in results if r["case"] == "none"), None)
    lines = ["| case | s/step (p10-p90) | held after forward GB | saved (hooks) GB | peak GB | planner act. GB "
             "| +s per GB saved | P_gemm GFLOP/s before/after |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        trade = "-"
        if base is not None and r is not base and base["held_gb"] > r["held_gb"]:
            trade = f"{(r['s_per_step'] - base['s_per_step']) / (base['held_gb'] - r['held_gb']):.2f}"
        planner = "-" if r["planner_gb"] is None else f"{r['planner_gb']:.3f}"
        lines.append(f"| {r['case']} | {r['s_per_step']:.2f} ({r['p10']:.2f}-{r['p90']:.2f}) | {r['held_gb']:.3f} | "
                     f"{r['saved_gb']:.3f} | {r['peak_gb']:.3f} | {planner} | {trade} | "
                     f"{r['p_gemm_gflops'][0]:.0f} / {r['p_gemm_gflops'][1]:.0f} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="*", choices=CASES, default=list(CASES))
    ap.add_argument("--case", choices=CASES, help="run one case in this process and print its JSON (internal)")
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--text_tokens", type=int, default=512)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.case:
        print(json.dumps(run_one(args.case, args)), flush=True)
        return
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": MMAP_THRESHOLD, "OMP_NUM_THREADS": str(args.threads)}
    passthrough = [f"--{k}={getattr(args, k)}" for k in ("resolution", "text_tokens", "rank", "steps", "warmup",
                                                           "threads")]
    results = []
    for case in args.cases:
        out = subprocess.run([sys.executable, __file__, "--case", case, *passthrough], env=env, check=True,
                             capture_output=True, text=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
    print("\n".join(table(results)))


if __name__ == "__main__":
    main()
