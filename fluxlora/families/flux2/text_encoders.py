"""FLUX.2 text encoders: Mistral Small 3 (24 B, [dev]) and Qwen3 4B / 8B ([klein]) through transformers, loaded from
the ComfyUI / BFL file layouts with an explicit key map and a strict key-set check.

The prompt embedding is the stack of three hidden states (Mistral layers 10, 20, 30; Qwen3 9, 18, 27) laid side by side
per token: [B, 512, 3·hidden] (diffusers `Flux2Pipeline._get_mistral_3_small_prompt_embeds`, `Flux2KleinPipeline.
_get_qwen3_prompt_embeds`, BFL `text_encoder.py`). `hidden_states[k]` is the output of the k-th decoder layer, before
the final norm.

Decision (memory): only the language model's first `max(layers)` decoder layers are built and loaded — 30 of
Mistral's 40 (and none of its vision tower), 27 of Qwen3's 36, no final norm, no LM head. Their outputs cannot reach
the stacked layers, so the embeddings are identical, and the 24 B encoder shrinks to ~18 B (Qwen3-4B to ~3 B). The
file's other tensors are recognised by name and skipped; anything else is an error naming the key.

Key layouts accepted: ComfyUI / HF causal-LM files (`model.layers.N.*`, `model.embed_tokens.weight`, `model.norm.weight`,
`lm_head.weight`), HF Mistral3 files (`model.language_model.*` or `language_model.model.*`, `vision_tower.*`,
`multi_modal_projector.*`), and bare base-model keys (`layers.N.*`). fp8 files keep Linear weights in fp8, up-cast per
call (as `fluxlora.models.text_encoders` does for T5).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from fluxlora.errors import CheckpointError
from fluxlora.models.checkpoints import DTYPES, check_keys, load_tensors, module_shapes, read_header
from fluxlora.models.fp8 import FP8_DTYPES, upcast_fp8_linears

if TYPE_CHECKING:  # transformers is imported lazily (seconds to import; preflight never needs it)
    from transformers import PretrainedConfig

logger = logging.getLogger(__name__)

MAX_LENGTH = 512
MISTRAL_LAYERS = (10, 20, 30)
QWEN3_LAYERS = (9, 18, 27)
# BFL's (and diffusers') system message for the Mistral encoder of FLUX.2 [dev].
MISTRAL_SYSTEM_MESSAGE = ("You are an AI that reasons about image descriptions. You give structured responses focusing "
                          "on object relationships, object attribution and actions without speculation.")

_PREFIXES = ("model.language_model.", "language_model.model.", "model.")
_UNUSED = re.compile(r"^(lm_head\.|norm\.|vision_tower\.|multi_modal_projector\.|language_model\.lm_head\.)")
_LAYER = re.compile(r"^layers\.(\d+)\.")


@dataclass(frozen=True)
class TextEncoderSpec:
    """Which encoder, which layers are stacked, and how much of it is built."""

    kind: str  # "mistral3" | "qwen3"
    layers: tuple[int, ...]

    @property
    def built_layers(self) -> int:
        return max(self.layers)


SPECS = {"mistral3": TextEncoderSpec("mistral3", MISTRAL_LAYERS), "qwen3": TextEncoderSpec("qwen3", QWEN3_LAYERS)}


# ---------------------------------------------------------------- configs


def mistral_config(**overrides) -> PretrainedConfig:
    """Mistral Small 3.1/3.2 24 B's language model (the FLUX.2 [dev] text encoder); `overrides` replace fields."""
    from transformers import MistralConfig

    values = dict(vocab_size=131072, hidden_size=5120, intermediate_size=32768, num_hidden_layers=40,
                  num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5,
                  max_position_embeddings=131072, rope_parameters={"rope_type": "default", "rope_theta": 1e9},
                  sliding_window=None, tie_word_embeddings=False, pad_token_id=11, bos_token_id=1, eos_token_id=2)
    values.update(overrides)
    return MistralConfig(**values)


def qwen3_config(size: str = "4b", **overrides) -> PretrainedConfig:
    """Qwen3-4B (klein 4B) or Qwen3-8B (klein 9B); `overrides` replace fields."""
    from transformers import Qwen3Config

    hidden, inter = {"4b": (2560, 9728), "8b": (4096, 12288)}[size]
    values = dict(vocab_size=151936, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=36,
                  num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6,
                  max_position_embeddings=40960, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                  tie_word_embeddings=(size == "4b"), pad_token_id=151643, bos_token_id=151643, eos_token_id=151645)
    values.update(overrides)
    return Qwen3Config(**values)


def tiny_config(kind: str, **overrides) -> PretrainedConfig:
    """A 4-layer, width-32 encoder of `kind` with a 1000-token vocabulary (stacked layers must then be ≤ 4)."""
    small = dict(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=8, max_position_embeddings=1024, pad_token_id=0, bos_token_id=1,
                 eos_token_id=2)
    small.update(overrides)
    return mistral_config(**small) if kind == "mistral3" else qwen3_config(**small)


