"""CLIP-L and T5-XXL text encoders: transformers models built from explicit configs, loaded from the ComfyUI /
sd-scripts file layouts through an explicit key map and a strict key-set check (spec §3.5, interop.md §5).

File layouts: CLIP-L `text_model.embeddings.*`, `text_model.encoder.layers.N.*`, `text_model.final_layer_norm.*`;
T5-XXL `shared.weight`, `encoder.block.N.layer.*`, `encoder.final_layer_norm.weight`. transformers 4.x names CLIP's
modules `text_model.*`, 5.x drops that prefix; the map is chosen by looking at the built model's own keys, so it is
right on both, and `load_state_dict(strict=True)` proves every tensor landed (sd-scripts' `strict=False` loads nothing
on transformers 5 without a word).

Decision (spec §3.5, §12.7): CLIP-L runs OpenAI's `quick_gelu`, as OpenAI, ComfyUI and diffusers do at inference.
sd-scripts' inline config resolves to exact GELU by a duplicated dict key; pass `hidden_act="gelu"` to
`clip_l_config` to reproduce its embeddings bit for bit.

fp8 files: Linear weights stay fp8 (memory) and are up-cast to the input's dtype per call; embeddings and norms are
held in the compute dtype. Encoders come back frozen in eval mode, so T5's dropout never runs (spec §12.6).
"""

from __future__ import annotations

import logging
import types
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from fluxlora.errors import CheckpointError
from fluxlora.models.checkpoints import (
    DTYPES,
    ModelKind,
    SafetensorsHeader,
    check_keys,
    load_tensors,
    module_shapes,
    read_header,
    require_kind,
)
from fluxlora.models.fp8 import FP8_DTYPES, upcast_fp8_linears
from fluxlora.models.tokenizers import (  # noqa: F401 - re-exported: one import site for text conditioning
    CLIP_MAX_LENGTH,
    FluxTokenizers,
    TokenizedPrompts,
    load_tokenizers,
)

if TYPE_CHECKING:  # transformers is imported lazily: it costs seconds, and preflight checks never need it
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

logger = logging.getLogger(__name__)

CLIP_PREFIX = "text_model."
CLIP_POSITION_IDS = "text_model.embeddings.position_ids"
# Keys some published clip_l files carry that a CLIPTextModel does not use: the position-ids buffer (older
# transformers saved it) and the text projection (exported from CLIPTextModelWithProjection).
CLIP_IGNORED_FILE_KEYS = frozenset({CLIP_POSITION_IDS, "text_projection.weight"})
T5_TIED_EMBEDDING = "encoder.embed_tokens.weight"  # the same tensor as shared.weight


# ---------------------------------------------------------------- configs and builders


def clip_l_config(**overrides) -> CLIPTextConfig:
    """openai/clip-vit-large-patch14's text tower (what FLUX uses as CLIP-L); `overrides` replace fields."""
    from transformers import CLIPTextConfig

    values = dict(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, attention_dropout=0.0,
        dropout=0.0, initializer_range=0.02, initializer_factor=1.0, projection_dim=768,
        # The hub config's legacy ids: eos_token_id=2 selects pooling at argmax(input_ids), i.e. the first 49407.
        pad_token_id=1, bos_token_id=0, eos_token_id=2,
    )
    values.update(overrides)
    return CLIPTextConfig(**values)


def t5xxl_config(**overrides) -> T5Config:
    """google/t5-v1_1-xxl's encoder; `overrides` replace fields."""
    from transformers import T5Config

    values = dict(
        vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_decoder_layers=24, num_heads=64,
        relative_attention_num_buckets=32, relative_attention_max_distance=128, dropout_rate=0.1,
        layer_norm_epsilon=1e-6, initializer_factor=1.0, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
        use_cache=False, tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )
    values.update(overrides)
    return T5Config(**values)


def tiny_clip_l_config(**overrides) -> CLIPTextConfig:
    """A 2-layer, width-32 CLIP-L with the real vocabulary and 77 positions (head dim 8, see `_clip_heads`)."""
    return clip_l_config(**{**dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   projection_dim=32), **overrides})


def tiny_t5xxl_config(**overrides) -> T5Config:
    """A 2-layer, width-32 T5 encoder with the real vocabulary and relative-position buckets."""
    return t5xxl_config(**{**dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4),
                           **overrides})


def build_clip_l(config: CLIPTextConfig | None = None) -> CLIPTextModel:
    """A randomly initialised CLIPTextModel (build under `torch.device('meta')` to skip the allocation)."""
    from transformers import CLIPTextModel

    return CLIPTextModel(config if config is not None else clip_l_config())


