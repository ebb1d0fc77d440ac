"""Security: nothing is ever unpickled (checked over the source tree's syntax, and with a booby-trapped pickle);
paths and strings from dataset TOMLs and safetensors metadata are data only — nothing is written outside the output
folder, however hostile they are."""

from __future__ import annotations

import ast
import os
import pickle
from pathlib import Path

import pytest
import torch
from reliability_data import write_dataset

from fluxlora.errors import CheckpointError, FluxLoraError
from fluxlora.files import save_safetensors
from fluxlora.training.cli import train
from fluxlora.training.state import load_state

PACKAGE = Path(__file__).resolve().parents[2] / "fluxlora"


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else ""
            yield node, owner, name


def test_no_unpickling_anywhere_in_the_package():
    problems = []
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 30
    for path in files:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node, owner, name in _calls(tree):
            keywords = {k.arg: k.value for k in node.keywords}
            where = f"{path.relative_to(PACKAGE.parent)}:{node.lineno}"
            if owner == "torch" and name == "load":
                wo = keywords.get("weights_only")
                if not (isinstance(wo, ast.Constant) and wo.value is True):
                    problems.append(f"{where}: torch.load without weights_only=True")
            if owner in ("pickle", "dill", "marshal", "cloudpickle") and name in ("load", "loads"):
                problems.append(f"{where}: {owner}.{name}")
            allow = keywords.get("allow_pickle")
            if allow is not None and not (isinstance(allow, ast.Constant) and allow.value is False):
                problems.append(f"{where}: allow_pickle={ast.unparse(allow)}")
            if isinstance(node.func, ast.Name) and name in ("eval", "exec"):
                problems.append(f"{where}: builtin {name}()")
            if name == "load" and owner in ("yaml",) and "Loader" not in keywords:
                problems.append(f"{where}: yaml.load without a safe Loader")
    assert problems == []


class _Payload:
    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return (open, (str(self.sentinel), "w"))  # would create the sentinel file if ever unpickled


def _booby_trapped_state(folder: Path, sentinel: Path, saved: Path) -> Path:
    import shutil

    shutil.copytree(saved, folder)
    with open(folder / "optimizer.pt", "wb") as handle:
        torch.save({"state": _Payload(sentinel)}, handle)
    return folder


@pytest.fixture(scope="module")
def saved_state(tmp_path_factory, tiny_ckpts):
    from reliability_data import COMMON, model_flags, write_toml

    base = tmp_path_factory.mktemp("secstate")
    toml = write_toml(base / "d.toml", write_dataset(base / "img"))
    train([*model_flags(tiny_ckpts), f"--dataset_config={toml}", f"--output_dir={base / 'out'}", *COMMON,
           "--max_train_steps=1", "--save_state"])
    return base / "out" / "lora-state"


def test_a_pickle_payload_in_a_state_folder_never_runs(tmp_path, saved_state):
    sentinel = tmp_path / "pwned"
    state = _booby_trapped_state(tmp_path / "evil-state", sentinel, saved_state)
    with pytest.raises(CheckpointError) as info:
        load_state(state)
    assert not sentinel.exists()
    assert "optimizer.pt" in str(info.value) and "tampered" in str(info.value) and "\n" not in str(info.value)
    assert info.value.key == "--resume"


def test_a_pickle_given_as_any_model_file_never_runs(argv_for, tmp_path):
    sentinel = tmp_path / "pwned"
    for flag in ("--pretrained_model_name_or_path", "--clip_l", "--t5xxl", "--ae", "--network_weights"):
        for suffix in (".ckpt", ".pt", ".bin", ".safetensors"):  # also a pickle wearing a safetensors name
            evil = tmp_path / f"evil{suffix}"
            evil.write_bytes(pickle.dumps(_Payload(sentinel)))
            argv = [a for a in argv_for("--max_train_steps=1", out=tmp_path / "out") if not a.startswith(f"{flag}=")]
            with pytest.raises(FluxLoraError) as info:
                train([*argv, f"{flag}={evil}"])
            assert flag in str(info.value), (flag, suffix, str(info.value))
    assert not sentinel.exists()
    assert not (tmp_path / "out").exists()


def _snapshot(root: Path, skip: Path) -> dict[str, tuple[int, float]]:
    out = {}
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            path = Path(dirpath) / name
            if skip not in path.parents:
                out[str(path)] = (path.stat().st_size, path.stat().st_mtime)
    return out


def test_hostile_paths_and_metadata_strings_are_data_only(argv_for, tmp_path):
    """A LoRA whose metadata names paths outside the output folder and format/code strings, and a TOML whose
    caption extension points upwards: training writes only inside --output_dir."""
    hostile = {"ss_output_name": "../../escaped", "modelspec.title": "{__import__('os').system('touch pwned')}",
               "ss_tag_frequency": "%s%s%n", "ss_datasets": "../../../etc/passwd", "modelspec.thumbnail": "/tmp/x",
               "ss_network_args": '{"__class__": "os.system"}', "ss_session_id": "$(touch pwned)"}
    weights = tmp_path / "hostile.safetensors"
    save_safetensors(weights, {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(4, 64),
                               "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(192, 4),
                               "lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(4.0)}, hostile)
    images = write_dataset(tmp_path / "data" / "img")
    out = tmp_path / "nest" / "out"
    argv = argv_for("--max_train_steps=1", f"--network_weights={weights}", "--save_state", out=out, images=images,
                    general='caption_prefix = "../../"')
    before = _snapshot(tmp_path, out)
    cwd_before = sorted(os.listdir(Path.cwd()))
    result = train(argv)
    assert result.global_step == 1
    assert _snapshot(tmp_path, out) == before  # nothing outside --output_dir was created or changed
    assert sorted(os.listdir(Path.cwd())) == cwd_before
    assert not (tmp_path / "escaped.safetensors").exists() and not list(tmp_path.rglob("pwned"))
    assert all(p.resolve().is_relative_to(out.resolve()) for p in result.saved)
