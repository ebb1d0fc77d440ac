"""Adapter size table for full-size FLUX.1-dev (the planner's shapes, nothing built): trainable parameters and the
bf16 file size of each algorithm, at sd-scripts' / LyCORIS' defaults (network_dim 4, network_alpha 1, factor -1)
and at common FLUX recipes.

    python benchmarks/adapter_sizes.py            # markdown table
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fluxlora.config.network_args import parse_network_args  # noqa: E402
from fluxlora.models.flux import FluxParams  # noqa: E402
from fluxlora.network.sizes import adapter_file_bytes, adapter_params, flux_block_linears  # noqa: E402

ROWS = [  # (label, network_module, network_args, network_dim)
    ("LoRA (lora_flux)", None, [], 4),
    ("DoRA (lora_flux dora_wd)", None, ["dora_wd=True"], 4),
    ("LoCon (algo=locon)", "lycoris.kohya", ["algo=locon"], 4),
    ("LoKr (algo=lokr)", "lycoris.kohya", ["algo=lokr"], 4),
    ("LoKr + DoRA", "lycoris.kohya", ["algo=lokr", "dora_wd=True"], 4),
    ("LoHa (algo=loha)", "lycoris.kohya", ["algo=loha"], 4),
    ("full (algo=full)", "lycoris.kohya", ["algo=full"], 4),
    ("LoRA dim 16", None, [], 16),
    ("DoRA dim 16", None, ["dora_wd=True"], 16),
    ("LoKr factor 16, dim 16", "lycoris.kohya", ["algo=lokr", "factor=16"], 16),
    ("LoKr factor 16, full matrix", "lycoris.kohya", ["algo=lokr", "factor=16", "full_matrix=True"], 16),
    ("LoKr factor 8, full matrix", "lycoris.kohya", ["algo=lokr", "factor=8", "full_matrix=True"], 16),
    ("LoHa dim 16", "lycoris.kohya", ["algo=loha"], 16),
]


def main() -> None:
    linears = flux_block_linears(FluxParams())
    print("| adapter | network_args | trainable parameters | file (bf16) |")
    print("| --- | --- | ---: | ---: |")
    for label, module, args, dim in ROWS:
        spec = parse_network_args(args, network_module=module).adapter
        n = adapter_params(linears, spec, dim)
        size = adapter_file_bytes(linears, spec, dim)
        shown = " ".join(args) or "–"
        print(f"| {label} | `{shown}`, dim {dim} | {n / 1e6:,.2f} M | {size / 1e6:,.1f} MB |")


if __name__ == "__main__":
    main()
