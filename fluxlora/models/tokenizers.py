"""CLIP-L and T5-XXL tokenizers for FLUX.1, offline by default (spec §3.5, interop.md §1-3).

The package ships byte-identical copies of openai/clip-vit-large-patch14's and google/t5-v1_1-xxl's tokenizer files
(`fluxlora/assets/clip_l`, `fluxlora/assets/t5xxl`), so no hub access is needed. `--tokenizer_cache_dir DIR` keeps
sd-scripts' meaning (`DIR/openai_clip-vit-large-patch14`, `DIR/google_t5-v1_1-xxl`).

Both are the fast (Rust `tokenizers`) classes in transformers 4.x and 5.x alike. sd-scripts on transformers 4.x uses
the slow CLIPTokenizer, which runs ftfy when it is installed; the ids differ only for ftfy-fixable text such as curly
quotes (interop.md §1).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fluxlora.errors import ConfigError

logger = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parents[1] / "assets"
CLIP_NAME = "openai/clip-vit-large-patch14"
T5_NAME = "google/t5-v1_1-xxl"
CLIP_MAX_LENGTH = 77
# Vocabulary sizes (with added special tokens) of the real tokenizers. transformers 5 silently builds a 2-token
# tokenizer from an empty folder, so the size is checked after every load.
VOCAB_SIZES = {CLIP_NAME: 49408, T5_NAME: 32100}


def check_max_length(value: int) -> int:
    """A `--t5xxl_max_token_length` value: a positive integer (the family picks the default)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"--t5xxl_max_token_length {value!r}: must be a positive integer (e.g. 256 or 512)",
                          key="--t5xxl_max_token_length")
    return value


@dataclass(frozen=True)
class TokenizedPrompts:
    """Token ids for a batch: clip_ids [B,77], t5_ids [B,L], t5_mask [B,L] (1 for real tokens, int64)."""

    clip_ids: Tensor
    t5_ids: Tensor
    t5_mask: Tensor

    def to(self, device: str | torch.device) -> TokenizedPrompts:
        return TokenizedPrompts(self.clip_ids.to(device), self.t5_ids.to(device), self.t5_mask.to(device))


@dataclass(frozen=True)
class FluxTokenizers:
    clip: Any  # transformers CLIPTokenizer(Fast)
    t5: Any  # transformers T5TokenizerFast

    def tokenize(self, texts: list[str] | str, t5_max_length: int) -> TokenizedPrompts:
        """Pad to max length and truncate, as sd-scripts does (CLIP pads with EOS 49407, T5 with 0 after EOS 1)."""
        if isinstance(texts, str):
            texts = [texts]
        clip = self.clip(list(texts), max_length=CLIP_MAX_LENGTH, padding="max_length", truncation=True,
                         return_tensors="pt")
        t5 = self.t5(list(texts), max_length=t5_max_length, padding="max_length", truncation=True,
                     return_tensors="pt")
        return TokenizedPrompts(clip["input_ids"], t5["input_ids"], t5["attention_mask"])


def _folder_name(hub_id: str) -> str:
    return hub_id.replace("/", "_")


def _resolve(name: str, default: str, bundled: Path, tokenizer_dir: Path | None) -> tuple[str, Path | None]:
    """Where to load one tokenizer from: (source for from_pretrained, folder to save a hub download into)."""
    if tokenizer_dir is not None:
        for candidate in (tokenizer_dir / _folder_name(name), tokenizer_dir / bundled.name):
            if candidate.is_dir():
                return str(candidate), None
        if name == default:
            logger.info("%s has no %s tokenizer folder; using the copy shipped with fluxlora", tokenizer_dir, name)
            return str(bundled), None
        return name, tokenizer_dir / _folder_name(name)
    if Path(name).is_dir():
        return name, None
    if name == default:
        return str(bundled), None
    return name, None


def _load_one(cls: Any, name: str, default: str, bundled: Path, tokenizer_dir: Path | None) -> Any:
    source, save_to = _resolve(name, default, bundled, tokenizer_dir)
    try:
        tokenizer = cls.from_pretrained(source)
    except Exception as err:  # transformers raises OSError, ValueError, HF hub errors...
        where = f"--tokenizer_cache_dir {tokenizer_dir}: " if tokenizer_dir else ""
        raise ConfigError(
            f"{where}cannot load the {default} tokenizer from {source!r} ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); point --tokenizer_cache_dir at a folder holding "
            f"{_folder_name(default)}/ or leave it unset to use the shipped copy",
            path=source, key="--tokenizer_cache_dir",
        ) from None
    expected = VOCAB_SIZES[default] if name == default else None
    if (expected is not None and len(tokenizer) != expected) or len(tokenizer) < 1000:
        raise ConfigError(
            f"{source}: the {default} tokenizer loaded from here has {len(tokenizer)} tokens"
            f"{f' instead of {expected}' if expected else ''} — the folder is empty or incomplete; copy the tokenizer "
            f"files into it (see fluxlora/assets/TOKENIZERS.md) or leave --tokenizer_cache_dir unset",
            path=source, key="--tokenizer_cache_dir",
        )
    if save_to is not None:
        tokenizer.save_pretrained(str(save_to))  # sd-scripts semantics: the cache dir is filled on first use
    return tokenizer


def load_tokenizers(
    tokenizer_dir: Path | str | None = None,
    *,
    clip_name: str = CLIP_NAME,
    t5_name: str = T5_NAME,
) -> FluxTokenizers:
    """Load the CLIP-L and T5-XXL tokenizers.

    Order for each: `tokenizer_dir/<hub id with / as _>` or `tokenizer_dir/{clip_l,t5xxl}` when `tokenizer_dir` is
    given; a local folder named by `clip_name` / `t5_name`; the shipped copy for the default hub ids; else the hub.
    """
    from transformers import CLIPTokenizerFast, T5TokenizerFast

    tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir is not None else None
    if tokenizer_dir is not None and tokenizer_dir.exists() and not tokenizer_dir.is_dir():
        raise ConfigError(f"--tokenizer_cache_dir {tokenizer_dir}: is a file, expected a folder",
                          path=tokenizer_dir, key="--tokenizer_cache_dir")
    clip = _load_one(CLIPTokenizerFast, clip_name, CLIP_NAME, ASSETS / "clip_l", tokenizer_dir)
    t5 = _load_one(T5TokenizerFast, t5_name, T5_NAME, ASSETS / "t5xxl", tokenizer_dir)
    return FluxTokenizers(clip=clip, t5=t5)
