"""`fluxlora check`, `fluxlora cache`, `--dry_run`, TensorBoard logging and differential output preservation."""

from __future__ import annotations

from fluxlora.cli import main as fluxlora_main
from fluxlora.training.cli import train


def test_check_reports_the_plan_and_creates_nothing(train_argv, tmp_path, capsys):
    argv = train_argv(output_dir=tmp_path / "never")
    assert fluxlora_main(["check", *argv]) == 0
    out = capsys.readouterr().out
    assert "ok:" in out and "FLUX.1-dev" in out and "4 training images" in out
    assert not (tmp_path / "never").exists()


def test_check_fails_before_weights_on_a_wrong_model_file(train_argv, tiny_ckpts, tmp_path, capsys):
    argv = [a if not a.startswith("--clip_l=") else f"--clip_l={tiny_ckpts.ae}" for a in train_argv()]
    assert fluxlora_main(["check", *argv]) == 2
    err = capsys.readouterr().err
    assert "--clip_l" in err and "autoencoder" in err


def test_cache_command_writes_disk_caches(train_argv, tiny_dataset, tmp_path):
    cache_dir = tmp_path / "cache"
    argv = train_argv("--cache_latents_to_disk", "--cache_text_encoder_outputs_to_disk", f"--cache_dir={cache_dir}")
    assert fluxlora_main(["cache", *argv]) == 0
    latents = list(cache_dir.rglob("*_flux_latents.safetensors"))
    texts = list(cache_dir.rglob("*_flux_te.safetensors"))
    assert len(latents) == 4 and len(texts) == 4
    assert not list(tiny_dataset.glob("*.safetensors"))  # nothing written beside the images with --cache_dir


def test_dry_run_stops_after_the_checks(train_argv, tmp_path, capsys):
    assert train(train_argv("--dry_run", output_dir=tmp_path / "dry")) is None
    assert "--dry_run: checks passed" in capsys.readouterr().out
    assert not (tmp_path / "dry").exists()


def test_tensorboard_logging_writes_events_with_sd_scripts_metric_names(train_argv, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logs = tmp_path / "logs"
    train(train_argv("--max_train_steps=2", "--log_with=tensorboard", f"--logging_dir={logs}"))
    events = list(logs.rglob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss/current", "loss/average"} <= tags
    assert any(t.startswith("lr/") for t in tags)


def test_logging_dir_alone_turns_tensorboard_on_in_a_timestamped_folder(train_argv, tmp_path):
    """sd-scripts (spec §1.11): --logging_dir without --log_with logs to TensorBoard in
    <logging_dir>/<log_prefix><YYYYmmddHHMMSS>/ (the tracker writes into its run-name folder there)."""
    import re

    logs = tmp_path / "logs"
    train(train_argv("--max_train_steps=1", f"--logging_dir={logs}", "--log_prefix=gui_"))
    (run_dir,) = logs.iterdir()
    assert re.fullmatch(r"gui_\d{14}", run_dir.name), run_dir.name
    assert list((run_dir / "network_train").glob("events.out.tfevents.*"))


def test_differential_output_preservation_targets_the_base_prediction(train_argv, tmp_path):
    """DOP's target is the base model's prediction (LoRA multiplier 0). Starting from a non-zero LoRA, the first loss
    is then above 0 (it would be exactly 0 if the multiplier were not switched off for the target) and below the
    ordinary velocity loss of the same LoRA on the same step (the LoRA's change is smaller than its error)."""
    start = train(train_argv("--max_train_steps=2", "--learning_rate=3e-2", output_dir=tmp_path / "start"))
    lora = f"--network_weights={start.final_lora}"
    dop = "[general.custom_attributes]\ndiff_output_preservation = true\n"
    with_dop = train(train_argv("--max_train_steps=1", lora, output_dir=tmp_path / "dop", toml_extra=dop))
    without = train(train_argv("--max_train_steps=1", lora, output_dir=tmp_path / "plain"))
    assert 0.0 < with_dop.losses[0] < without.losses[0], (with_dop.losses, without.losses)


def test_ignored_options_warn_once_in_the_log_file_and_the_run_finishes(train_argv, tmp_path):
    """kohya_ss writes noise_offset / min_snr_gamma / sample_sampler for every run; sd-scripts ignores them for FLUX
    and trains. So do we: one warning block at start, in the console log file too."""
    import logging

    log = tmp_path / "run.log"
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        argv = train_argv("--max_train_steps=1", "--noise_offset=0.05", "--min_snr_gamma=7",
                          "--sample_sampler=euler", f"--console_log_file={log}")
        assert fluxlora_main(["train", *argv]) == 0
        for handler in root.handlers:
            handler.flush()
        text = log.read_text(encoding="utf-8")
    finally:
        for handler in root.handlers:
            if handler not in saved[0]:
                handler.close()
        root.handlers[:], _ = saved
        root.setLevel(saved[1])
    assert text.count("change nothing for FLUX") == 1
    block = text[text.index("3 setting(s) change nothing"):]
    for option in ("--noise_offset 0.05", "--min_snr_gamma 7.0", "--sample_sampler euler"):
        assert option in block
    assert (tmp_path / "out" / "lora.safetensors").is_file()


def test_console_log_file_and_level_are_honoured(train_argv, tmp_path):
    import logging

    log = tmp_path / "console.log"
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        argv = train_argv("--dry_run", f"--console_log_file={log}", "--console_log_simple",
                          "--console_log_level=INFO", output_dir=tmp_path / "dry")
        assert fluxlora_main(["train", *argv]) == 0
        for handler in root.handlers:
            handler.flush()
        text = log.read_text(encoding="utf-8")
        assert "preflight: FLUX.1-dev" in text
        assert not text.startswith("20")  # --console_log_simple: messages without the time stamp
    finally:
        for handler in root.handlers:
            if handler not in saved[0]:
                handler.close()
        root.handlers[:], _ = saved
        root.setLevel(saved[1])
