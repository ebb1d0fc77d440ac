"""The New-run form: the trainer's own flags (from its parser), turned into an argv list, confined to the roots,
checked by the trainer's parser and preflight, and shown as the equivalent command line and `--config_file` TOML.

The browser sends `{flag name: value}`; nothing it sends is ever joined into a shell command: values become argv
items, and the argv goes to the trainer's parser (unknown flags and bad values are its errors) and preflight.
Errors come back as `{field, message}` so the page shows each beside the field it names.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import shlex
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from fluxlora.errors import DatasetError, FluxLoraError
from fluxlora.ui.security import AccessError, Roots

# Flags whose values are file or folder paths: each must lie inside the roots.
PATH_FLAGS = frozenset({
    "pretrained_model_name_or_path", "clip_l", "t5xxl", "ae", "tokenizer_cache_dir", "controlnet_model_name_or_path",
    "vae", "dataset_config", "train_data_dir", "reg_data_dir", "in_json", "conditioning_data_dir", "network_weights",
    "base_weights", "output_dir", "resume", "sample_prompts", "logging_dir", "log_tracker_config", "console_log_file",
    "cache_dir", "offload_optimizer_nvme_path", "offload_param_nvme_path",
})
# Not offered: the form is the config file, and the UI adds --resume itself when a run is resumed.
EXCLUDED_FLAGS = frozenset({"config_file", "output_config", "resume", "help"})
# The main form, in this order; every other flag is in the "all flags" section.
COMMON_FLAGS = (
    "pretrained_model_name_or_path", "clip_l", "t5xxl", "ae", "dataset_config", "output_dir", "output_name",
    "network_dim", "network_alpha", "learning_rate", "optimizer_type", "lr_scheduler", "max_train_steps",
    "mixed_precision", "save_precision", "save_every_n_steps", "sample_every_n_steps", "seed",
    "network_train_unet_only", "cache_latents", "cache_text_encoder_outputs", "gradient_checkpointing",
    "checkpoint_blocks", "fp8_base", "blocks_to_swap", "timestep_sampling", "guidance_scale",
    "t5xxl_max_token_length", "save_state",
)
# What a new run starts with (the guide's recipe); the user changes any of it.
FORM_DEFAULTS: dict[str, Any] = {
    "network_dim": "16", "network_alpha": "16", "learning_rate": "1e-4", "optimizer_type": "AdamW",
    "lr_scheduler": "constant", "max_train_steps": "1600", "mixed_precision": "bf16", "save_precision": "bf16",
    "network_train_unet_only": True, "cache_latents": True, "cache_text_encoder_outputs": True, "save_state": True,
    "network_module": "networks.lora_flux", "timestep_sampling": "flux_shift", "guidance_scale": "1.0",
}
PROMPTS_FIELD = "sample_prompts_text"  # the prompts typed in the form; written to a file for --sample_prompts
_FLAG = re.compile(r"--([a-z][a-z0-9_]*)")


@dataclass
class FlagSpec:
    name: str
    group: str
    kind: str  # bool | choice | list | text
    type: str  # int | float | str
    help: str
    default: Any
    choices: list[str] = field(default_factory=list)


@lru_cache(maxsize=1)
def flag_specs() -> tuple[FlagSpec, ...]:
    """Every training flag the form offers, with its group, input kind and default (from the trainer's parser)."""
    from fluxlora.config.args import build_parser
    from fluxlora.config.defaults import FLUXLORA_DEFAULTS

    parser = build_parser()
    specs: list[FlagSpec] = []
    for group in parser._action_groups:
        for action in group._group_actions:
            if not action.option_strings or action.dest in EXCLUDED_FLAGS:
                continue
            if isinstance(action, argparse._StoreTrueAction):
                kind = "bool"
            elif action.choices:
                kind = "choice"
            elif action.nargs in ("*", "+"):
                kind = "list"
            else:
                kind = "text"
            type_name = getattr(action.type, "__name__", "str") if action.type else "str"
            default = FLUXLORA_DEFAULTS[action.dest].value if action.dest in FLUXLORA_DEFAULTS \
                else parser.sd_defaults.get(action.dest)
            specs.append(FlagSpec(name=action.dest, group=group.title or "", kind=kind,
                                  type=type_name if type_name in ("int", "float") else "str",
                                  help=action.help or "", default=default,
                                  choices=[str(c) for c in (action.choices or []) if c is not None]))
    return tuple(specs)


def _specs_by_name() -> dict[str, FlagSpec]:
    return {s.name: s for s in flag_specs()}


@dataclass
class FormProblem(Exception):
    """Problems tied to form fields (`field` is a flag name, or "" for the form as a whole)."""

    errors: list[dict[str, str]]

    def __str__(self) -> str:
        return "; ".join(e["message"] for e in self.errors)


def argv_from_form(values: dict[str, Any]) -> list[str]:
    """`{flag: value}` -> argv. Switches when true, other flags when non-empty; list flags split like a shell
    would split words (shlex, no shell); names that are not training flags are errors."""
    specs = _specs_by_name()
    argv: list[str] = []
    errors = []
    for name, value in values.items():
        if name == PROMPTS_FIELD:
            continue
        spec = specs.get(name)
        if spec is None:
            errors.append({"field": name, "message": f"--{name}: not a training flag the UI can set"})
            continue
        if spec.kind == "bool":
            if value is True or str(value).lower() in ("1", "true", "on", "yes"):
                argv.append(f"--{name}")
            continue
        text = "" if value is None else str(value).strip()
        if not text:
            continue
        if spec.kind == "list":
            try:
                argv += [f"--{name}", *shlex.split(text)]
            except ValueError as err:
                errors.append({"field": name, "message": f"--{name}: {err}"})
        else:
            argv.append(f"--{name}={text}")
    if errors:
        raise FormProblem(errors)
    return argv


def check_paths(given: dict[str, Any], roots: Roots) -> list[dict[str, str]]:
    """Path flags outside the roots (after symlinks), as field errors."""
    errors = []
    for name in sorted(PATH_FLAGS & set(given)):
        values = given[name] if isinstance(given[name], list) else [given[name]]
        for value in values:
            if value is None:
                continue
            try:
                roots.resolve(str(value).split(";")[0])
            except AccessError as err:
                errors.append({"field": name, "message": f"--{name}: {err}"})
    return errors


def check_dataset_paths(run_plan: Any, roots: Roots) -> list[dict[str, str]]:
    """The image folders and metadata files the dataset TOML names, inside the roots too."""
    errors = []
    for dataset in run_plan.blueprint.datasets:
        for subset in dataset.subsets:
            for attr in ("image_dir", "metadata_file", "conditioning_data_dir"):
                value = getattr(subset, attr, None)
                if value is not None and not roots.contains(value):
                    errors.append({"field": "dataset_config",
                                   "message": f"{subset.key}.{attr} {value}: outside the folders this UI may use"})
    return errors


def split_problems(err: FluxLoraError) -> list[dict[str, str]]:
    """One error message (maybe "N problems ...: (1) ...; (2) ...") -> field errors, each on the flag it names."""
    text = str(err)
    match = re.match(r"^\d+ problems with [^:]*: \(1\) ", text)
    parts = re.split(r"; \(\d+\) ", text[match.end():]) if match else [text]
    specs = _specs_by_name()
    fallback = (err.key or "").removeprefix("--")
    errors = []
    for part in parts:
        named = [m for m in _FLAG.findall(part) if m in specs]
        where = named[0] if named else (fallback if fallback in specs else "")
        if not where and isinstance(err, DatasetError):  # a dataset TOML key or an image: the dataset field
            where = "dataset_config"
        errors.append({"field": where, "message": part})
    return errors


def prompts_file(state_dir: Path, text: str) -> Path:
    """The prompts typed in the form, as a file the trainer reads (named by its content, so re-planning is free)."""
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
    path = state_dir / "prompts" / f"{digest}.txt"
    if not path.is_file():
        from fluxlora.files import write_text

        write_text(path, text.strip() + "\n")
    return path


@dataclass
class Plan:
    argv: list[str]
    errors: list[dict[str, str]] = field(default_factory=list)
    summary: str = ""
    memory: list[str] = field(default_factory=list)
    output_dir: str | None = None
    output_name: str | None = None
    prepared: Any = None  # the trainer's RunPlan when the checks passed

    def as_dict(self) -> dict[str, Any]:
        return {"argv": self.argv, "command_line": command_line(self.argv), "config_toml": config_toml(self.argv),
                "errors": self.errors, "summary": self.summary, "memory": self.memory, "ok": not self.errors,
                "output_dir": self.output_dir, "output_name": self.output_name}


def command_line(argv: list[str]) -> str:
    """The equivalent sd-scripts command line (quoted for a POSIX shell, one flag per line)."""
    lines, current = [], ["accelerate launch flux_train_network.py"]
    for token in argv:
        if token.startswith("--") and len(current) > 0:
            lines.append(" ".join(current))
            current = [shlex.quote(token)]
        else:
            current.append(shlex.quote(token))
    lines.append(" ".join(current))
    return " \\\n  ".join(lines)


def config_toml(argv: list[str]) -> str:
    """The same flags as a `--config_file` TOML (sd-scripts' flat form)."""
    from fluxlora.config.args import parse_given
    from fluxlora.config.config_file import dumps_toml

    try:
        return dumps_toml(parse_given(argv))
    except FluxLoraError:
        return ""


def plan_run(values: dict[str, Any], roots: Roots, state_dir: Path) -> Plan:
    """Form -> argv -> the trainer's parser and preflight (headers, dataset, memory): the plan or its errors."""
    from fluxlora.config.args import parse_given
    from fluxlora.training.cli import prepare

    values = dict(values)
    prompts = str(values.get(PROMPTS_FIELD) or "").strip()
    ours = None  # the UI's own prompts file (in its state folder, outside the roots on purpose)
    if prompts:
        ours = values["sample_prompts"] = str(prompts_file(state_dir, prompts))
    try:
        argv = argv_from_form(values)
    except FormProblem as problem:
        return Plan(argv=[], errors=problem.errors)
    plan = Plan(argv=argv)
    try:
        given = parse_given(argv)
    except FluxLoraError as err:
        plan.errors = split_problems(err)
        return plan
    plan.errors = check_paths({k: v for k, v in given.items() if not (k == "sample_prompts" and v == ours)}, roots)
    for name in ("output_dir", "dataset_config", "pretrained_model_name_or_path"):
        if not given.get(name) and not (name == "dataset_config" and given.get("train_data_dir")):
            plan.errors.append({"field": name, "message": f"--{name} is required"})
    if plan.errors:
        return plan
    plan.output_dir, plan.output_name = str(given["output_dir"]), given.get("output_name")
    try:
        prepared = prepare(argv)
    except FluxLoraError as err:
        plan.errors = split_problems(err)
        return plan
    if prepared is None:  # --output_config is not offered; kept for completeness
        plan.errors = [{"field": "", "message": "nothing to run"}]
        return plan
    plan.errors = check_dataset_paths(prepared, roots)
    plan.summary = prepared.summary()
    plan.memory = prepared.memory_lines()
    plan.prepared = prepared
    return plan


def presets(values: dict[str, Any], roots: Roots, state_dir: Path, sizes: list[float]) -> dict[str, Any]:
    """The planner's presets for the form as it stands (`fluxlora check --vram`'s answer)."""
    from fluxlora.training.presets import presets_for

    plan = plan_run(values, roots, state_dir)
    if plan.prepared is None:
        return {"plan": plan.as_dict(), "presets": []}
    return {"plan": plan.as_dict(), "presets": [p.as_dict() for p in presets_for(plan.prepared, sizes)]}


def generate_argv(values: dict[str, Any], roots: Roots) -> tuple[list[str], Path]:
    """`fluxlora generate` flags from the Outputs tab: the LoRA, the prompt and the base models of its run."""
    errors = []
    argv: list[str] = []
    for name in ("ckpt_path", "clip_l", "t5xxl", "ae", "lora_weights", "output_dir"):
        value = str(values.get(name) or "").strip()
        if not value:
            errors.append({"field": name, "message": f"--{name} is required"})
            continue
        try:
            argv.append(f"--{name}={roots.resolve(value)}")
        except AccessError as err:
            errors.append({"field": name, "message": f"--{name}: {err}"})
    prompt = str(values.get("prompt") or "").strip()
    if not prompt:
        errors.append({"field": "prompt", "message": "write a prompt"})
    for name, kind in (("width", int), ("height", int), ("steps", int), ("seed", int), ("guidance", float)):
        value = str(values.get(name) or "").strip()
        if value:
            try:
                argv.append(f"--{name}={kind(value)}")
            except ValueError:
                errors.append({"field": name, "message": f"--{name}: {value!r} is not a number"})
    if errors:
        raise FormProblem(errors)
    argv.append(f"--prompt={prompt}")
    return argv, Path(str(values["output_dir"]))


__all__ = ["COMMON_FLAGS", "FORM_DEFAULTS", "FlagSpec", "FormProblem", "PATH_FLAGS", "Plan", "argv_from_form",
           "check_paths", "command_line", "config_toml", "flag_specs", "generate_argv", "plan_run", "presets",
           "split_problems"]