def config_from_shapes(kind: str, shapes: Mapping[str, tuple[int, ...]], **overrides) -> PretrainedConfig:
    """The encoder config a file's (base-model-keyed) shapes describe; head size 128 for real widths, 8 for tiny ones
    (it is not stored for Mistral; Qwen3's q_norm holds it)."""
    vocab, hidden = shapes["embed_tokens.weight"]
    layers = 1 + max(int(m.group(1)) for k in shapes if (m := _LAYER.match(k)))
    q_out = shapes["layers.0.self_attn.q_proj.weight"][0]
    head_dim = shapes["layers.0.self_attn.q_norm.weight"][0] if kind == "qwen3" else (128 if hidden >= 1024 else 8)
    if q_out % head_dim or shapes["layers.0.self_attn.k_proj.weight"][0] % head_dim:
        raise ValueError(f"attention width {q_out} is not a multiple of the head size {head_dim}")
    values = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, head_dim=head_dim,
                  intermediate_size=shapes["layers.0.mlp.gate_proj.weight"][0], num_attention_heads=q_out // head_dim,
                  num_key_value_heads=shapes["layers.0.self_attn.k_proj.weight"][0] // head_dim)
    if hidden < 1024:  # tiny test files use the tiny special-token ids
        values.update(pad_token_id=0, bos_token_id=1, eos_token_id=2, max_position_embeddings=1024)
    values.update(overrides)
    if kind == "mistral3":
        return mistral_config(**values)
    return qwen3_config("8b" if hidden == 4096 else "4b", **values)


def build_encoder(kind: str, config: PretrainedConfig) -> nn.Module:
    """The base language model (no LM head, no vision tower) for `config`."""
    from transformers import MistralModel, Qwen3Model

    return (MistralModel if kind == "mistral3" else Qwen3Model)(config)


# ---------------------------------------------------------------- file layout


def detect_text_encoder(keys) -> str | None:
    """'qwen3' (per-head q_norm), 'mistral3' (a Llama-style decoder without it), or None for other files."""
    keys = set(keys)
    base = {_strip(k) for k in keys}
    if "layers.0.self_attn.q_proj.weight" not in base or "embed_tokens.weight" not in base:
        return None
    return "qwen3" if "layers.0.self_attn.q_norm.weight" in base else "mistral3"


def _strip(key: str) -> str:
    for prefix in _PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def file_key_map(file_keys, built_layers: int) -> tuple[dict[str, str], list[str]]:
    """(file key → model key for the tensors we load, file keys we skip on purpose). Unknown keys are returned as
    model keys too, so the strict check names them."""
    used, skipped = {}, []
    for key in file_keys:
        base = _strip(key)
        m = _LAYER.match(base)
        if _UNUSED.match(base) or _UNUSED.match(key) or (m and int(m.group(1)) >= built_layers):
            skipped.append(key)
        else:
            used[key] = base
    return used, skipped


def file_state_dict(model: nn.Module, *, lm_head: Tensor | None = None) -> dict[str, Tensor]:
    """A base model's weights under the ComfyUI file names (`model.*`), plus `model.norm` and an optional LM head."""
    out = {f"model.{k}": v.contiguous() for k, v in model.state_dict().items()}
    if lm_head is not None:
        out["lm_head.weight"] = lm_head.contiguous()
    return out


def inspect_text_encoder(path: str | Path, *, flag: str = "--text_encoder") -> tuple[str, int, int]:
    """(kind, hidden width, layers in the file) from the header alone; a file of another kind is a one-line error."""
    header = read_header(path, flag=flag)
    kind = detect_text_encoder(header.tensors)
    if kind is None:
        raise CheckpointError(f"{flag} {header.path}: not a Mistral 3 / Qwen3 text encoder (no layers.0.self_attn / "
                              "embed_tokens keys); pass the FLUX.2 text encoder file", path=header.path, key=flag)
    embed = next(s for k, s in header.shapes.items() if _strip(k) == "embed_tokens.weight")
    layers = 1 + max(int(m.group(1)) for k in header.tensors if (m := _LAYER.match(_strip(k))))
    return kind, embed[1], layers


