"""One entry point: `fluxlora <command> [flags]`.

Each command lives in the module that owns its work and exposes `main(argv) -> int`; this file only
dispatches, so `fluxlora --help` stays fast (no torch import) and a broken command cannot break the others.
"""

from __future__ import annotations

import importlib
import logging
import sys

from fluxlora.errors import guarded

# command -> ("module:function", one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("fluxlora.training.cli:main", "train a LoRA (same flags as sd-scripts' flux_train_network.py)"),
    "check": ("fluxlora.training.cli:check_main", "check training flags, files and memory without loading weights"),
    "cache": ("fluxlora.training.cli:cache_main", "build the latent and text-encoder caches, then stop"),
    "ctl": ("fluxlora.training.control:ctl_main", "tell a running training to sample now, save now or stop"),
    "generate": ("fluxlora.inference.generate:main", "generate images (flags of flux_minimal_inference.py)"),
    "merge": ("fluxlora.tools.merge:main", "merge LoRAs into models or into each other (flux_merge_lora.py)"),
    "extract": ("fluxlora.tools.extract:main", "extract a LoRA from an original and a tuned model (flux_extract_lora.py)"),
    "convert": ("fluxlora.tools.convert:main", "convert LoRA files: sd-scripts <-> diffusers/PEFT <-> ai-toolkit"),
    "inspect": ("fluxlora.tools.model_files:inspect_main", "print what a safetensors file is, reading only its header"),
    "make-tiny": ("fluxlora.tools.model_files:make_tiny_main",
                  "write tiny real-format checkpoints (FLUX.1/Chroma/Kontext/Fill/CLIP-L/T5/AE; --family flux2: FLUX.2)"),
    "demo": ("fluxlora.demo:main", "train a small LoRA on a generated dataset in about a minute on a CPU"),
    "ui": ("fluxlora.ui.cli:main", "a local web app: datasets, presets, launch and watch runs (needs fluxlora[ui])"),
}


def _usage() -> str:
    lines = ["usage: fluxlora <command> [flags]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`fluxlora <command> --help` lists the flags of a command."]
    return "\n".join(lines)


def run_command(target: str, argv: list[str]) -> int:
    """Import `module:function` and call it with argv, turning fluxlora errors into exit code 2."""
    module_name, func_name = target.split(":")
    return guarded(lambda: getattr(importlib.import_module(module_name), func_name)(argv))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"error: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    return run_command(COMMANDS[command][0], rest)


if __name__ == "__main__":
    sys.exit(main())
