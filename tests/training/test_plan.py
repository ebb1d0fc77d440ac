"""The run plan: every problem of the command line, the files and the dataset in one error before any weight is read;
the scheduler checked for the run's real length; what the plan decides, decided once."""

from __future__ import annotations

import pytest

from fluxlora.config.train_config import parse_train_config
from fluxlora.errors import ConfigError, FluxLoraError
from fluxlora.families.flux1.family import FLUX1
from fluxlora.training.plan import build_plan


def _replace(argv: list[str], flag: str, value: str) -> list[str]:
    return [f"{flag}={value}" if a.startswith(f"{flag}=") else a for a in argv]


def test_every_problem_is_reported_at_once(train_argv, tiny_ckpts, tmp_path):
    argv = _replace(train_argv(), "--clip_l", str(tiny_ckpts.ae))  # the AE given as CLIP-L
    (tmp_path / "file").write_text("x")
    argv = _replace(argv, "--output_dir", str(tmp_path / "file" / "out"))  # under a file
    argv += ["--lr_scheduler=cosine_forever"]
    (tmp_path / "bad.toml").write_text('[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = "nowhere"\n')
    argv = _replace(argv, "--dataset_config", str(tmp_path / "bad.toml"))
    with pytest.raises(FluxLoraError) as info:
        build_plan(parse_train_config(argv))
    message = str(info.value)
    assert message.startswith("4 problems: (1) ") and "\n" not in message
    for fragment in ("--clip_l", "nowhere", "--output_dir", "--lr_scheduler 'cosine_forever' is unknown"):
        assert fragment in message, (fragment, message)
    assert info.value.key == "--clip_l"  # the first problem names the flag to fix first


@pytest.mark.parametrize(("flags", "message"), [
    (["--lr_scheduler=cosine_forever"], "--lr_scheduler 'cosine_forever' is unknown"),
    (["--lr_scheduler=cosine_with_min_lr"], "needs --lr_scheduler_min_lr_ratio"),
    (["--lr_scheduler_args", "nonsense"], "--lr_scheduler_args"),
    (["--lr_scheduler=cosine", "--lr_warmup_steps=50"], "--lr_warmup_steps 50 exceeds the 4 training steps"),
])
def test_scheduler_problems_are_found_before_weights(train_argv, flags, message, monkeypatch):
    import fluxlora.training.setup as setup

    monkeypatch.setattr(setup, "load_models", lambda *a, **k: pytest.fail("weights loaded"))
    with pytest.raises(ConfigError, match=message):
        build_plan(parse_train_config(train_argv("--max_train_steps=4", *flags)))


def test_the_plan_holds_the_decisions(train_argv):
    plan = build_plan(parse_train_config(train_argv("--max_train_steps=5", "--gradient_checkpointing",
                                                    "--checkpoint_blocks=2", "--cache_text_encoder_outputs")))
    assert plan.family is FLUX1 and plan.model.variant == "dev" and plan.model.title == "FLUX.1-dev"
    assert set(plan.encoder_files) == {"clip_l", "t5xxl"}
    assert plan.checkpointed == {0, 1} and plan.blocks_to_swap == 0
    assert plan.residency.drop_text_encoders and plan.text_length == 16
    assert plan.schedule.max_train_steps == 5 and plan.schedule.steps_per_epoch == 2
    assert plan.guidance == 1.0  # dev takes the guidance input; --guidance_scale 1.0 (fluxlora's default)
    with pytest.raises(AttributeError):
        plan.seed = 1  # frozen
