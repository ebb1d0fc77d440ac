"""FLUX.2's text conditioning for training and sampling: the one text encoder (Mistral Small 3 for [dev], Qwen3 for
[klein]) with its tokenizer, as a `TextEncoders` of the family seam, and where the tokenizer files are found.

The conditioning is one tensor, `prompt_embeds` [B, L, 3·hidden] (three hidden layers side by side, L = the text
length, 512 by default), kept in the encoder's dtype: a 16-bit encoder's output is exact in 16 bits, and the cached
embedding of a [dev] caption is 15.7 MB instead of 31.5 MB in float32. The transformer takes no text mask (BFL and
diffusers attend to the padding's hidden states too), so nothing is trimmed.

Tokenizers: no model hub is read. `--tokenizer_cache_dir DIR` may be the tokenizer folder itself (the `tokenizer/`
folder of the diffusers model: tokenizer.json, tokenizer_config.json) or hold it under sd-scripts' cache name, the hub
id with "/" as "_" (`DIR/mistralai_Mistral-Small-3.1-24B-Instruct-2503`, `DIR/Qwen_Qwen3-4B`); without the flag a
`tokenizer/` folder beside the text-encoder file is used.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from pathlib import Path

import torch
from torch import nn

from fluxlora.errors import ConfigError
from fluxlora.families.base import Autocast, Conditioning, TextEncoders
from fluxlora.families.flux2 import text_encoders as te

logger = logging.getLogger(__name__)

COMPONENT = "text_encoder"
FLAG = "--text_encoder"
PROMPT_EMBEDS = "prompt_embeds"
# the hub repositories whose tokenizer FLUX.2 uses (BFL / diffusers pipelines), by encoder kind
TOKENIZER_REPOS = {"mistral3": "mistralai/Mistral-Small-3.1-24B-Instruct-2503", "qwen3": "Qwen/Qwen3-4B"}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tekken.json")


def _is_tokenizer_dir(folder: Path) -> bool:
    return folder.is_dir() and any((folder / name).is_file() for name in _TOKENIZER_FILES)


def find_tokenizer(kind: str, tokenizer_dir: Path | None, text_encoder: Path) -> Path:
    """The folder holding the `kind` encoder's tokenizer (module docstring); ConfigError naming the places looked."""
    repo = TOKENIZER_REPOS[kind]
    if tokenizer_dir is not None:
        candidates = [Path(tokenizer_dir), Path(tokenizer_dir) / repo.replace("/", "_"), Path(tokenizer_dir) / "tokenizer"]
    else:
        candidates = [Path(text_encoder).parent / "tokenizer", Path(text_encoder).parent / repo.replace("/", "_")]
    for folder in candidates:
        if _is_tokenizer_dir(folder):
            return folder
    looked = ", ".join(str(c) for c in candidates)
    raise ConfigError(
        f"--tokenizer_cache_dir: the FLUX.2 text encoder needs the {repo} tokenizer and none was found (looked in "
        f"{looked}); pass --tokenizer_cache_dir with the model's tokenizer/ folder (tokenizer.json, "
        "tokenizer_config.json) or a folder holding it as " + repo.replace("/", "_"), key="--tokenizer_cache_dir")


def load_tokenizer(folder: Path):
    """The tokenizer (with its chat template) of a tokenizer folder, offline."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as err:
        raise ConfigError(f"--tokenizer_cache_dir {folder}: not a readable tokenizer folder ({err}); pass the model's "
                          "tokenizer/ folder", path=folder, key="--tokenizer_cache_dir") from None


class Flux2TextEncoders(TextEncoders):
    """The one FLUX.2 text encoder and its tokenizer: captions → {`prompt_embeds`: [B, L, 3·hidden]}."""

    def __init__(self, model: nn.Module, spec: te.TextEncoderSpec, tokenizer, *, max_length: int,
                 autocast: Autocast) -> None:
        self.modules = {COMPONENT: model}
        self.spec, self.tokenizer, self.max_length, self.autocast = spec, tokenizer, max_length, autocast

    def encode(self, captions: list[str], *, grad: Collection[str] = ()) -> Conditioning:
        model = self.modules[COMPONENT]
        if model is None:
            raise RuntimeError("the FLUX.2 text encoder was freed after caching its outputs; nothing may encode now")
        if grad:
            raise RuntimeError("the FLUX.2 text encoder carries no LoRA; its outputs never need gradients")
        ids, mask = te.tokenize(self.tokenizer, self.spec.kind, list(captions), self.max_length)
        with self.autocast(), torch.no_grad():
            embeds = te.encode(model, self.spec, ids, mask)
        return {PROMPT_EMBEDS: embeds}


def load_encoders(path: Path, *, dtype: torch.dtype | None, device: torch.device | str, tokenizer_dir: Path | None,
                  max_length: int, autocast: Autocast) -> Flux2TextEncoders:
    """Load the text encoder at `path` (kind from its header) and its tokenizer."""
    model, spec = te.load_text_encoder(path, dtype=dtype, device=device, flag=FLAG)
    tokenizer = load_tokenizer(find_tokenizer(spec.kind, tokenizer_dir, path))
    return Flux2TextEncoders(model, spec, tokenizer, max_length=max_length, autocast=autocast)