def load_text_encoder(path: str | Path, *, expected: str | None = None, dtype: torch.dtype | None = None,
                      device: str | torch.device = "cpu", flag: str = "--text_encoder",
                      layers: Sequence[int] | None = None) -> tuple[nn.Module, TextEncoderSpec]:
    """Load a FLUX.2 text encoder file into a frozen, truncated transformers base model.

    `expected` ("mistral3" / "qwen3") is what the transformer needs: a klein file given a Mistral file (or the reverse)
    fails here, before any weight is read. `layers` overrides the stacked layers (tiny test encoders).
    """
    header = read_header(path, flag=flag)
    kind = detect_text_encoder(header.tensors)
    if kind is None:
        raise CheckpointError(f"{flag} {header.path}: not a Mistral 3 / Qwen3 text encoder (no layers.0.self_attn / "
                              "embed_tokens keys); pass the FLUX.2 text encoder file", path=header.path, key=flag)
    names = {"mistral3": "Mistral Small 3 (FLUX.2 [dev])", "qwen3": "Qwen3 (FLUX.2 [klein])"}
    if expected is not None and kind != expected:
        raise CheckpointError(f"{flag} {header.path}: this is a {names[kind]} text encoder, but the transformer needs "
                              f"{names[expected]}; pass the text encoder that belongs to the model", path=header.path,
                              key=flag)
    spec = TextEncoderSpec(kind, tuple(layers) if layers is not None else SPECS[kind].layers)
    used, skipped = file_key_map(header.tensors, spec.built_layers)
    shapes = {model_key: header.tensors[file_key].shape for file_key, model_key in used.items()}
    try:
        config = config_from_shapes(kind, shapes, num_hidden_layers=spec.built_layers)
    except (KeyError, ValueError, IndexError) as err:
        raise CheckpointError(f"{flag} {header.path}: cannot derive the {names[kind]} configuration from its keys "
                              f"({type(err).__name__}: {err})", path=header.path, key=flag) from None
    layers_in_file = 1 + max(int(m.group(1)) for k in header.tensors if (m := _LAYER.match(_strip(k))))
    if layers_in_file < spec.built_layers:
        raise CheckpointError(f"{flag} {header.path}: has {layers_in_file} layers, FLUX.2 stacks layer "
                              f"{spec.built_layers}; the file is truncated or of another model", path=header.path,
                              key=flag)
    with torch.device("meta"):
        model = build_encoder(kind, config)
    model.norm = nn.Identity()  # never reached by the stacked layers; not loaded
    check_keys(shapes, module_shapes(model), path=header.path, what=f"the {names[kind]} text encoder", flag=flag)

    if dtype is None:
        counts = {k: v for k, v in header.dtype_counts().items() if DTYPES[k].is_floating_point}
        dtype = DTYPES[max(counts, key=counts.__getitem__)] if counts else torch.float32
    compute = torch.bfloat16 if dtype in FP8_DTYPES else dtype
    linear_weights = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    state = {}
    for file_key, tensor in load_tensors(header, device=device).items():
        if file_key not in used:
            continue
        key = used[file_key]
        keep_fp8 = key in linear_weights and (tensor.dtype in FP8_DTYPES or dtype in FP8_DTYPES)
        state[key] = tensor.to(dtype if dtype in FP8_DTYPES else tensor.dtype) if keep_fp8 else tensor.to(compute)
    model.load_state_dict(state, strict=True, assign=True)
    with torch.device(device):  # the rotary buffer (not in the file) was built on meta
        model.rotary_emb = type(model.rotary_emb)(config=config)
    upcast_fp8_linears(model)
    model.requires_grad_(False).eval()
    logger.info("loaded %s text encoder %s: %d of %d layers (%d tensors skipped)", names[kind], header.path,
                spec.built_layers, layers_in_file, len(skipped))
    return model, spec


# ---------------------------------------------------------------- prompts → embeddings


def mistral_messages(prompts: Sequence[str], system_message: str = MISTRAL_SYSTEM_MESSAGE) -> list[list[dict]]:
    """BFL's conversation format for the Mistral encoder ([IMG] removed: the processor would count it as an image)."""
    return [[{"role": "system", "content": [{"type": "text", "text": system_message}]},
             {"role": "user", "content": [{"type": "text", "text": p.replace("[IMG]", "")}]}] for p in prompts]


def tokenize(tokenizer, kind: str, prompts: Sequence[str], max_length: int = MAX_LENGTH) -> tuple[Tensor, Tensor]:
    """(input_ids, attention_mask) [B, max_length] exactly as the diffusers / BFL pipelines build them."""
    if kind == "mistral3":
        out = tokenizer.apply_chat_template(mistral_messages(prompts), add_generation_prompt=False, tokenize=True,
                                            return_dict=True, return_tensors="pt", padding="max_length",
                                            truncation=True, max_length=max_length)
        return out["input_ids"], out["attention_mask"]
    ids, masks = [], []
    for prompt in prompts:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True, enable_thinking=False)
        out = tokenizer(text, return_tensors="pt", padding="max_length", truncation=True, max_length=max_length)
        ids.append(out["input_ids"])
        masks.append(out["attention_mask"])
    return torch.cat(ids), torch.cat(masks)


def encode(model: nn.Module, spec: TextEncoderSpec, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Stacked hidden states [B, L, len(layers)·hidden] (the FLUX.2 prompt embedding), without autograd."""
    device = next(model.parameters()).device
    with torch.no_grad():
        out = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                    output_hidden_states=True, use_cache=False)
    stacked = torch.stack([out.hidden_states[k] for k in spec.layers], dim=2)  # [B, L, n, D]
    return stacked.reshape(stacked.shape[0], stacked.shape[1], -1)
