"""Caption files and the per-sample caption pipeline of sd-scripts (spec §2.4), seeded and pure.

Every random draw comes from the `random.Random` passed in, so a caption is a function of (raw text, options,
rng state, epoch, step): the data loader derives the rng from (seed, epoch, batch, position) and resumes exactly.

Differences from sd-scripts, on purpose:
- `keep_tokens_separator` markers never reach the text encoder. sd-scripts only splits on them when shuffle,
  token warm-up or tag dropout is on, so the guide's own config (`keep_tokens_separator = "|||"`,
  `shuffle_caption = false`) feeds a literal `|||` to CLIP and T5. Here the parts are always joined with ", ".
- The text-encoder cache keys on `static_caption` (prefix/suffix, first line, separators applied), not the raw
  file text (spec §12.9), and `caption_is_static` refuses anything that changes per sample.
- Token warm-up's fractional `token_warmup_step` is converted without mutating the options (sd-scripts
  overwrites the subset attribute on first use).
- An empty caption file falls back to `class_tokens` with a warning instead of an assertion.
"""

from __future__ import annotations

import logging
import math
import random
import re
from pathlib import Path

from fluxlora.config.dataset_options import cache_conflicts, options_class
from fluxlora.errors import DatasetError

logger = logging.getLogger(__name__)

_WILDCARD = re.compile(r"\{([^}]+)\}")
_UTF8_BOM = b"\xef\xbb\xbf"


# The subset keys that shape a caption; names, types and defaults come from the dataset option table.
CAPTION_KEYS = (
    "caption_prefix", "caption_suffix", "caption_dropout_rate", "caption_dropout_every_n_epochs", "enable_wildcard",
    "keep_tokens", "keep_tokens_separator", "token_warmup_min", "token_warmup_step", "shuffle_caption",
    "caption_tag_dropout_rate", "caption_separator", "secondary_separator",
)
CaptionOptions = options_class("CaptionOptions", CAPTION_KEYS, module=__name__,
                               doc="The subset keys that shape a caption (names and defaults as in sd-scripts).")


def _decode_caption(path: Path, data: bytes) -> str:
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DatasetError(f"{path}: caption file is UTF-16; re-save it as UTF-8", path=path)
    if data.startswith(_UTF8_BOM):
        data = data[len(_UTF8_BOM) :]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        bad = data[err.start : err.start + 1].hex()
        raise DatasetError(
            f"{path}: caption is not UTF-8 (byte 0x{bad} at offset {err.start}); re-save the file as UTF-8",
            path=path,
        ) from err


def caption_candidates(image_path: Path, caption_extension: str) -> list[Path]:
    """Caption files tried for an image, in order: `<stem><ext>`, then the face-crop variant of spec §2.2.

    A stem with at least 5 `_`-separated parts (`name_x_y_w_h`) also tries the stem without its last 4 parts.
    Only the file name is split (sd-scripts splits the whole path, folder names included).
    """
    image_path = Path(image_path)
    ext = caption_extension if caption_extension.startswith(".") else "." + caption_extension
    candidates = [image_path.with_name(image_path.stem + ext)]
    parts = image_path.stem.split("_")
    if len(parts) >= 5:
        face = image_path.with_name("_".join(parts[:-4]) + ext)
        if face not in candidates:
            candidates.append(face)
    return candidates


def read_caption(
    image_path: Path,
    caption_extension: str,
    *,
    class_tokens: str | None,
    enable_wildcard: bool,
    warn: bool = True,
) -> str | None:
    """The caption of one image: its caption file, else `class_tokens`, else None.

    The file must be UTF-8 (a BOM is stripped); anything else raises DatasetError with the byte offset. Without
    wildcards only the first line is used (stripped); with them all non-empty lines are kept, joined by "\\n".
    An empty (or blank) file counts as missing. A missing caption logs a warning when `warn` (pass False and
    summarise in the caller for DreamBooth folders that rely on class tokens on purpose).
    """
    for candidate in caption_candidates(image_path, caption_extension):
        if not candidate.is_file():
            continue
        text = _decode_caption(candidate, candidate.read_bytes())
        lines = text.splitlines()
        if not any(line.strip() for line in lines):
            if warn:
                logger.warning("%s: caption file is empty; using class_tokens %r instead", candidate, class_tokens)
            break
        if enable_wildcard:
            return "\n".join(line.strip() for line in lines if line.strip())
        return lines[0].strip()
    else:
        if warn:
            logger.warning(
                "%s: no caption file (%s); using class_tokens %r", image_path, caption_extension, class_tokens
            )
    return class_tokens


def _split(part: str, sep: str, *, drop_empty: bool) -> list[str]:
    items = [t.strip() for t in part.split(sep)]
    return [t for t in items if t] if drop_empty else items


def _effective_warmup_step(opts: CaptionOptions, max_train_steps: int) -> float:
    # A value below 1 is a fraction of the run (spec §2.4).
    if opts.token_warmup_step < 1:
        return math.floor(opts.token_warmup_step * max_train_steps)
    return opts.token_warmup_step


