"""End to end in a real headless Chromium (Debian's, driven by Playwright) against a real `fluxlora ui` process and
real training processes on the tiny models:

make a 4-image dataset (upload), edit a caption, write the dataset TOML; on New run a refused setting shows its error
beside its field, a GPU preset comes from the planner; start the run; loss points and a first sample appear; sample
now and save now write their files; stop (SIGINT path, resumable); resume; kill the UI while the run trains — the run
goes on — and a new UI re-attaches and sees it finish; the LoRA is listed on Outputs. Screenshots of every page are
kept under the test's tmp folder (`screenshots/`).
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from ui_helpers import launch_chromium, start_ui

from fluxlora.config.dataset import DatasetDefaults, load_dataset_config
from fluxlora.training.control import events_path, read_events

pytestmark = pytest.mark.slow
T = 300_000  # ms: generous, a loaded 2-core machine starts a training process in tens of seconds


def _write_uploads(folder: Path) -> list[str]:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    files = []
    for i in range(4):
        pixels = (rng.random((64, 64 + 32 * (i % 2), 3)) * 255).astype("uint8")
        pixels[16:48, 16:40] = (230, 20, 20)
        Image.fromarray(pixels).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"a photo of sks red square {i}", encoding="utf-8")
        files += [str(folder / f"img{i}.png"), str(folder / f"img{i}.txt")]
    return files


def _wait(predicate, what: str, timeout: float = T / 1000):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _dump_state(page, shots: Path, servers) -> None:
    """On a failure: a screenshot of the page and the job as the UI sees it (printed: pytest shows it)."""
    try:
        if page is not None:
            page.screenshot(path=str(shots / "failure.png"), full_page=True)
    except Exception as err:  # noqa: BLE001 - diagnostics must not hide the failure
        print(f"no failure screenshot: {err}")
    for server in servers:
        if server is not None and server.proc.poll() is None:
            status, job = server.request("GET", "/api/jobs/1?log=40", timeout=30)
            print(f"job 1 as {server.url} sees it ({status}):", {k: job.get(k) for k in ("status", "exit_code", "error",
                  "launches", "files")} if isinstance(job, dict) else job)
            print("\n".join(job.get("log", []) if isinstance(job, dict) else []))
            print("\n".join(server.output[-20:]))


# the runs the UI launches get the step_delay fault through tests/reliability/fault_site/sitecustomize.py
FAULT_SITE = Path(__file__).resolve().parents[1] / "reliability" / "fault_site"
STEP_DELAY = {"FLUXLORA_TEST_FAULTS": "step_delay=1.0",
              "PYTHONPATH": os.pathsep.join(p for p in (str(FAULT_SITE), os.environ.get("PYTHONPATH")) if p)}


def test_dataset_to_finished_run_in_a_browser(tiny_ckpts, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    root, shots = tmp_path / "root", tmp_path / "screenshots"
    shots.mkdir()
    shutil.copytree(tiny_ckpts.flux_dev.parent, root / "models")
    uploads = _write_uploads(tmp_path / "upload")
    folder, toml, out = root / "datasets" / "sks", root / "datasets" / "sks.toml", root / "outputs"
    # each optimizer step of the runs this UI starts sleeps 1 s, so the buttons are pressed while it trains
    ui = start_ui([root], tmp_path / "state", env=STEP_DELAY)
    second = None
    page = None
    try:
        with sync_playwright() as p:
            browser = launch_chromium(p, tmp_path / "profile")
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))

            # ---- Datasets: a folder, 4 uploaded images with captions, one caption edited, the TOML written
            page.goto(ui.url + "/#/datasets")
            page.fill("#ds-folder", str(folder))
            page.click("#ds-mkdir")
            expect(page.locator("#ds-summary")).to_contain_text("0 images", timeout=T)
            page.set_input_files("#ds-upload", uploads)
            expect(page.locator(".card")).to_have_count(4, timeout=T)
            page.fill("#ds-res", "64")
            page.click("#ds-open")
            expect(page.locator('[data-image="img1.png"] .meta').first).to_contain_text("bucket 64×64", timeout=T)
            card = page.locator('[data-image="img1.png"]')
            card.locator("textarea").fill("a photo of sks red square, edited in the browser")
            card.locator("button").click()
            expect(card.locator(".good")).to_have_text("saved", timeout=T)
            assert (folder / "img1.txt").read_text(encoding="utf-8").strip() == \
                "a photo of sks red square, edited in the browser"
            page.fill("#ds-toml-path", str(toml))
            page.click("#ds-write-toml")
            expect(page.locator("#ds-toml-text")).to_contain_text("image_dir", timeout=T)
            blueprint = load_dataset_config(toml, DatasetDefaults())
            assert blueprint.datasets[0].subsets[0].image_dir == folder
            page.screenshot(path=str(shots / "datasets.png"), full_page=True)

            # ---- New run: a refused setting, a preset, then start
            page.click("#ds-use")
            expect(page.locator("#run-start")).to_be_visible(timeout=T)
            page.select_option("#flag-pretrained_model_name_or_path", str(root / "models" / "flux1-dev.safetensors"))
            expect(page.locator("#flag-dataset_config")).to_have_value(str(toml))
            page.fill("#flag-output_dir", str(out))
            page.fill("#flag-output_name", "sks")
            page.fill("#flag-max_train_steps", "32")
            page.fill("#flag-t5xxl_max_token_length", "16")
            page.fill("#flag-learning_rate", "fast")
            page.fill("#run-prompts", "a photo of sks red square --w 64 --h 64 --s 2 --d 1")
            page.click("#run-check")
            field_error = page.locator('[data-error-for="learning_rate"]')
            expect(field_error).to_contain_text("--learning_rate", timeout=T)
            expect(field_error).to_contain_text("'fast'")
            page.screenshot(path=str(shots / "new-run-refused.png"), full_page=True)
            page.fill("#flag-learning_rate", "1e-3")
            page.click("#all-flags summary")
            page.check("#flag-sample_at_first")
            page.select_option("#preset-gb", "24")
            page.click("#preset-get")
            expect(page.locator("#preset-result")).to_contain_text("24 GB: fits as given", timeout=T)
            page.click("#run-check")
            expect(page.locator("#plan-command")).to_contain_text("--learning_rate=1e-3", timeout=T)
            expect(field_error).to_be_empty()
            page.screenshot(path=str(shots / "new-run.png"), full_page=True)
            page.click("#run-start")
            page.wait_for_url("**/#/runs/1", timeout=T)

            # ---- the live page: loss points and a first sample, then sample now, save now, stop
            expect(page.locator("[data-status=training]")).to_be_visible(timeout=T)
            page.wait_for_function("() => state.events.steps.length >= 2", timeout=T)
            expect(page.locator("[data-sample]")).to_have_count(1, timeout=T)  # --sample_at_first
            page.click("#btn-sample")
            expect(page.locator("[data-sample]")).to_have_count(2, timeout=T)
            page.click("#btn-save")
            expect(page.locator("[data-file$='-state'][data-file^='sks-step']")).to_have_count(1, timeout=T)
            saved = page.locator("[data-file$='-state'][data-file^='sks-step']").get_attribute("data-file")
            assert (out / saved / "COMPLETE").is_file() and (out / saved.replace("-state", ".safetensors")).is_file()
            page.screenshot(path=str(shots / "run.png"), full_page=True)
            page.click("#btn-stop")
            expect(page.locator("[data-status=stopped]")).to_be_visible(timeout=T)
            expect(page.locator("#run-error-line")).to_contain_text("interrupted by SIGINT")
            expect(page.locator("#run-status")).to_contain_text("exit code 130")
            assert (out / "sks-state" / "COMPLETE").is_file() and (out / "sks-interrupted.safetensors").is_file()
            page.screenshot(path=str(shots / "run-stopped.png"), full_page=True)

            # ---- resume; kill the UI while it trains: the run goes on, and a new UI re-attaches
            page.click("#btn-resume")
            expect(page.locator("[data-status=training]")).to_be_visible(timeout=T)
            _, job = ui.request("GET", "/api/jobs/1")
            assert job["launches"] == 2 and "--resume" in job["launch_argv"]
            pid = job["pid"]
            ui.stop(signal.SIGKILL)
            log = events_path(out, "sks")
            killed_at = max(e["step"] for e in read_events(log)[0] if e["event"] == "step")
            os.kill(pid, 0)  # the trainer is still there
            _wait(lambda: any(e["event"] == "step" and e["step"] > killed_at for e in read_events(log)[0]),
                  "a step after the UI was killed")
            second = start_ui([root], tmp_path / "state")
            page.goto(second.url + "/#/runs/1")
            expect(page.locator("[data-status=finished]")).to_be_visible(timeout=T)
            expect(page.locator("#st-step")).to_have_text("32 / 32")
            page.screenshot(path=str(shots / "run-finished.png"), full_page=True)
            _, job = second.request("GET", "/api/jobs/1")
            assert job["status"] == "finished" and job["exit_code"] == 0

            # ---- Outputs: the LoRA with its metadata
            page.click("nav a[data-tab=outputs]")
            row = page.locator("[data-lora='sks.safetensors']")
            expect(row).to_be_visible(timeout=T)
            expect(row).to_contain_text("32")  # ss_steps
            page.screenshot(path=str(shots / "outputs.png"), full_page=True)
            assert errors == []
            browser.close()
    except BaseException:
        _dump_state(page, shots, [second, ui])
        raise
    finally:
        ui.stop()
        if second is not None:
            second.stop()
    steps = [e["step"] for e in read_events(events_path(out, "sks"))[0] if e["event"] == "step"]
    assert steps[-1] == 32 and sorted(set(steps)) == list(range(1, 33))
    assert sorted(p.name for p in shots.iterdir()) == ["datasets.png", "new-run-refused.png", "new-run.png",
                                                       "outputs.png", "run-finished.png", "run-stopped.png", "run.png"]
