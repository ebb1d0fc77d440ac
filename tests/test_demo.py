"""`fluxlora demo` (what `make demo` runs): the whole pipeline on a CPU, and its loss falls."""

from __future__ import annotations

from PIL import Image

from fluxlora.demo import run_demo
from fluxlora.network.saving import read_lora


def test_demo_trains_and_leaves_lora_plot_and_samples(tmp_path):
    found = run_demo(tmp_path / "demo", steps=40)
    losses = found["losses"]
    assert len(losses) == 40
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:10]) / 10  # the loss falls
    tensors, metadata = read_lora(found["lora"])
    assert metadata["modelspec.architecture"] == "flux-1-dev/lora" and tensors
    assert found["plot"].is_file()
    assert [p.name for p in found["samples"]] == ["before.png", "after.png"]
    for sample in found["samples"]:
        with Image.open(sample) as image:
            assert image.size == (64, 64)
