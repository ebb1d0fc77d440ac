"""Checkpoint loading benchmark: peak memory and speed of `load_flux` against the machine's own raw file read.

Writes a real-width FLUX checkpoint (width 3072, 24 heads, default 1 double + 1 single block in bf16 ≈ 1.1 GB),
then, each in a fresh process so memory peaks do not mix:
  raw   read the whole file into one preallocated buffer (`readinto`), the floor for any loader;
  load  `load_flux(path)` and then touch every page of every parameter, so lazily mapped data is counted.
Both are timed with the file evicted from the page cache first (posix_fadvise DONTNEED; `--warm` keeps it).
Prints: peak RSS increase ÷ file size (goal ≤ 1.2) and load speed ÷ raw read speed (goal ≥ 0.7).

    python benchmarks/load.py [--double 1] [--single 1] [--dtype bfloat16] [--device cpu] [--repeat 3] [--warm]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
          "float8_e4m3fn": torch.float8_e4m3fn}


def _status(field: str) -> int:
    """A /proc/self/status memory field in bytes (VmHWM is this process's own peak; ru_maxrss survives exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _rss_peak() -> int:
    return _status("VmHWM")


def _evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def write_checkpoint(path: Path, double: int, single: int, dtype: torch.dtype) -> int:
    """A BFL-layout FLUX file at full width; values are a tiled random block (content does not matter here)."""
    from fluxlora.files import save_safetensors
    from fluxlora.models.flux import Flux, FluxParams

    with torch.device("meta"):
        model = Flux(FluxParams(depth=double, depth_single_blocks=single))
    block = torch.randn(1 << 20, generator=torch.Generator().manual_seed(0)).mul_(0.02)
    state = {}
    for name, meta in model.state_dict().items():
        n = meta.numel()
        flat = block.repeat((n + block.numel() - 1) // block.numel())[:n]
        state[name] = flat.reshape(meta.shape).to(dtype if dtype != torch.float8_e4m3fn or meta.ndim == 2
                                                   else torch.bfloat16)
    save_safetensors(path, state)
    return path.stat().st_size


def child_raw(path: Path) -> dict:
    size = path.stat().st_size
    buffer = bytearray(size)
    start = time.perf_counter()
    with open(path, "rb", buffering=0) as handle:
        view = memoryview(buffer)
        done = 0
        while done < size:
            done += handle.readinto(view[done:])
    return {"seconds": time.perf_counter() - start}


def child_load(path: Path, device: str, dtype: str | None) -> dict:
    from fluxlora.models.flux_loading import load_flux

    base = _rss_peak()
    start = time.perf_counter()
    model, info = load_flux(path, dtype=DTYPES[dtype] if dtype else None, device=device)
    loaded = time.perf_counter() - start
    checksum = 0.0
    for param in model.parameters():  # fault in one element per 4 KiB page: every byte is now resident
        flat = param.detach().reshape(-1)
        step = max(1, 4096 // flat.element_size())
        checksum += float(flat[::step].float().sum())
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return {"seconds": time.perf_counter() - start, "load_call_seconds": loaded, "rss_base": base,
            "rss_peak": _rss_peak(), "rss_file": _status("RssFile"), "rss_anon": _status("RssAnon"),
            "params": info.num_params, "checksum": checksum}


def _run_child(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--double", type=int, default=1, help="double blocks (default 1)")
    parser.add_argument("--single", type=int, default=1, help="single blocks (default 1)")
    parser.add_argument("--file_dtype", default="bfloat16", choices=sorted(DTYPES), help="dtype written to the file")
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="load_flux dtype (default: keep)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs of each (best is reported)")
    parser.add_argument("--warm", action="store_true", help="do not evict the file from the page cache")
    parser.add_argument("--dir", type=Path, default=None, help="folder for the checkpoint (default: a temp dir)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        mode, path = args.child[0], Path(args.child[1])
        result = child_raw(path) if mode == "raw" else child_load(path, args.device, args.dtype)
        print(json.dumps(result))
        return 0

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "flux-width3072.safetensors"
        t0 = time.perf_counter()
        size = write_checkpoint(path, args.double, args.single, DTYPES[args.file_dtype])
        print(f"wrote {path.name}: {size / 1e9:.3f} GB ({args.double} double + {args.single} single blocks, "
              f"{args.file_dtype}) in {time.perf_counter() - t0:.1f} s")
        raws, loads = [], []
        for _ in range(args.repeat):
            for mode, sink in (("raw", raws), ("load", loads)):
                if not args.warm:
                    _evict(path)
                extra = ["--device", args.device] + (["--dtype", args.dtype] if args.dtype else [])
                sink.append(_run_child([mode, str(path)] + (extra if mode == "load" else [])))
        raw_s = min(r["seconds"] for r in raws)
        best = min(loads, key=lambda r: r["seconds"])
        rss_increase = max(r["rss_peak"] - r["rss_base"] for r in loads)
        rss_peak = max(r["rss_peak"] for r in loads)
        print(f"cache: {'warm' if args.warm else 'cold (posix_fadvise DONTNEED before each run)'}; "
              f"device {args.device}; load dtype {args.dtype or 'as stored'}; best of {args.repeat}")
        print(f"raw read:  {raw_s:.3f} s  = {size / raw_s / 1e9:.2f} GB/s")
        print(f"load_flux: {best['seconds']:.3f} s  = {size / best['seconds'] / 1e9:.2f} GB/s "
              f"(load_flux call {best['load_call_seconds']:.3f} s, the rest is faulting pages in)")
        print(f"peak RSS:  {rss_peak / 1e9:.3f} GB, increase during load {rss_increase / 1e9:.3f} GB "
              f"(process base {best['rss_base'] / 1e9:.3f} GB; after load: file-backed {best['rss_file'] / 1e9:.3f} GB, "
              f"anonymous {best['rss_anon'] / 1e9:.3f} GB)")
        print(f"peak RSS increase / file size = {rss_increase / size:.3f}   (goal <= 1.2)")
        print(f"load speed / raw read speed   = {raw_s / best['seconds']:.3f}   (goal >= 0.7)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
