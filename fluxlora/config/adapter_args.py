"""Which adapter to train: LyCORIS' `--network_args` (`--network_module lycoris.kohya`) and `dora_wd` for
`networks.lora_flux`, parsed into one frozen `AdapterSpec`.

LyCORIS reads these lazily with `kwargs.get`, treats every string but "false" as true and ignores unknown keys;
here each key is typed and checked once, and a combination LyCORIS would silently ignore or crash on is a
`ConfigError` naming the key. Keys that only matter for Conv layers (FLUX has none) are accepted with a warning.
"""

from __future__ import annotations

import logging
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from fluxlora.errors import ConfigError

logger = logging.getLogger(__name__)

FLAG = "--network_args"
LYCORIS_MODULE = "lycoris.kohya"
ALGORITHMS = ("lora", "locon", "lokr", "loha", "full")
_OTHER_LYCORIS_ALGOS = ("ia3", "dylora", "glora", "diag-oft", "boft", "tlora")

#: LyCORIS keys with a meaning for Linear layers (besides the shared dropout / LoRA+ / train_t5xxl / verbose keys).
LYCORIS_BOOL_KEYS = ("decompose_both", "full_matrix", "unbalanced_factorization", "use_scalar", "rs_lora", "dora_wd",
                     "wd_on_output", "rank_dropout_scale", "bypass_mode", "train_norm")
#: Keys that only shape Conv layers (Tucker/CP decomposition): accepted, no effect on FLUX (conv_dim/conv_alpha are
#: shared with networks.lora_flux and warned about there).
CONV_ONLY_KEYS = ("use_tucker", "use_cp", "use_conv_cp", "disable_conv_cp")
LYCORIS_KEYS = ("algo", "factor", "preset", *LYCORIS_BOOL_KEYS, *CONV_ONLY_KEYS)
#: What `networks.lora_flux` accepts beyond sd-scripts' keys.
LORA_FLUX_KEYS = ("dora_wd", "wd_on_output")


@dataclass(frozen=True)
class Preset:
    """LyCORIS' target preset: class names whose Linear descendants are adapted, module names (regex, or fnmatch
    patterns with `use_fnmatch`) adapted themselves, and names left out."""

    name: str = "full"
    unet_target_module: tuple[str, ...] = ("DoubleStreamBlock", "SingleStreamBlock")
    unet_target_name: tuple[str, ...] = ()
    text_encoder_target_module: tuple[str, ...] = ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP")
    text_encoder_target_name: tuple[str, ...] = ()
    exclude_name: tuple[str, ...] = ()
    use_fnmatch: bool = False


_BLOCKS = ("DoubleStreamBlock", "SingleStreamBlock")
_CLIP_ALL = ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP")
#: LyCORIS' built-in presets, restricted to the class names FLUX.1, CLIP-L and T5 contain (the others never match).
BUILTIN_PRESETS: dict[str, Preset] = {
    "full": Preset("full"),
    "full-lin": Preset("full-lin"),
    "attn-mlp": Preset("attn-mlp"),
    "attn-only": Preset("attn-only", ("CrossAttention", "SelfAttention"), (), ("CLIPAttention", "CLIPSdpaAttention")),
    "unet-only": Preset("unet-only", _BLOCKS, (), ()),
    "unet-transformer-only": Preset("unet-transformer-only", _BLOCKS, (), ()),
}
_PRESET_KEYS = ("enable_conv", "unet_target_module", "unet_target_name", "text_encoder_target_module",
                "text_encoder_target_name", "exclude_name", "use_fnmatch", "module_algo_map", "name_algo_map",
                "target_module", "target_name", "lora_prefix")


@dataclass(frozen=True)
class AdapterSpec:
    """The adapter algorithm and its shape options (LyCORIS names). `lycoris` says which module was named."""

    algo: str = "lora"
    lycoris: bool = False
    factor: int = -1
    decompose_both: bool = False
    full_matrix: bool = False
    unbalanced_factorization: bool = False
    use_scalar: bool = False
    rs_lora: bool = False
    dora_wd: bool = False
    wd_on_output: bool = True
    rank_dropout_scale: bool = False
    preset: Preset = field(default_factory=Preset)

    @property
    def plain_lora(self) -> bool:
        """A kohya LoRAModule (split_qkv, GGPO, sd-scripts dropouts) rather than a LyCORIS-style adapter."""
        return self.algo in ("lora", "locon") and not self.dora_wd


def read_preset(value: str) -> Preset:
    """A built-in preset name, or a LyCORIS preset TOML file (module_algo_map / name_algo_map are not supported)."""
    if value in BUILTIN_PRESETS:
        return BUILTIN_PRESETS[value]
    if value in ("unet-convblock-only", "ia3"):
        raise ConfigError(f"{FLAG} preset={value}: selects no FLUX layer (FLUX has no conv blocks; ia3 is not a "
                          f"supported algo); use one of {', '.join(BUILTIN_PRESETS)} or a preset .toml", key="preset")
    path = Path(value)
    if not path.is_file():
        raise ConfigError(f"{FLAG} preset={value}: neither a built-in preset ({', '.join(BUILTIN_PRESETS)}) nor an "
                          "existing .toml file", key="preset", path=path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"{FLAG} preset={value}: cannot read the TOML ({err})", key="preset", path=path) from None
    unknown = sorted(set(data) - set(_PRESET_KEYS))
    if unknown:
        raise ConfigError(f"{FLAG} preset={value}: unknown key(s) {unknown}; valid: {', '.join(_PRESET_KEYS)}",
                          key="preset", path=path)
    unsupported = [k for k in ("module_algo_map", "name_algo_map", "target_module", "target_name", "lora_prefix")
                   if data.get(k)]
    if unsupported:
        raise ConfigError(f"{FLAG} preset={value}: {', '.join(unsupported)} is not supported by fluxlora (one "
                          "algorithm per network); remove it", key="preset", path=path)

    def names(key: str) -> tuple[str, ...]:
        raw = data.get(key) or []
        if not isinstance(raw, list) or not all(isinstance(v, str) for v in raw):
            raise ConfigError(f"{FLAG} preset={value}: {key} must be a list of strings", key="preset", path=path)
        return tuple(raw)

    return Preset(path.name, names("unet_target_module"), names("unet_target_name"),
                  names("text_encoder_target_module"), names("text_encoder_target_name"), names("exclude_name"),
                  bool(data.get("use_fnmatch", False)))


