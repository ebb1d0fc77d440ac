"""The dataset page's work: a folder's images with their captions, the trainer's own checks, the bucket each image
lands in, caption edits and uploads (written atomically), and the dataset TOML.

Every check is the trainer's: `image_size` + `check_complete` (what preflight runs), `load_image` for uploads (a
full decode), `read_caption` for caption files, `make_buckets` / `assign_bucket` for buckets, and the TOML is read
back with `load_dataset_config` before it is written.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fluxlora.errors import DatasetError, FluxLoraError

UPLOAD_IMAGE_FORMATS = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp", "BMP": ".bmp"}
CAPTION_EXTENSIONS = (".txt", ".caption")
MAX_CAPTION_BYTES = 1 << 20
THUMB_SIZE = 192


@dataclass
class ImageEntry:
    name: str
    path: str
    caption: str | None = None
    caption_file: str | None = None
    size: tuple[int, int] | None = None
    bucket: tuple[int, int] | None = None
    problems: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class BucketSettings:
    """The dataset keys that decide buckets (sd-scripts' names and defaults)."""

    resolution: tuple[int, int] = (1024, 1024)
    enable_bucket: bool = True
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False


def _ext(caption_extension: str) -> str:
    return caption_extension if caption_extension.startswith(".") else "." + caption_extension


def scan_folder(folder: Path, *, caption_extension: str = ".txt", buckets: BucketSettings = BucketSettings()
                ) -> dict[str, Any]:
    """Images of `folder` (not recursive, as a DreamBooth subset reads it), each with caption, size, bucket and
    problems; plus the folder's own problems and the images per bucket."""
    from fluxlora.data.buckets import adjust_bucket_limits, assign_bucket, make_buckets
    from fluxlora.data.captions import caption_candidates, read_caption
    from fluxlora.data.images import check_complete, image_size, list_images

    ext = _ext(caption_extension)
    problems: list[str] = []
    bucket_list = None
    try:
        if buckets.enable_bucket and not buckets.bucket_no_upscale:
            low, high = adjust_bucket_limits(buckets.resolution, buckets.min_bucket_reso, buckets.max_bucket_reso,
                                             buckets.bucket_reso_steps)
            bucket_list = make_buckets(buckets.resolution, low, high, buckets.bucket_reso_steps)
    except DatasetError as err:
        problems.append(str(err))
    entries: list[ImageEntry] = []
    for path in list_images(folder):
        entry = ImageEntry(name=path.name, path=str(path))
        readable = True
        try:
            entry.size = image_size(path)
            check_complete(path)
        except DatasetError as err:
            readable = False  # the trainer refuses it: no bucket
            entry.problems.append(str(err).removeprefix(f"{path}: "))
        try:
            entry.caption = read_caption(path, ext, class_tokens=None, enable_wildcard=False, warn=False)
            found = next((c for c in caption_candidates(path, ext) if c.is_file()), None)
            entry.caption_file = str(found or path.with_name(path.stem + ext))
        except DatasetError as err:
            entry.problems.append(str(err))
        if entry.caption is None and not any("caption" in p for p in entry.problems):
            entry.problems.append(f"no caption ({path.stem}{ext} missing or empty)")
        if readable and entry.size is not None and (bucket_list is not None or not buckets.enable_bucket
                                       or buckets.bucket_no_upscale):
            entry.bucket, _ = assign_bucket(entry.size, resolution=buckets.resolution,
                                            enable_bucket=buckets.enable_bucket,
                                            bucket_no_upscale=buckets.bucket_no_upscale, buckets=bucket_list,
                                            step=buckets.bucket_reso_steps)
        entries.append(entry)
    stems: dict[str, list[str]] = defaultdict(list)
    for entry in entries:
        stems[Path(entry.name).stem].append(entry.name)
    for stem, names in sorted(stems.items()):
        if len(names) > 1:
            problems.append(f"{' and '.join(names)} share the stem {stem!r} and so one caption file {stem}{ext}; "
                            "rename one of them")
            for entry in entries:
                if entry.name in names:
                    entry.problems.append(f"duplicate stem {stem!r}")
    per_bucket: dict[str, int] = defaultdict(int)
    for entry in entries:
        if entry.bucket:
            per_bucket[f"{entry.bucket[0]}x{entry.bucket[1]}"] += 1
    return {"folder": str(folder), "caption_extension": ext, "images": [asdict(e) for e in entries],
            "problems": problems, "buckets": dict(sorted(per_bucket.items())),
            "bad": sum(bool(e.problems) for e in entries)}


def write_caption(image: Path, caption: str, *, caption_extension: str = ".txt") -> Path:
    """Write an image's caption file atomically (`<stem><ext>` beside it)."""
    from fluxlora.files import write_text

    if len(caption.encode("utf-8")) > MAX_CAPTION_BYTES:
        raise DatasetError(f"{image.name}: caption longer than {MAX_CAPTION_BYTES} bytes", path=image)
    target = image.with_name(image.stem + _ext(caption_extension))
    write_text(target, caption.strip() + "\n")
    return target


def check_upload_name(name: str) -> str:
    """A plain file name with an image or caption extension (no folders, no hidden files)."""
    base = os.path.basename(name.replace("\\", "/"))
    from fluxlora.data.images import IMAGE_EXTENSIONS

    if not base or base != name or base.startswith(".") or "\x00" in base:
        raise DatasetError(f"{name!r}: give a plain file name (no folders, not hidden)", key="name")
    if Path(base).suffix.lower() not in (*IMAGE_EXTENSIONS, *CAPTION_EXTENSIONS):
        raise DatasetError(f"{name}: only images ({', '.join(IMAGE_EXTENSIONS)}) and captions "
                           f"({', '.join(CAPTION_EXTENSIONS)}) can be uploaded", key="name")
    return base


def temporary_upload(folder: Path, name: str) -> tuple[int, Path]:
    """(fd, path) of a hidden temporary file beside the final name (renamed into place once checked)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".upload.tmp", dir=folder)
    return fd, Path(tmp)


def finish_upload(tmp: Path, target: Path, *, overwrite: bool = False) -> dict[str, Any]:
    """Check an uploaded file with the trainer's readers, then rename it into place; removes it when refused."""
    from fluxlora.data.images import load_image

    try:
        if target.exists() and not overwrite:
            raise DatasetError(f"{target.name} already exists in {target.parent}; rename the file or delete the old "
                               "one", path=target)
        suffix = target.suffix.lower()
        if suffix in CAPTION_EXTENSIONS:
            data = tmp.read_bytes()
            try:
                data.decode("utf-8-sig")
            except UnicodeDecodeError as err:
                raise DatasetError(f"{target.name}: caption is not UTF-8 ({err.reason} at byte {err.start}); "
                                   "save it as UTF-8", path=target) from err
            info: dict[str, Any] = {"kind": "caption"}
        else:
            from PIL import Image

            with Image.open(tmp) as probe:
                fmt = probe.format or "?"
            if fmt not in UPLOAD_IMAGE_FORMATS:
                raise DatasetError(f"{target.name}: a {fmt} file; upload PNG, JPEG, WebP or BMP", path=target)
            if UPLOAD_IMAGE_FORMATS[fmt] != suffix and not (fmt == "JPEG" and suffix == ".jpeg"):
                raise DatasetError(f"{target.name}: the file is {fmt} but named {suffix}; rename it to "
                                   f"{target.stem}{UPLOAD_IMAGE_FORMATS[fmt]}", path=target)
            loaded = load_image(tmp)  # a full decode: truncated, corrupt and oversized images are refused here
            if fmt == "PNG":
                _check_png(tmp, target)
            info = {"kind": "image", "size": loaded.size}
        os.replace(tmp, target)
        return {"name": target.name, "path": str(target), **info}
    except FluxLoraError:
        tmp.unlink(missing_ok=True)
        raise
    except Exception as err:  # noqa: BLE001 - Pillow raises many types for a file that is not an image
        tmp.unlink(missing_ok=True)
        raise DatasetError(f"{target.name}: not a readable image ({err}); upload PNG, JPEG, WebP or BMP",
                           path=target) from err


def _check_png(tmp: Path, target: Path) -> None:
    """The trainer's PNG completeness check (every chunk's CRC), which keys on the .png suffix."""
    from PIL import Image

    try:
        with Image.open(tmp) as image:
            image.verify()
    except Exception as err:  # noqa: BLE001
        raise DatasetError(f"{target.name}: PNG data is damaged or cut short ({err}); re-export it",
                           path=target) from err


def thumbnail(path: Path, size: int = THUMB_SIZE) -> bytes:
    """A JPEG thumbnail decoded with the trainer's reader (EXIF rotation, alpha on white)."""
    from PIL import Image

    from fluxlora.data.images import load_image

    image = Image.fromarray(load_image(path).rgb)
    image.thumbnail((size, size))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=85)
    return out.getvalue()


