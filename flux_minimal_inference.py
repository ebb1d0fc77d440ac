"""sd-scripts-compatible entry point: `python flux_minimal_inference.py <flags>`."""

import sys

from fluxlora.cli import run_command

if __name__ == "__main__":
    sys.exit(run_command("fluxlora.inference.generate:main", sys.argv[1:]))