def parse_adapter_spec(values: Mapping[str, str], *, lycoris: bool, parse_bool, parse_int) -> AdapterSpec:
    """Build the spec from the raw `key=value` strings of the adapter keys (shared parsers passed in)."""
    algo = values.get("algo", "lora").strip().lower()
    if algo not in ALGORITHMS:
        what = "is a LyCORIS algorithm fluxlora does not train" if algo in _OTHER_LYCORIS_ALGOS else "is unknown"
        raise ConfigError(f"{FLAG} algo={values.get('algo')!r} {what}; use one of {', '.join(ALGORITHMS)}", key="algo")
    flags = {k: parse_bool(k, values[k]) for k in LYCORIS_BOOL_KEYS if k in values}
    factor = -1
    if "factor" in values:
        text = values["factor"].strip()
        factor = -1 if text == "-1" else parse_int("factor", text, minimum=1)
    if flags.get("train_norm"):
        raise ConfigError(f"{FLAG} train_norm=True: FLUX has no norm weight LyCORIS or ComfyUI can address (its "
                          "LayerNorms have no weights; the QK-norm scales are named .scale, which no loader maps); "
                          "remove it", key="train_norm")
    for key in CONV_ONLY_KEYS:
        if key in values:
            logger.warning("%s %s has no effect: FLUX, CLIP-L and T5 have no Conv layers", FLAG, key)
    if flags.get("bypass_mode"):
        logger.info("%s bypass_mode: fluxlora always runs the adapter beside the (possibly fp8) base layer", FLAG)
    return AdapterSpec(
        algo="lora" if algo == "locon" else algo, lycoris=lycoris, factor=factor,
        decompose_both=flags.get("decompose_both", False), full_matrix=flags.get("full_matrix", False),
        unbalanced_factorization=flags.get("unbalanced_factorization", False),
        use_scalar=flags.get("use_scalar", False), rs_lora=flags.get("rs_lora", False),
        dora_wd=flags.get("dora_wd", False), wd_on_output=flags.get("wd_on_output", True),
        rank_dropout_scale=flags.get("rank_dropout_scale", False),
        preset=read_preset(values["preset"].strip()) if "preset" in values else Preset())


def check_combination(spec: AdapterSpec, *, dropout: float | None, split_qkv: bool, ggpo: bool,
                      loraplus: bool) -> None:
    """Settings that have no meaning for the chosen adapter are errors (LyCORIS ignores most of them silently)."""
    what = f"algo={spec.algo}" + (" with dora_wd=True" if spec.dora_wd else "")
    if spec.algo == "full" and spec.dora_wd:
        raise ConfigError(f"{FLAG} dora_wd=True: algo=full trains the whole weight and has no DoRA form; use "
                          "algo=lora, lokr or loha with dora_wd", key="dora_wd")
    if spec.use_scalar and spec.algo not in ("lokr", "loha"):
        raise ConfigError(f"{FLAG} use_scalar=True is implemented for algo=lokr and loha, not {spec.algo}",
                          key="use_scalar")
    if spec.plain_lora:
        if spec.rank_dropout_scale:
            raise ConfigError(f"{FLAG} rank_dropout_scale: plain LoRA already rescales its rank dropout "
                              "(sd-scripts' rule); remove it", key="rank_dropout_scale")
        return
    if dropout:
        raise ConfigError(f"{FLAG} dropout / --network_dropout {dropout}: neuron dropout is not defined for {what} "
                          "(LyCORIS ignores it); use rank_dropout or module_dropout", key="dropout")
    if split_qkv:
        raise ConfigError(f"{FLAG} split_qkv=True is a plain-LoRA option; it has no meaning for {what}", key="split_qkv")
    if ggpo:
        raise ConfigError(f"{FLAG} ggpo_sigma/ggpo_beta (LoRA-GGPO) are defined for plain LoRA, not {what}",
                          key="ggpo_sigma")
    if loraplus and spec.algo != "lora":
        raise ConfigError(f"{FLAG} loraplus_lr_ratio / loraplus_unet_lr_ratio / loraplus_text_encoder_lr_ratio: LoRA+ "
                          f"raises the learning rate of lora_up weights, which {what} does not have", key="loraplus_lr_ratio")


def warn_about_loaders(spec: AdapterSpec) -> None:
    """Once per network built: what a loader does differently with this file."""
    if spec.dora_wd and spec.wd_on_output:
        logger.warning("%s dora_wd with wd_on_output=True (LyCORIS' default): ComfyUI normalises output-axis DoRA by "
                       "the base weight's norm instead of the adapted one (ComfyUI PR #15458, open), so files look "
                       "slightly different there; wd_on_output=False gives files ComfyUI and A1111 apply exactly", FLAG)
