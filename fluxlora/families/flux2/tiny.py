"""Tiny FLUX.2 checkpoints in the real file layouts, for tests and the demo (`fluxlora make-tiny --family flux2`).

Per variant: the transformer (BFL keys), its text encoder (ComfyUI `model.*` keys, with as many layers as the real one
stacks plus one, so truncation is exercised: Mistral 31, Qwen3 28), the AE (BFL keys with quant convs and batch-norm
statistics) and a tokenizer folder (a byte-level BPE trained by `tokenizers` on a few sentences, with the special
tokens and a chat template of the real one). They load through exactly the code that loads the real files.
Widths: transformer 64 (2 heads of 32), 2 double + 2 single blocks; text encoders 32 wide (klein-9b's 48, so the two
klein sizes differ as the real ones do); AE ch 32.
"""

from __future__ import annotations

import argparse
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fluxlora.families.flux2.autoencoder import Flux2AutoEncoder, flux2_ae_params
from fluxlora.families.flux2.model import Flux2
from fluxlora.families.flux2.params import MODEL_VERSIONS, Flux2Params, axes_dim_for
from fluxlora.families.flux2.text_encoders import SPECS, file_state_dict, tiny_config
from fluxlora.files import save_safetensors

logger = logging.getLogger(__name__)

# BFL's file names; the klein base files carry "base", which is how a header-identical base file is told apart.
FILE_NAMES = {"dev": "flux2-dev.safetensors", "klein-4b": "flux-2-klein-4b.safetensors",
              "klein-9b": "flux-2-klein-9b.safetensors", "klein-base-4b": "flux-2-klein-base-4b.safetensors",
              "klein-base-9b": "flux-2-klein-base-9b.safetensors"}
TE_NAMES = {"mistral3": "mistral_3_small_flux2.safetensors", "qwen3-4b": "qwen_3_4b.safetensors",
            "qwen3-8b": "qwen_3_8b.safetensors"}
_SPECIALS = {
    "qwen3": ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"],
    "mistral3": ["<pad>", "<s>", "</s>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"],
}
# The shape of Qwen3's template (generation prompt with thinking off) and of Mistral's system/instruction tags.
_TEMPLATES = {
    "qwen3": ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and "
              "enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"),
    "mistral3": ("<s>{% for m in messages %}{% if m['role'] == 'system' %}[SYSTEM_PROMPT]{{ m['content'][0]['text'] }}"
                 "[/SYSTEM_PROMPT]{% else %}[INST]{{ m['content'][0]['text'] }}[/INST]{% endif %}{% endfor %}"),
}
_CORPUS = ["a photo of a cat holding a sign that says hello world", "a red fox resting in fresh snow",
           "You are an AI that reasons about image descriptions.", "user assistant system"]
_STREAMS = {"transformer": 0, "text_encoder": 1, "ae": 2}


@dataclass(frozen=True)
class TinyFlux2Paths:
    transformer: Path
    text_encoder: Path
    ae: Path
    tokenizer: Path
    model_version: str


def _te_flavour(model_version: str) -> tuple[str, str, int]:
    """(encoder kind, file flavour, width) of a version's tiny text encoder."""
    if model_version == "dev":
        return "mistral3", "mistral3", 32
    return ("qwen3", "qwen3-8b", 48) if model_version.endswith("9b") else ("qwen3", "qwen3-4b", 32)


def tiny_flux2_params(model_version: str) -> Flux2Params:
    """The tiny transformer of a version: context width = 3 stacked layers × its tiny text encoder's width."""
    _, _, width = _te_flavour(model_version)
    return Flux2Params(in_channels=128, context_in_dim=3 * width, hidden_size=64, num_heads=2, depth=2,
                       depth_single_blocks=2, axes_dim=axes_dim_for(32), guidance_embed=(model_version == "dev"))


@torch.no_grad()
def init_weights_(module: nn.Module, generator: torch.Generator) -> nn.Module:
    """Deterministic O(1)-activation init: matrices N(0, 1/fan_in), vectors 1 + N(0, 0.1²) (norm scales)."""
    for _, param in sorted(module.named_parameters(), key=lambda item: item[0]):
        if param.ndim >= 2:
            param.normal_(0.0, 1.0 / math.sqrt(param[0].numel()), generator=generator)
        elif param.is_floating_point():
            param.normal_(1.0, 0.1, generator=generator)
    return module


