"""`fluxlora inspect` and `fluxlora make-tiny` across model families: each file or request goes to its family."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fluxlora.errors import FluxLoraError


def inspect_main(argv: list[str]) -> int:
    """Describe each file from its header: FLUX.2 files by the flux2 family, FLUX.1-family transformers by the family
    that claims them (`--model_type` chooses one: FLUX.1 Kontext has the dev layout), everything else as before."""
    from fluxlora.families import model_types
    from fluxlora.families.flux2.inspect import describe_flux2, is_flux2_file
    from fluxlora.families.inspect import describe
    from fluxlora.models import inspect

    parser = argparse.ArgumentParser(prog="fluxlora inspect", description=inspect.__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path, help=".safetensors files or diffusers model folders")
    parser.add_argument("--model_type", choices=model_types(), help="the model family of FLUX.1-family transformer "
                        "files (default: from the header; FLUX.1 Kontext files need --model_type kontext)")
    args = parser.parse_args(argv)
    status = 0
    for path in args.files:
        try:
            print("\n".join(describe_flux2(path) if is_flux2_file(path) else describe(path, args.model_type)))
        except FluxLoraError as err:
            print(f"error: {err}", file=sys.stderr)
            status = 2
    return status


def make_tiny_main(argv: list[str]) -> int:
    """`fluxlora make-tiny [--family flux1|flux2] OUTDIR ...` (flux1 by default: FLUX.1 and its derivatives, as before)."""
    family = "flux1"
    if "--family" in argv:
        i = argv.index("--family")
        family, argv = argv[i + 1] if i + 1 < len(argv) else "", argv[:i] + argv[i + 2:]
    if family == "flux2":
        from fluxlora.families.flux2.tiny import main
    elif family == "flux1":
        from fluxlora.families.tiny import main
    else:
        print(f"error: --family {family!r}: use flux1 or flux2", file=sys.stderr)
        return 2
    return main(argv)
