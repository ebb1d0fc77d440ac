"""The tools with LyCORIS files: `merge` adds each algorithm's exact weight change (= the network's own merge),
LoRA + LoRA merging and `convert` refuse them with one clear line (nothing written), `inspect` knows them."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from fluxlora.errors import ConfigError
from fluxlora.models.checkpoints import ModelKind, detect_kind
from fluxlora.models.flux import Flux, FluxParams, axes_dim_for
from fluxlora.network.lora import create_network
from fluxlora.tools import convert, merge

CASES = {
    "lokr": ["algo=lokr", "factor=4"],
    "loha": ["algo=loha"],
    "full": ["algo=full"],
    "dora": ["algo=lora", "dora_wd=True"],
    "lokr-dora-input-axis": ["algo=lokr", "factor=2", "dora_wd=True", "wd_on_output=False"],
}


def _flux(h) -> tuple[Flux, dict[str, torch.Tensor]]:
    sd = h.tiny_flux_sd(depth=2, single=2)
    params = FluxParams(in_channels=8, vec_in_dim=8, context_in_dim=8, hidden_size=h.HIDDEN, num_heads=2, depth=2,
                        depth_single_blocks=2, axes_dim=axes_dim_for(h.HIDDEN // 2), guidance_embed=True)
    flux = Flux(params)
    flux.load_state_dict(sd)
    return flux, sd


@torch.no_grad()
def _trained(case: str, h, tmp_path):
    flux, sd = _flux(h)
    network = create_network(1.0, 2, 1, flux, [], network_args=CASES[case], network_module="lycoris.kohya")
    g = torch.Generator().manual_seed(3)
    for name, p in sorted(network.named_parameters()):
        p.add_(torch.randn(p.shape, generator=g) * (0.05 * p.abs().mean() if name.endswith("dora_scale") else 0.1))
    path = tmp_path / f"{case}.safetensors"
    network.save(path)
    return flux, sd, network, path


@pytest.mark.parametrize("case", list(CASES))
def test_merge_into_the_model_equals_the_networks_merge(case, h, write, tmp_path):
    flux, sd, network, lora = _trained(case, h, tmp_path)
    base, out = write("flux.safetensors", sd), tmp_path / "merged.safetensors"
    assert merge.main(["--flux_model", str(base), "--models", str(lora), "--ratios", "0.7", "--save_to", str(out)]) == 0
    network.set_multiplier(0.7)
    network.merge_into_base()
    got, expected = load_file(str(out)), flux.state_dict()
    changed = [k for k in sd if not torch.equal(got[k], sd[k])]
    assert len(changed) >= len(network.loras)
    if case == "full":
        assert any(k.endswith(".bias") for k in changed)
    for key in sd:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-5, msg=key)


def test_lycoris_files_are_refused_where_they_cannot_go(h, write, tmp_path):
    *_, lokr = _trained("lokr", h, tmp_path)
    with pytest.raises(ConfigError, match="LoKr.*cannot be summed into one LoRA file.*--flux_model"):
        merge.main(["--models", str(lokr), str(lokr), "--save_to", str(tmp_path / "sum.safetensors")])
    for dst in ("diffusers", "peft", "ai-toolkit"):
        out = tmp_path / f"{dst}.safetensors"
        args = convert.build_parser().parse_args(["--src", "sd-scripts", "--dst", dst, "--src_path", str(lokr),
                                                  "--dst_path", str(out)])
        with pytest.raises(ConfigError, match=rf"LoKr \(LyCORIS\).*{dst} LoRA format holds only plain LoRA"):
            convert.convert(args)
        assert not out.exists()
    assert not (tmp_path / "sum.safetensors").exists()


@pytest.mark.parametrize("case", list(CASES))
def test_lycoris_files_are_recognised_as_loras(case, h, tmp_path):
    *_, path = _trained(case, h, tmp_path)
    assert detect_kind(load_file(str(path))) is ModelKind.LORA


