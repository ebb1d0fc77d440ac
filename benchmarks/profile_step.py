"""Where a full-size training step spends its time: torch.profiler over one step of the trainer's own step.

    PYTHONPATH=. python3 benchmarks/profile_step.py --resolution 512     # on a GPU

Prints the step's wall time, the GPU busy time (sum of kernel time) and the top operators by GPU time and by
CPU time, so launch-bound steps (GPU idle while Python issues kernels) are told apart from compute-bound ones.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from step import FULL, Conditioning, flow_settings, random_model  # noqa: E402

from fluxlora.families.flux1.family import FLUX1  # noqa: E402
from fluxlora.network.lora import create_network  # noqa: E402
from fluxlora.training.step import step_generator, training_loss  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--text_tokens", type=int, default=512)
    args = ap.parse_args()
    device = torch.device("cuda")
    flux = random_model(FULL, torch.bfloat16, device)
    network = create_network(1.0, 16, 16, flux, [], train_text_encoder=False, generator=torch.Generator().manual_seed(0))
    network.apply_to()
    network.to(device).requires_grad_(True)
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(1)
    side = args.resolution // 8
    latents = torch.randn(1, 16, side, side, generator=g)
    cond = Conditioning(torch.randn(1, 768, generator=g), torch.randn(1, args.text_tokens, 4096, generator=g),
                        torch.ones(1, args.text_tokens, dtype=torch.bool))

    def step(i: int) -> None:
        out = training_loss(FLUX1, flux, latents.to(device), cond, flow_settings(), generator=step_generator(0, 1, i),
                            guidance=1.0, compute_dtype=torch.bfloat16,
                            autocast=lambda: torch.autocast("cuda", dtype=torch.bfloat16))
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for i in range(3):
        step(i)
    torch.cuda.synchronize()
    t = time.perf_counter()
    step(3)
    torch.cuda.synchronize()
    wall = time.perf_counter() - t
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step(4)
        torch.cuda.synchronize()
    events = prof.key_averages()
    # kernels are the events that run on the device; operator rows would count the same time again
    gpu_total = sum(e.self_device_time_total for e in events
                    if e.device_type == torch.autograd.DeviceType.CUDA) / 1e6
    print(f"{args.resolution}²: step wall {wall:.3f} s; GPU kernel time {gpu_total:.3f} s "
          f"({100 * gpu_total / wall:.0f} % busy)")
    print(events.table(sort_by="self_device_time_total", row_limit=15, max_name_column_width=50))
    print(events.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=50))


if __name__ == "__main__":
    main()
