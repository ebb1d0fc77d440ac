"""`--config_file` keys that are not training flags but that the GUI front-ends of sd-scripts write, and the
accelerate spellings they use for flag values (`reference/gui-clients/`).

sd-scripts reads a `--config_file` into its argparse namespace: a key that is no flag is set on the namespace and
never read, and `choices` are not checked. A GUI therefore writes its own bookkeeping next to the flags. The keys
below are accepted silently because they change nothing in sd-scripts' training either; any other unknown key is
a warning with a did-you-mean (an error under `--strict`), never a silent no-op.
"""

from __future__ import annotations

from typing import NamedTuple


class GuiKey(NamedTuple):
    """A key a GUI writes into the config file that means nothing to training."""

    writers: str  # which GUI writes it
    why: str  # why ignoring it changes nothing


GUI_KEYS: dict[str, GuiKey] = {
    "epoch": GuiKey(
        "kohya_ss GUI (every run)",
        "the GUI's own 'Epoch' field; it also passes the real count as max_train_epochs / max_train_steps, and "
        "sd-scripts never reads `epoch`"),
    "noise_offset_type": GuiKey(
        "kohya_ss GUI (every run)",
        "selects which noise-offset fields the GUI form shows ('Original' / 'Multires'); the values themselves are "
        "separate keys (noise_offset, multires_noise_*), which sd-scripts ignores for FLUX anyway"),
    "mem_eff_save": GuiKey(
        "kohya_ss GUI (FLUX tab, when ticked)",
        "a flag of sd-scripts' full fine-tuning script (flux_train.py); flux_train_network.py has no such flag and "
        "LoRA files are small"),
}

# Keys that are no flag of flux_train_network.py but whose meaning has a home elsewhere: warned with this hint.
MOVED_KEYS: dict[str, str] = {
    "loraplus_lr_ratio": 'network_args = ["loraplus_lr_ratio=..."]',
    "loraplus_unet_lr_ratio": 'network_args = ["loraplus_unet_lr_ratio=..."]',
    "loraplus_text_encoder_lr_ratio": 'network_args = ["loraplus_text_encoder_lr_ratio=..."]',
}

# Values accelerate (and so the GUIs that write its settings) gives a flag that the flag's choices lack:
# `dynamo_backend = "no"` is accelerate's "no compilation" (kohya_ss writes it every run). sd-scripts compiles only with
# --torch_compile and then hands this value to accelerate, so "no" means no compilation either way.
ACCELERATE_VALUES: dict[str, tuple[str, ...]] = {"dynamo_backend": ("no",)}


def accelerate_value(dest: str, value: object) -> tuple[bool, object]:
    """(True, value) when `value` is accelerate's spelling of a value of flag `dest` that is no choice of the flag;
    else (False, value), lower-cased for those flags (accelerate writes backend names upper-case)."""
    if dest not in ACCELERATE_VALUES or not isinstance(value, str):
        return False, value
    key = value.strip().lower()
    return key in ACCELERATE_VALUES[dest], key
