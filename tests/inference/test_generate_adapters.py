"""`generate` with LyCORIS files (LoKr, LoHa, full, DoRA): applied on the fly = merged (≤ 1e-5), multiplier 0 is the
base image, and the file's algorithm is rebuilt from its keys alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_generate import PROMPT, _float_image, _generator, _shared_tokenizers  # noqa: F401 (autouse fixture)

from fluxlora.network.lora import create_network

CASES = {
    "lokr": ["algo=lokr", "factor=4"],
    "loha": ["algo=loha"],
    "full": ["algo=full"],
    "dora": ["algo=lora", "dora_wd=True"],
}


@pytest.fixture(scope="module", params=list(CASES))
def adapter_file(request, tiny_models, tmp_path_factory) -> tuple[str, Path]:
    """A trained-looking adapter of each algorithm on every DiT Linear and on CLIP-L."""
    network = create_network(1.0, 4, 2.0, tiny_models.flux["dev"], [tiny_models.clip, None],
                             network_args=CASES[request.param], network_module="lycoris.kohya")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in sorted(network.named_parameters()):
            noise = torch.randn(p.shape, generator=gen)
            p.add_(noise * (0.01 * p.abs().mean() if name.endswith("dora_scale") else 0.05))
    path = tmp_path_factory.mktemp("adapter") / f"{request.param}.safetensors"
    network.save(path)
    return request.param, path


def test_on_the_fly_equals_merged_and_zero_is_the_base(tiny_ckpts, adapter_file):
    case, path = adapter_file
    base = _float_image(_generator(tiny_ckpts), PROMPT)
    gen = _generator(tiny_ckpts, "--lora_weights", f"{path};0.7")
    assert {type(m).__name__ for m in gen.networks[0].loras} == {
        "lokr": {"LoKrModule"}, "loha": {"LoHaModule"}, "full": {"FullModule"}, "dora": {"LoConModule"}}[case]
    applied = _float_image(gen, PROMPT)
    merged = _float_image(_generator(tiny_ckpts, "--lora_weights", f"{path};0.7", "--merge_lora_weights"), PROMPT)
    zero = _float_image(_generator(tiny_ckpts, "--lora_weights", f"{path};0"), PROMPT)
    assert (applied - base).abs().max() > 1e-3  # the adapter matters
    assert (applied - merged).abs().max() <= 1e-5
    assert torch.equal(zero, base)