def build_t5xxl(config: T5Config | None = None) -> T5EncoderModel:
    """A randomly initialised T5EncoderModel (build under `torch.device('meta')` to skip the allocation)."""
    from transformers import T5EncoderModel

    return T5EncoderModel(config if config is not None else t5xxl_config())


# ---------------------------------------------------------------- key maps (model <-> file)


def _clip_has_prefix(model_keys) -> bool:
    """transformers 4.x names CLIPTextModel's modules `text_model.*`; 5.x does not."""
    return any(k.startswith(CLIP_PREFIX) for k in model_keys)


def clip_l_key_map(model_keys) -> dict[str, str]:
    """File key -> model key for every model parameter, for either transformers naming."""
    keys = [k for k in model_keys if not k.endswith("embeddings.position_ids")]
    if _clip_has_prefix(keys):
        return {k: k for k in keys}
    return {CLIP_PREFIX + k: k for k in keys}


def t5xxl_key_map(model_keys) -> dict[str, str]:
    """File key -> model key; the tied `encoder.embed_tokens.weight` is not in the file (it is `shared.weight`)."""
    return {k: k for k in model_keys if k != T5_TIED_EMBEDDING}


def clip_l_file_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """A CLIPTextModel's weights under the ComfyUI / sd-scripts `clip_l.safetensors` key names."""
    state = model.state_dict()
    return {file_key: state[model_key].contiguous() for file_key, model_key in clip_l_key_map(state).items()}


def t5xxl_file_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """A T5EncoderModel's weights under the ComfyUI / sd-scripts `t5xxl_*.safetensors` key names."""
    state = model.state_dict()
    return {file_key: state[model_key].contiguous() for file_key, model_key in t5xxl_key_map(state).items()}


def clip_l_lora_module_names(model: nn.Module) -> dict[str, nn.Linear]:
    """Every Linear under its sd-scripts dotted name (`text_model.encoder.layers.0.self_attn.q_proj`).

    The `text_model.` segment is present whatever the transformers version, so LoRA names come out as
    `lora_te1_text_model_encoder_layers_*`, the names ComfyUI and diffusers map.
    """
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            out[name if name.startswith(CLIP_PREFIX) else CLIP_PREFIX + name] = module
    return out


def t5xxl_lora_module_names(model: nn.Module) -> dict[str, nn.Linear]:
    """Every Linear under its sd-scripts dotted name (`encoder.block.0.layer.0.SelfAttention.q`)."""
    return {name: module for name, module in model.named_modules() if isinstance(module, nn.Linear)}


# ---------------------------------------------------------------- configs from file shapes


def _count_indexed(shapes: Mapping[str, tuple[int, ...]], prefix: str) -> int:
    indices = {int(k[len(prefix):].split(".")[0]) for k in shapes if k.startswith(prefix)}
    if indices != set(range(len(indices))):
        raise ValueError(f"{prefix}N indices {sorted(indices)} are not 0..n-1")
    return len(indices)


def _clip_heads(hidden: int) -> int:
    # Head count is not in the weights: CLIP-L uses head dim 64; tiny widths (not multiples of 64) use head dim 8.
    head_dim = 64 if hidden % 64 == 0 else 8
    if hidden % head_dim:
        raise ValueError(f"width {hidden} is not a multiple of 8")
    return hidden // head_dim


def clip_l_config_from_shapes(shapes: Mapping[str, tuple[int, ...]], **overrides) -> CLIPTextConfig:
    """The CLIP-L config a file's shapes describe (real and tiny files load through the same code)."""
    vocab, hidden = shapes["text_model.embeddings.token_embedding.weight"]
    positions = shapes["text_model.embeddings.position_embedding.weight"][0]
    return clip_l_config(**{**dict(
        vocab_size=vocab, hidden_size=hidden, max_position_embeddings=positions,
        num_hidden_layers=_count_indexed(shapes, "text_model.encoder.layers."),
        intermediate_size=shapes["text_model.encoder.layers.0.mlp.fc1.weight"][0],
        num_attention_heads=_clip_heads(hidden), projection_dim=hidden,
    ), **overrides})