def _toml_string(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)  # a JSON string is a valid TOML basic string


def dataset_toml(subsets: list[dict[str, Any]], *, resolution: tuple[int, int], batch_size: int = 1,
                 caption_extension: str = ".txt", enable_bucket: bool = True, bucket_no_upscale: bool = False,
                 min_bucket_reso: int = 256, max_bucket_reso: int = 1024, bucket_reso_steps: int = 64) -> str:
    """The dataset TOML of the guide: one dataset, one subset per image folder (`image_dir`, `num_repeats`,
    optional `class_tokens`)."""
    res = f"[{resolution[0]}, {resolution[1]}]" if resolution[0] != resolution[1] else str(resolution[0])
    lines = ["[general]", f"caption_extension = {_toml_string(_ext(caption_extension))}",
             f"enable_bucket = {str(enable_bucket).lower()}", "", "[[datasets]]", f"resolution = {res}",
             f"batch_size = {int(batch_size)}"]
    if enable_bucket:
        lines += [f"bucket_no_upscale = {str(bucket_no_upscale).lower()}", f"min_bucket_reso = {int(min_bucket_reso)}",
                  f"max_bucket_reso = {int(max_bucket_reso)}", f"bucket_reso_steps = {int(bucket_reso_steps)}"]
    for subset in subsets:
        lines += ["", "  [[datasets.subsets]]", f"  image_dir = {_toml_string(str(subset['image_dir']))}",
                  f"  num_repeats = {int(subset.get('num_repeats', 1))}"]
        if subset.get("class_tokens"):
            lines.append(f"  class_tokens = {_toml_string(str(subset['class_tokens']))}")
    return "\n".join(lines) + "\n"


def write_dataset_toml(path: Path, text: str) -> Path:
    """Check the TOML with the trainer's dataset reader, then write it atomically (the old file stays on error)."""
    from fluxlora.config.dataset import DatasetDefaults, load_dataset_config
    from fluxlora.files import write_text

    with tempfile.TemporaryDirectory() as scratch:
        probe = Path(scratch) / path.name
        probe.write_text(text, encoding="utf-8")
        try:
            load_dataset_config(probe, DatasetDefaults())
        except FluxLoraError as err:
            raise DatasetError(str(err).replace(str(probe), str(path)), path=path, key=err.key) from err
    write_text(path, text)
    return path


__all__ = ["BucketSettings", "check_upload_name", "dataset_toml", "finish_upload", "scan_folder", "temporary_upload",
           "thumbnail", "write_caption", "write_dataset_toml"]
