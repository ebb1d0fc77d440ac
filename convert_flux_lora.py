"""sd-scripts-compatible entry point: `python convert_flux_lora.py <flags>` (as the guide writes it)."""

import sys

from fluxlora.cli import run_command

if __name__ == "__main__":
    sys.exit(run_command("fluxlora.tools.convert:main", sys.argv[1:]))