def _expand_wildcards(caption: str, rng: random.Random) -> str:
    if "\n" in caption:
        caption = rng.choice(caption.split("\n"))
    # `{{` and `}}` are literal braces: hide them behind markers that cannot occur in the text.
    open_marker, close_marker = "\u2985", "\u2986"
    while open_marker in caption or close_marker in caption:
        open_marker += "\u2985"
        close_marker += "\u2986"
    caption = caption.replace("{{", open_marker).replace("}}", close_marker)
    caption = _WILDCARD.sub(lambda m: rng.choice(m.group(1).split("|")), caption)
    return caption.replace(open_marker, "{").replace(close_marker, "}")


def process_caption(
    raw: str, opts: CaptionOptions, *, rng: random.Random, epoch: int, step: int, max_train_steps: int
) -> str:
    """Apply spec §2.4 in order: prefix/suffix, dropout, wildcards (or first line), keep-tokens split, token
    warm-up, shuffle, tag dropout, join with ", ", secondary separator.

    `epoch` is 1-based (dropout every n epochs drops when `epoch % n == 0`); `step` is the global step the
    sample's batch belongs to.
    """
    caption = raw
    if opts.caption_prefix:
        caption = opts.caption_prefix + " " + caption
    if opts.caption_suffix:
        caption = caption + " " + opts.caption_suffix

    dropped = opts.caption_dropout_rate > 0 and rng.random() < opts.caption_dropout_rate
    if opts.caption_dropout_every_n_epochs > 0 and epoch % opts.caption_dropout_every_n_epochs == 0:
        dropped = True
    if dropped:
        return ""

    if opts.enable_wildcard:
        caption = _expand_wildcards(caption, rng)
    else:
        caption = caption.split("\n")[0]

    sep = opts.caption_separator
    keep_sep = opts.keep_tokens_separator
    has_keep_sep = bool(keep_sep) and keep_sep in caption
    warmup_step = _effective_warmup_step(opts, max_train_steps)
    active = opts.shuffle_caption or opts.token_warmup_step > 0 or opts.caption_tag_dropout_rate > 0
    if active or has_keep_sep:
        fixed_suffix: list[str] = []
        if has_keep_sep:
            fixed_part, flex_part = caption.split(keep_sep, 1)
            if keep_sep in flex_part:
                flex_part, suffix_part = flex_part.split(keep_sep, 1)
                fixed_suffix = _split(suffix_part, sep, drop_empty=True)
            fixed = _split(fixed_part, sep, drop_empty=True)
            flex = _split(flex_part, sep, drop_empty=True)
        else:
            tokens = _split(caption.strip(), sep, drop_empty=False)
            keep = max(opts.keep_tokens, 0)
            fixed, flex = tokens[:keep], tokens[keep:]

        if warmup_step and step < warmup_step:
            count = math.floor(step * ((len(flex) - opts.token_warmup_min) / warmup_step)) + opts.token_warmup_min
            flex = flex[:count]
        if opts.shuffle_caption:
            rng.shuffle(flex)
        if opts.caption_tag_dropout_rate > 0:
            flex = [t for t in flex if rng.random() >= opts.caption_tag_dropout_rate]
        caption = ", ".join(fixed + flex + fixed_suffix)

    if opts.secondary_separator:
        caption = caption.replace(opts.secondary_separator, sep)
    return caption


def caching_blockers(opts: CaptionOptions, raw: str | None = None) -> list[str]:
    """Names of the options that make a caption change between samples (and so forbid a text-encoder cache).

    The rules are the option table's (`fluxlora.config.dataset_options.cache_conflicts`); with `raw` given,
    `enable_wildcard` only blocks when that caption actually has several lines or a `{a|b}`.
    """
    names = [c.name for c in cache_conflicts(opts, cache_latents=False, cache_text_encoder_outputs=True)]
    if "enable_wildcard" in names and raw is not None:
        text = (opts.caption_prefix or "") + raw + (opts.caption_suffix or "")
        without_literals = text.replace("{{", "").replace("}}", "")
        if "\n" not in text and not _WILDCARD.search(without_literals):
            names.remove("enable_wildcard")
    return names


def caption_is_static(opts: CaptionOptions, raw: str | None = None) -> bool:
    """True when processing draws no random numbers and ignores epoch/step, so text-encoder outputs can be cached."""
    return not caching_blockers(opts, raw)


class _NoRandom(random.Random):
    """An rng that refuses to be used: proves a static caption draws nothing."""

    def random(self) -> float:  # pragma: no cover - only reached on a logic error
        raise AssertionError("static caption processing drew a random number")

    def getrandbits(self, k: int) -> int:  # pragma: no cover - choice() and shuffle() draw through this
        raise AssertionError("static caption processing drew a random number")


def static_caption(raw: str, opts: CaptionOptions) -> str:
    """The exact text a sample's caption becomes when processing is static: the text the TE cache keys on.

    Raises DatasetError naming the option when the caption changes per sample (see `caching_blockers`).
    """
    blockers = caching_blockers(opts, raw)
    if blockers:
        raise DatasetError(
            f"cannot cache text-encoder outputs: {', '.join(blockers)} make captions change per sample; "
            "turn them off or drop --cache_text_encoder_outputs",
            key=blockers[0],
        )
    return process_caption(raw, opts, rng=_NoRandom(), epoch=1, step=0, max_train_steps=1)
