"""Run what the GUI front-ends of sd-scripts write (`../shared/reference/gui-clients/`) as each GUI launches it.

Only paths, resolution, bucket sizes and the number of (training and sampling) steps are changed, for tiny models:
the kohya_ss files run as its `accelerate launch ... --config_file` line, the fluxgym files as `bash train.sh` from
fluxgym's folder, where `sd-scripts/` is this repository. The FLUX file has 11 double + 20 single blocks (at the
tiny width), so `split_mode` (18 swapped blocks) is valid.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
GUI_CLIENTS = Path(os.environ.get("FLUXLORA_SHARED", REPO.parent / "shared")) / "reference" / "gui-clients"
KOHYA_NAME = "Flux.my-super-duper-model-name-goes-here-v1.0"  # output_name of the kohya_ss preset


def write_models(folder: Path) -> dict[str, Path]:
    """Tiny real-layout checkpoints (deep FLUX for split_mode) in `folder`."""
    from fluxlora.models.tiny import tiny_flux_params, write_tiny_checkpoints

    deep = dataclasses.replace(tiny_flux_params("dev"), depth=11, depth_single_blocks=20)
    paths = write_tiny_checkpoints(folder, seed=0, flux_params=deep, schnell=False)
    return {"flux": paths.flux_dev, "clip_l": paths.clip_l, "t5xxl": paths.t5xxl, "ae": paths.ae}


def write_images(folder: Path, count: int = 4) -> Path:
    """`count` 64x64 images with a red square and a `.txt` caption each."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        pixels = (rng.random((64, 64, 3)) * 255).astype("uint8")
        pixels[16:48, 16:48] = (230, 20, 20)
        Image.fromarray(pixels).save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text("sks, a red square", encoding="utf-8")
    return folder


def _link_repo(gui_root: Path) -> None:
    (gui_root / "sd-scripts").symlink_to(REPO, target_is_directory=True)


def _set(text: str, key: str, value: str) -> str:
    """Replace `key = ...` in a flat TOML (the key must be there: only existing settings are changed)."""
    new, count = re.subn(rf"^{re.escape(key)} = .*$", f"{key} = {value}", text, flags=re.M)
    assert count == 1, key
    return new


def _flag(text: str, flag: str, value: str) -> str:
    """Replace the value of `--flag value` in a train.sh."""
    new, count = re.subn(rf"({re.escape(flag)}) \S+", rf"\g<1> {value}", text)
    assert count == 1, flag
    return new


def _small_sampling(prompt: str) -> str:
    """A sample prompt at 64x64 and 2 steps (a tiny model), its other options as written."""
    for option in ("w", "h", "s"):
        prompt = re.sub(rf" --{option} \d+", "", prompt)
    return prompt.rstrip("\n") + " --w 64 --h 64 --s 2\n"


def _run(command: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("WORLD_SIZE", None)
    return subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=900,
                          check=False)


def run_kohya_ss(preset: str, models: dict[str, Path], tmp: Path) -> tuple[subprocess.CompletedProcess, Path]:
    """Write `config_lora.toml` as the kohya_ss GUI does and run its launch line; returns (result, output dir)."""
    root, out, data, logs = tmp / "kohya_ss", tmp / "out", tmp / "data", tmp / "tmp"
    root.mkdir()
    _link_repo(root)
    model_dir = tmp / "models"
    model_dir.mkdir()
    for role, name in (("flux", "flux1-dev"), ("clip_l", "clip_l"), ("t5xxl", "t5xxl"), ("ae", "ae")):
        shutil.copyfile(models[role], model_dir / f"{name}.safetensors")
    write_images(data / "img" / "1_sks")  # the GUI's train_data_dir: <repeats>_<name> sub-folders
    tokens = {"{MODELS}": model_dir.as_posix(), "{DATA}": data.as_posix(), "{OUT}": out.as_posix(),
              "{TMP}": logs.as_posix(), "{KOHYA_SS}": root.as_posix()}
    text = (GUI_CLIENTS / "kohya_ss" / f"{preset}.toml").read_text(encoding="utf-8")
    for token, value in tokens.items():
        text = text.replace(token, value)
    text = _set(text, "resolution", '"64,64"')
    text = _set(text, "min_bucket_reso", "64")
    text = _set(text, "max_bucket_reso", "128")
    text = _set(text, "max_train_steps", "2")
    (out / "sample").mkdir(parents=True)
    (out / "config_lora.toml").write_text(text, encoding="utf-8")
    prompt = (GUI_CLIENTS / "kohya_ss" / f"{preset}.prompt.txt").read_text(encoding="utf-8")
    (out / "sample" / "prompt.txt").write_text(_small_sampling(prompt), encoding="utf-8")
    command = (GUI_CLIENTS / "kohya_ss" / f"{preset}.cmd").read_text(encoding="utf-8").strip()
    for token, value in tokens.items():
        command = command.replace(token, value)
    return _run(command, cwd=root), out


def run_fluxgym(script: str, models: dict[str, Path], tmp: Path) -> tuple[subprocess.CompletedProcess, Path]:
    """Lay out fluxgym's folder (models/, datasets/, outputs/my-lora/) and run `bash outputs/my-lora/train.sh`."""
    root = tmp / "fluxgym"
    root.mkdir()
    _link_repo(root)
    for role, rel in (("flux", "models/unet/flux1-dev.sft"), ("clip_l", "models/clip/clip_l.safetensors"),
                      ("t5xxl", "models/clip/t5xxl_fp16.safetensors"), ("ae", "models/vae/ae.sft")):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(models[role], root / rel)
    write_images(root / "datasets" / "my-lora")
    outputs = root / "outputs" / "my-lora"
    outputs.mkdir(parents=True)
    token = root.as_posix()
    dataset = (GUI_CLIENTS / "fluxgym" / "dataset.toml").read_text(encoding="utf-8").replace("{FLUXGYM}", token)
    dataset = dataset.replace("resolution = 512", "resolution = 64").replace("num_repeats = 10", "num_repeats = 1")
    (outputs / "dataset.toml").write_text(dataset, encoding="utf-8")
    prompts = (GUI_CLIENTS / "fluxgym" / "sample_prompts.txt").read_text(encoding="utf-8")
    (outputs / "sample_prompts.txt").write_text(_small_sampling(prompts), encoding="utf-8")
    sh = (GUI_CLIENTS / "fluxgym" / f"{script}.sh").read_text(encoding="utf-8").replace("{FLUXGYM}", token)
    sh = _flag(sh, "--max_train_epochs", "1")
    (outputs / "train.sh").write_text(sh, encoding="utf-8")
    return _run("bash outputs/my-lora/train.sh", cwd=root), outputs


def check_lora_loads(path: Path, models: dict[str, Path]) -> dict[str, str]:
    """The LoRA file loads strictly onto the models it was trained for (as `fluxlora generate` loads it); returns
    its metadata."""
    from fluxlora.inference.generate import read_lora_network
    from fluxlora.models.flux_loading import load_flux
    from fluxlora.models.text_encoders import load_clip_l, load_t5xxl
    from fluxlora.network.saving import read_lora

    flux, _ = load_flux(models["flux"])
    network = read_lora_network(path, 1.0, flux, [load_clip_l(models["clip_l"]), load_t5xxl(models["t5xxl"])])
    assert network.loras, path
    return read_lora(path)[1]
