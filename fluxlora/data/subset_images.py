"""The images of one subset, before sizes and buckets: a DreamBooth folder or a fine-tuning metadata file.

A DreamBooth subset lists its folder and reads each image's caption file (class tokens when there is none). A
fine-tuning subset reads sd-scripts' metadata JSON (`{image_key: {caption, tags, image_size}}`) or JSONL
(one object with `image_path` per line), finds each image as sd-scripts does and joins caption and tags.
Problems are appended to the caller's list so the whole dataset is reported at once.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fluxlora.config.dataset import SubsetConfig
from fluxlora.data.captions import read_caption
from fluxlora.data.images import IMAGE_EXTENSIONS, list_images
from fluxlora.errors import DatasetError

logger = logging.getLogger(__name__)

Size = tuple[int, int]


@dataclass
class FoundImages:
    """Images of one subset before sizes and buckets: (path, raw caption, tags for tag frequency)."""

    items: list[tuple[Path, str, str]] = field(default_factory=list)


def dreambooth_images(subset: SubsetConfig, problems: list[str]) -> FoundImages:
    """The images of a DreamBooth subset's folder with their captions (empty, with a warning, when missing)."""
    assert subset.image_dir is not None
    found = FoundImages()
    missing = 0
    for path in list_images(subset.image_dir):
        try:
            caption = read_caption(path, subset.caption_extension, class_tokens=subset.class_tokens,
                                   enable_wildcard=subset.enable_wildcard, warn=False)
        except DatasetError as err:
            problems.append(str(err))
            continue
        if caption is None:
            missing += 1
            caption = ""
        found.items.append((path, caption, caption))
    if missing:
        logger.warning("%s: %d image(s) in %s have no %s caption and no class_tokens; training them with an "
                       "empty caption", subset.key, missing, subset.image_dir, subset.caption_extension)
    return found


def read_metadata_file(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(image key, row) of a fine-tuning metadata `.json` or `.jsonl`; raises DatasetError naming the line."""
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() == ".jsonl":
        rows = []
        for line_no, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DatasetError(f"{path}: line {line_no}: {e.msg}; fix the JSON line", path=path) from e
                if not isinstance(row, dict) or not isinstance(row.get("image_path"), str):
                    raise DatasetError(f"{path}: line {line_no}: expected an object with image_path", path=path)
                rows.append((row["image_path"], row))
        return rows
    try:
        data = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: line {e.lineno}, column {e.colno}: {e.msg}; fix the JSON", path=path) from e
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected {{image_key: {{caption, tags, image_size}}}}", path=path)
    return [(k, v if isinstance(v, dict) else {}) for k, v in data.items()]


def find_image(key: str, image_dir: Path | None) -> Path | None:
    """sd-scripts' lookup: the key as a path, else under image_dir, else image_dir/key + an image extension."""
    candidates = [Path(key)]
    if image_dir is not None:
        candidates.append(image_dir / key)
        extensions = IMAGE_EXTENSIONS + tuple(e.upper() for e in IMAGE_EXTENSIONS)
        candidates.extend(image_dir / (key + ext) for ext in extensions)
    return next((c for c in candidates if c.is_file()), None)


def finetuning_images(subset: SubsetConfig, problems: list[str], sizes: dict[Path, Size]) -> FoundImages:
    """The images of a fine-tuning subset with caption and tags joined; sizes from the file go into `sizes`."""
    assert subset.metadata_file is not None
    found = FoundImages()
    try:
        rows = read_metadata_file(subset.metadata_file)
    except DatasetError as err:
        problems.append(str(err))
        return found
    sep = subset.caption_separator
    for key, row in rows:
        path = find_image(key, subset.image_dir)
        if path is None:
            problems.append(f"{subset.metadata_file}: image {key!r} not found (also tried under image_dir "
                            f"{str(subset.image_dir)!r}); fix the key or image_dir")
            continue
        caption = row.get("caption") or ""
        tags = row.get("tags") or ""
        if not isinstance(caption, str) or not isinstance(tags, str):
            problems.append(f"{subset.metadata_file}: {key}: caption and tags must be strings")
            continue
        if tags:
            lines = caption.split("\n") if subset.enable_wildcard else [caption]
            caption = "\n".join(f"{c}{sep}{tags}" if c else tags for c in lines)
        size = row.get("image_size")
        if isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size):
            sizes[path.resolve()] = (int(size[0]), int(size[1]))
        found.items.append((path, caption or subset.class_tokens or "", tags))
    return found