def t5xxl_config_from_shapes(shapes: Mapping[str, tuple[int, ...]], **overrides) -> T5Config:
    """The T5 config a file's shapes describe; heads come from the relative-attention-bias table."""
    vocab, d_model = shapes["shared.weight"]
    buckets, heads = shapes["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    inner = shapes["encoder.block.0.layer.0.SelfAttention.q.weight"][0]
    if inner % heads:
        raise ValueError(f"attention width {inner} is not a multiple of {heads} heads")
    layers = _count_indexed(shapes, "encoder.block.")
    return t5xxl_config(**{**dict(
        vocab_size=vocab, d_model=d_model, num_heads=heads, d_kv=inner // heads, relative_attention_num_buckets=buckets,
        d_ff=shapes["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"][0], num_layers=layers,
        num_decoder_layers=layers,
    ), **overrides})


# ---------------------------------------------------------------- fp8 support


def _gated_ff_forward(self, hidden_states: Tensor) -> Tensor:
    # transformers casts the activations to wo's dtype before wo (fp8 here); keep them in the compute dtype.
    hidden = self.act(self.wi_0(hidden_states)) * self.wi_1(hidden_states)
    return self.wo(self.dropout(hidden))


def _enable_fp8_linears(model: nn.Module) -> int:
    """Up-cast every fp8 Linear weight per call (`models.fp8`, as for the DiT) and fix T5's gated FFN cast."""
    for module in model.modules():
        wo = getattr(module, "wo", None)
        if hasattr(module, "wi_0") and isinstance(wo, nn.Linear) and wo.weight.dtype in FP8_DTYPES:
            module.forward = types.MethodType(_gated_ff_forward, module)
    return upcast_fp8_linears(model)


# ---------------------------------------------------------------- loading


def _compute_dtype(header: SafetensorsHeader, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype for non-fp8 tensors: `dtype`, else the file's dominant float dtype; fp8 means bfloat16 compute."""
    if dtype is None:
        counts = {k: v for k, v in header.dtype_counts().items() if DTYPES[k].is_floating_point}
        dtype = DTYPES[max(counts, key=counts.__getitem__)] if counts else torch.float32
    return torch.bfloat16 if dtype in FP8_DTYPES else dtype


def _load_encoder(
    path: str | Path,
    *,
    kind: ModelKind,
    flag: str,
    what: str,
    dtype: torch.dtype | None,
    device: str | torch.device,
    config_from_shapes: Callable,
    build: Callable,
    key_map: Callable,
    ignored_file_keys: frozenset[str] = frozenset(),
) -> tuple[nn.Module, dict[str, Tensor], SafetensorsHeader]:
    header = read_header(path, flag=flag)
    require_kind(header, kind, flag=flag)
    if "scaled_fp8" in header.tensors:
        raise CheckpointError(
            f"{flag} {header.path}: 'scaled fp8' files (with scale_weight tensors) are not supported; "
            "use the fp16 or plain fp8_e4m3fn file", path=header.path, key=flag)
    try:
        config = config_from_shapes(header.shapes)
    except (KeyError, ValueError, IndexError) as err:
        raise CheckpointError(f"{flag} {header.path}: cannot derive {what} from its keys ({type(err).__name__}: "
                              f"{err}); is this the right file for {flag}?", path=header.path, key=flag) from None
    with torch.device("meta"):
        model = build(config)
    model_shapes = module_shapes(model)
    rename = key_map(model_shapes)
    file_shapes = {k: s for k, s in header.shapes.items() if k not in ignored_file_keys}
    check_keys(file_shapes, {f: model_shapes[m] for f, m in rename.items()}, path=header.path, what=what, flag=flag)

    compute = _compute_dtype(header, dtype)
    store_fp8 = dtype if dtype in FP8_DTYPES else None
    linear_weights = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    fp32_modules = getattr(model, "_keep_in_fp32_modules", None) or []
    state: dict[str, Tensor] = {}
    for file_key, tensor in load_tensors(header, device=device).items():
        if file_key not in rename:
            continue  # an ignored extra (checked above)
        model_key = rename[file_key]
        if model_key in linear_weights and (store_fp8 or tensor.dtype in FP8_DTYPES):
            tensor = tensor.to(store_fp8 or tensor.dtype)  # fp8 storage, up-cast per call
        elif compute == torch.float16 and any(f".{m}." in f".{model_key}" for m in fp32_modules):
            tensor = tensor.float()  # T5's wo overflows in fp16 (transformers keeps it in fp32 too)
        else:
            tensor = tensor.to(compute)
        state[model_key] = tensor
    return model, state, header


def _finish(model: nn.Module, state: dict[str, Tensor], header: SafetensorsHeader, flag: str) -> nn.Module:
    model.load_state_dict(state, strict=True, assign=True)
    fp8 = _enable_fp8_linears(model)
    model.requires_grad_(False).eval()
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:  # a bug, not bad input: every tensor must have been loaded or rebuilt
        raise CheckpointError(f"{flag} {header.path}: {len(left)} tensor(s) were not loaded, first {left[0]!r}",
                              path=header.path, key=flag)
    logger.info("loaded %s (%d fp8 Linear layers)", header.path, fp8)
    return model


def load_clip_l(
    path: str | Path, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu", flag: str = "--clip_l",
    **config_overrides,
) -> CLIPTextModel:
    """Load a ComfyUI / sd-scripts `clip_l.safetensors` into a frozen CLIPTextModel (config from the file's shapes).

    `config_overrides` go to the config (e.g. `hidden_act="gelu"` for sd-scripts' exact-GELU embeddings).
    """
    model, state, header = _load_encoder(
        path, kind=ModelKind.CLIP_L, flag=flag, what="CLIP-L (ComfyUI clip_l layout)", dtype=dtype, device=device,
        config_from_shapes=lambda shapes: clip_l_config_from_shapes(shapes, **config_overrides), build=build_clip_l,
        key_map=clip_l_key_map, ignored_file_keys=CLIP_IGNORED_FILE_KEYS)
    # position_ids is a non-persistent buffer: not in any file, rebuilt here (it is still on the meta device).
    for name, buffer in list(model.named_buffers()):
        if name.endswith("embeddings.position_ids") and buffer.is_meta:
            owner = model.get_submodule(name.rsplit(".", 1)[0])
            owner.register_buffer("position_ids", torch.arange(buffer.shape[-1], device=device).expand(1, -1),
                                  persistent=False)
    return _finish(model, state, header, flag)


def _t5_key_map_with_file(header_keys: set[str]) -> Callable:
    def key_map(model_keys):
        rename = t5xxl_key_map(model_keys)
        if "shared.weight" not in header_keys and T5_TIED_EMBEDDING in header_keys:
            del rename["shared.weight"]
            rename[T5_TIED_EMBEDDING] = "shared.weight"
        return rename
    return key_map


def load_t5xxl(
    path: str | Path, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu", flag: str = "--t5xxl",
) -> T5EncoderModel:
    """Load a ComfyUI / sd-scripts `t5xxl_*.safetensors` (fp16, bf16, fp32 or fp8) into a frozen T5EncoderModel.

    `dtype` None keeps the file's dtype (fp8 files compute in bfloat16); an fp8 `dtype` stores Linear weights in fp8.
    """
    header_keys = set(read_header(path, flag=flag).tensors)
    ignored = frozenset({T5_TIED_EMBEDDING}) if {"shared.weight", T5_TIED_EMBEDDING} <= header_keys else frozenset()

    def config_from_shapes(shapes):
        if "shared.weight" not in shapes and T5_TIED_EMBEDDING in shapes:
            shapes = {**shapes, "shared.weight": shapes[T5_TIED_EMBEDDING]}
        return t5xxl_config_from_shapes(shapes)

    model, state, header = _load_encoder(
        path, kind=ModelKind.T5XXL, flag=flag, what="T5-XXL (ComfyUI t5xxl layout)", dtype=dtype, device=device,
        config_from_shapes=config_from_shapes, build=build_t5xxl, key_map=_t5_key_map_with_file(header_keys),
        ignored_file_keys=ignored)
    if T5_TIED_EMBEDDING in module_shapes(model):  # transformers 5 lists the tied copy as its own key
        state[T5_TIED_EMBEDDING] = state["shared.weight"]
    model = _finish(model, state, header, flag)
    if model.encoder.embed_tokens.weight is not model.shared.weight:
        model.encoder.embed_tokens.weight = model.shared.weight  # re-tie: assign=True made two Parameters
    return model


# ---------------------------------------------------------------- encoding


def encode_prompts(
    clip: nn.Module,
    t5: nn.Module,
    tokens: TokenizedPrompts,
    *,
    apply_t5_attn_mask: bool,
    clip_grad: bool = False,
    t5_grad: bool = False,
) -> dict[str, Tensor]:
    """Text conditioning for FLUX: clip_pooled [B,768] float32, t5_out [B,L,4096], t5_mask [B,L] bool.

    clip_pooled is the final-LN hidden state at the first EOS (pooler_output, no projection). T5 sees the attention
    mask only when `apply_t5_attn_mask` (sd-scripts); t5_mask is returned either way for the DiT to use or not.
    Runs without autograd unless `clip_grad` / `t5_grad` (LoRA training on that encoder).
    """
    clip_device = next(clip.parameters()).device
    t5_device = next(t5.parameters()).device
    with torch.set_grad_enabled(clip_grad):
        pooled = clip(input_ids=tokens.clip_ids.to(clip_device)).pooler_output.float()
    with torch.set_grad_enabled(t5_grad):
        mask = tokens.t5_mask.to(t5_device)
        t5_out = t5(input_ids=tokens.t5_ids.to(t5_device),
                    attention_mask=mask if apply_t5_attn_mask else None).last_hidden_state
    return {"clip_pooled": pooled, "t5_out": t5_out, "t5_mask": tokens.t5_mask.to(torch.bool)}
