"""The FLUX.1 family's own answers: text length by variant, architecture strings, which files it claims (any file
in the dev layout is dev, whatever its name: FLUX.1 Krea [dev] trains as FLUX.1-dev)."""

from __future__ import annotations

import shutil

import pytest

from fluxlora.errors import ConfigError
from fluxlora.families import resolve_family
from fluxlora.families.flux1.family import FLUX1


def test_text_length_by_variant_and_override(tiny_ckpts):
    dev = FLUX1.inspect(tiny_ckpts.flux_dev, flag="--x")
    schnell = FLUX1.inspect(tiny_ckpts.flux_schnell, flag="--x")
    assert FLUX1.text_length(dev, None) == 512 and FLUX1.text_length(schnell, None) == 256
    assert FLUX1.text_length(schnell, 512) == 512 and FLUX1.text_length(dev, 77) == 77
    for bad in (0, -5, True):
        with pytest.raises(ConfigError, match="--t5xxl_max_token_length"):
            FLUX1.text_length(dev, bad)


def test_architecture_strings():
    dev = FLUX1.architecture_of_variant("dev")
    assert (dev.lora_architecture, dev.base_model_version) == ("flux-1-dev/lora", "flux1")
    assert FLUX1.architecture_of_variant("schnell").architecture == "flux-1-schnell"
    with pytest.raises(ValueError):
        FLUX1.architecture_of_variant("flux-2")


def test_a_dev_layout_file_is_flux1_dev_whatever_its_name(tiny_ckpts, tmp_path):
    krea = tmp_path / "flux1-krea-dev_fp8_scaled.safetensors"
    shutil.copy(tiny_ckpts.flux_dev, krea)
    family, info = resolve_family(krea, None, flag="--pretrained_model_name_or_path")
    assert family is FLUX1 and info.variant == "dev" and info.title == "FLUX.1-dev"
