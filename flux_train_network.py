"""sd-scripts-compatible entry point: `[accelerate launch ...] python flux_train_network.py <flags>`."""

import sys

from fluxlora.cli import run_command

if __name__ == "__main__":
    sys.exit(run_command("fluxlora.training.cli:main", sys.argv[1:]))
