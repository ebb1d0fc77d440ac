"""sd-scripts-compatible entry point: `python networks/flux_extract_lora.py <flags>`."""

import sys

from fluxlora.cli import run_command

if __name__ == "__main__":
    sys.exit(run_command("fluxlora.tools.extract:main", sys.argv[1:]))