def tiny_tokenizer(kind: str, folder: Path | None = None):
    """A byte-level BPE tokenizer with `kind`'s special tokens and chat template (saved to `folder` if given)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=_SPECIALS[kind], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS * 5, trainer)
    out = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=_SPECIALS[kind][0], chat_template=_TEMPLATES[kind],
                                  padding_side="right")
    if folder is not None:
        out.save_pretrained(folder)
    return out


def _generator(seed: int, stream: str) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 100 + 50 + _STREAMS[stream])


def tiny_text_encoder(model_version: str, seed: int = 0) -> tuple[nn.Module, str]:
    """A tiny causal LM of the version's kind with one layer more than the deepest stacked one (and its kind)."""
    from transformers import MistralForCausalLM, Qwen3ForCausalLM

    kind, flavour, width = _te_flavour(model_version)
    config = tiny_config(kind, hidden_size=width, num_hidden_layers=SPECS[kind].built_layers + 1,
                         tie_word_embeddings=(flavour == "qwen3-4b"))
    model = (MistralForCausalLM if kind == "mistral3" else Qwen3ForCausalLM)(config)
    return init_weights_(model, _generator(seed, "text_encoder")).eval(), kind


def write_tiny_flux2(outdir: Path, model_version: str = "klein-base-4b", seed: int = 0) -> TinyFlux2Paths:
    """Write one version's tiny transformer, text encoder, AE and tokenizer into `outdir` (deterministic from seed)."""
    if model_version not in MODEL_VERSIONS:
        raise ValueError(f"unknown FLUX.2 version {model_version!r}; one of {', '.join(MODEL_VERSIONS)}")
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    meta = {"fluxlora.tiny": f"seed={seed}", "fluxlora.model_version": model_version}
    with torch.device("meta"):
        dit = Flux2(tiny_flux2_params(model_version))
    dit = init_weights_(dit.to_empty(device="cpu"), _generator(seed, "transformer"))
    transformer = outdir / FILE_NAMES[model_version]
    save_safetensors(transformer, dit.state_dict(), meta)

    lm, kind = tiny_text_encoder(model_version, seed)
    _, flavour, _ = _te_flavour(model_version)
    text_encoder = outdir / TE_NAMES[flavour]
    lm_head = None if lm.config.tie_word_embeddings else lm.lm_head.weight.detach()
    save_safetensors(text_encoder, file_state_dict(lm.model, lm_head=lm_head), meta)

    ae_model = init_weights_(Flux2AutoEncoder(flux2_ae_params(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1)),
                             _generator(seed, "ae"))
    g = _generator(seed, "ae")
    ae_model.bn.running_mean.normal_(0.0, 0.3, generator=g)
    ae_model.bn.running_var.uniform_(0.5, 2.0, generator=g)
    ae = outdir / "flux2-ae.safetensors"
    save_safetensors(ae, ae_model.state_dict(), meta)

    tokenizer = outdir / f"tokenizer-{kind}"
    tiny_tokenizer(kind, tokenizer)
    logger.info("wrote tiny FLUX.2 %s checkpoints (seed %d) to %s", model_version, seed, outdir)
    return TinyFlux2Paths(transformer, text_encoder, ae, tokenizer, model_version)


def main(argv: list[str]) -> int:
    """`fluxlora make-tiny --family flux2 OUTDIR [--model_version V] [--seed N]`."""
    parser = argparse.ArgumentParser(prog="fluxlora make-tiny --family flux2", description=__doc__.splitlines()[0])
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--model_version", choices=[*MODEL_VERSIONS, "all"], default="all")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    versions = list(MODEL_VERSIONS) if args.model_version == "all" else [args.model_version]
    for version in versions:
        paths = write_tiny_flux2(args.outdir, version, args.seed)
        print(f"{version}: {paths.transformer} {paths.text_encoder} {paths.ae} {paths.tokenizer}")
    return 0


def small_flux2_params(*, guidance: bool, in_channels: int = 16, context: int = 24) -> Flux2Params:
    """A small transformer for model tests: width 64, 2 heads of 32 (RoPE axes 4 × 8), 2 + 2 blocks."""
    return Flux2Params(in_channels=in_channels, context_in_dim=context, hidden_size=64, num_heads=2, depth=2,
                       depth_single_blocks=2, axes_dim=axes_dim_for(32), guidance_embed=guidance)


def random_flux2(params: Flux2Params, seed: int = 0) -> Flux2:
    """A `Flux2` with `init_weights_` weights from `seed`, in eval mode (tests and benchmarks)."""
    with torch.device("meta"):
        model = Flux2(params)
    return init_weights_(model.to_empty(device="cpu"), torch.Generator().manual_seed(seed)).eval()
