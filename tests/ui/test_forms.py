"""The New-run form (`fluxlora.ui.forms`): values become an argv list checked by the trainer's own parser and
preflight, every error lands on the field it names, paths stay inside the roots, and the command line and TOML shown
are the run's."""

from __future__ import annotations

import shlex

import pytest
from ui_data import write_images

from fluxlora.config.args import parse_given
from fluxlora.config.config_file import load_config_file
from fluxlora.errors import ConfigError
from fluxlora.ui.forms import (
    FormProblem,
    argv_from_form,
    command_line,
    generate_argv,
    plan_run,
    split_problems,
)
from fluxlora.ui.security import Roots


def test_values_become_argv_items_never_a_shell_line():
    argv = argv_from_form({"learning_rate": "1e-4", "cache_latents": True, "fp8_base": False, "seed": "",
                           "network_args": 'train_blocks=single "verbose=true"', "output_name": "a; rm -rf ~"})
    assert argv == ["--learning_rate=1e-4", "--cache_latents", "--network_args", "train_blocks=single",
                    "verbose=true", "--output_name=a; rm -rf ~"]
    assert parse_given(argv)["output_name"] == "a; rm -rf ~"  # one value, as typed: no shell ever sees it
    with pytest.raises(FormProblem) as err:
        argv_from_form({"learning_rte": "1", "config_file": "x.toml"})
    assert [e["field"] for e in err.value.errors] == ["learning_rte", "config_file"]
    shown = command_line(argv)
    assert shlex.split(shown.replace("\\\n", " "))[3:] == argv


def test_a_message_with_several_problems_is_split_onto_its_fields():
    err = ConfigError("2 problems with the training flags: (1) --network_dim -4 must be positive; "
                      "(2) --learning_rate 0 must be > 0; raise it", key="--network_dim")
    assert split_problems(err) == [
        {"field": "network_dim", "message": "--network_dim -4 must be positive"},
        {"field": "learning_rate", "message": "--learning_rate 0 must be > 0; raise it"}]


@pytest.fixture
def form(tiny_ckpts, tmp_path):
    """A valid form over the tiny models, with the roots holding the models and this test's folder."""
    images = write_images(tmp_path / "img")
    toml = tmp_path / "ds.toml"
    toml.write_text(f'[general]\ncaption_extension = ".txt"\n[[datasets]]\nresolution = 64\n'
                    f'[[datasets.subsets]]\nimage_dir = "{images}"\n', encoding="utf-8")
    roots = Roots.of([tiny_ckpts.flux_dev.parent, tmp_path])
    values = {"pretrained_model_name_or_path": str(tiny_ckpts.flux_dev), "clip_l": str(tiny_ckpts.clip_l),
              "t5xxl": str(tiny_ckpts.t5xxl), "ae": str(tiny_ckpts.ae), "dataset_config": str(toml),
              "output_dir": str(tmp_path / "out"), "output_name": "x", "network_module": "networks.lora_flux",
              "t5xxl_max_token_length": "16", "network_train_unet_only": True, "learning_rate": "1e-3"}
    return values, roots, tmp_path


def test_a_good_form_plans_like_the_command_line(form):
    values, roots, tmp_path = form
    plan = plan_run({**values, "sample_prompts_text": "a red square --w 64 --h 64"}, roots, tmp_path / "state")
    assert plan.errors == [] and "4 training images" in plan.summary and any("device peak" in m for m in plan.memory)
    view = plan.as_dict()
    toml = tmp_path / "args.toml"
    toml.write_text(view["config_toml"], encoding="utf-8")
    assert load_config_file(toml) == parse_given(plan.argv)  # the TOML shown is the same run
    prompts = parse_given(plan.argv)["sample_prompts"]
    assert open(prompts, encoding="utf-8").read() == "a red square --w 64 --h 64\n"  # the UI's own file is allowed


def test_refused_settings_name_their_fields(form, tmp_path_factory):
    values, roots, tmp_path = form
    plan = plan_run({**values, "learning_rate": "fast"}, roots, tmp_path / "state")
    assert [e["field"] for e in plan.errors] == ["learning_rate"] and "'fast'" in plan.errors[0]["message"]
    plan = plan_run({**values, "network_dim": "-4"}, roots, tmp_path / "state")
    assert plan.errors and plan.errors[0]["field"] == "network_dim"
    elsewhere = write_images(tmp_path_factory.mktemp("elsewhere") / "img")
    plan = plan_run({**values, "output_dir": str(elsewhere), "logging_dir": "/etc"}, roots, tmp_path / "state")
    assert sorted(e["field"] for e in plan.errors) == ["logging_dir", "output_dir"]
    assert all("outside the folders" in e["message"] for e in plan.errors)
    (tmp_path / "ds.toml").write_text(f'[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = "{elsewhere}"\n',
                                      encoding="utf-8")
    plan = plan_run(values, roots, tmp_path / "state")
    assert plan.errors and all(e["field"] == "dataset_config" for e in plan.errors)
    plan = plan_run({k: v for k, v in values.items() if k != "output_dir"}, roots, tmp_path / "state")
    assert {"field": "output_dir", "message": "--output_dir is required"} in plan.errors


def test_generate_flags_stay_inside_the_roots(form):
    from fluxlora.inference.generate import build_parser as generate_parser

    values, roots, tmp_path = form
    lora = tmp_path / "out" / "x.safetensors"
    request = {"ckpt_path": values["pretrained_model_name_or_path"], "clip_l": values["clip_l"],
               "t5xxl": values["t5xxl"], "ae": values["ae"], "lora_weights": str(lora),
               "output_dir": str(tmp_path / "gen"), "prompt": "a red square; rm -rf ~", "width": "64", "steps": "2"}
    argv, out = generate_argv(request, roots)
    parsed = generate_parser().parse_args(argv)  # the generate command's own parser takes it as is
    assert parsed.prompt == "a red square; rm -rf ~" and parsed.width == 64 and parsed.lora_weights == [str(lora)]
    assert out == tmp_path / "gen"
    with pytest.raises(FormProblem) as err:
        generate_argv({**request, "ae": "/etc/passwd", "steps": "many", "prompt": " "}, roots)
    assert sorted(e["field"] for e in err.value.errors) == ["ae", "prompt", "steps"]
