"""Finding and decoding training images: one function per job, every failure a `DatasetError` naming the file.

What sd-scripts gets wrong and we do not (reliability.md F9-F12): EXIF orientation is applied (pixels *and*
the header size used for bucketing), 16-bit images are scaled to 8 bit instead of clipped, transparent pixels are
composited on a background instead of showing the hidden colour, CMYK goes through its ICC profile when it has
one, and a truncated, mislabelled or absurdly large file is named instead of crashing a DataLoader worker.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from fluxlora.errors import DatasetError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
"""Extensions sd-scripts picks up (compared case-insensitively)."""

MAX_IMAGE_PIXELS: int = 2 * 89_478_485
"""Decompression-bomb limit: Pillow's own hard limit (twice its warning threshold), about 179 M pixels."""

_ROTATING_ORIENTATIONS = {5, 6, 7, 8}  # EXIF orientations that swap width and height
_EXIF_ORIENTATION = 0x0112


@dataclass
class LoadedImage:
    """A decoded image: `rgb` uint8 H×W×3, `alpha` uint8 H×W (only when asked for and present)."""

    rgb: np.ndarray
    alpha: np.ndarray | None
    path: Path

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) in pixels, after EXIF rotation."""
        return int(self.rgb.shape[1]), int(self.rgb.shape[0])


def list_images(directory: Path) -> list[Path]:
    """Image files directly inside `directory` (not recursive), any extension case, sorted and de-duplicated.

    Raises DatasetError when `directory` is not a folder (the caller decides whether that skips a subset).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise DatasetError(f"{directory}: image folder not found; check image_dir / train_data_dir", path=directory)
    found = {p for p in directory.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()}
    return sorted(found)


def _open(path: Path, max_pixels: int) -> Image.Image:
    """Open lazily (header only) with the bomb check; every Pillow failure becomes a DatasetError."""
    try:
        with warnings.catch_warnings():
            # Between 1x and 2x Pillow's threshold it only warns; our own limit below is what decides.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
    except Image.DecompressionBombError as err:
        raise DatasetError(
            f"{path}: image is too large to decode safely ({err}); downscale it below {max_pixels} pixels",
            path=path,
        ) from err
    except FileNotFoundError as err:
        raise DatasetError(f"{path}: image file not found", path=path) from err
    except UnidentifiedImageError as err:
        size = path.stat().st_size if path.exists() else 0
        what = "an empty (0-byte) file" if size == 0 else "not a readable image (wrong extension or corrupt)"
        raise DatasetError(f"{path}: {what}; delete or re-export it", path=path) from err
    except (OSError, SyntaxError, ValueError) as err:
        raise DatasetError(f"{path}: cannot read image header ({err}); delete or re-export it", path=path) from err
    width, height = image.size
    if width <= 0 or height <= 0 or width * height > max_pixels:
        image.close()
        raise DatasetError(
            f"{path}: image is {width}x{height} = {width * height} pixels, above the limit of {max_pixels} "
            "(decompression-bomb guard); downscale it",
            path=path,
        )
    return image


def _orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(_EXIF_ORIENTATION, 1) or 1)
    except Exception:  # a malformed EXIF block must not make an otherwise fine image unreadable
        return 1


def image_size(path: Path, *, max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[int, int]:
    """(width, height) read from the header only, after EXIF rotation (a portrait phone photo is portrait)."""
    path = Path(path)
    with _open(path, max_pixels) as image:
        width, height = image.size
        if _orientation(image) in _ROTATING_ORIENTATIONS:
            width, height = height, width
    return width, height


def check_complete(path: Path) -> None:
    """For a PNG, walk every chunk and its CRC without decoding pixels: a cut-short download fails here, up front,
    rather than when the image is first loaded mid-training. (JPEG has no such cheap check: valid files may carry
    trailing data after the end marker.)"""
    if Path(path).suffix.lower() != ".png":
        return
    try:
        with Image.open(path) as image:
            image.verify()
    except Exception as err:  # noqa: BLE001 - Pillow raises many types for damaged data
        raise DatasetError(f"{path}: PNG data is damaged or cut short ({err}); delete or re-export it",
                           path=path) from err


def _to_srgb_from_cmyk(image: Image.Image) -> Image.Image:
    """CMYK -> RGB through the embedded ICC profile when there is one (Pillow's naive formula otherwise)."""
    icc = image.info.get("icc_profile")
    if icc:
        try:
            from PIL import ImageCms

            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            dst = ImageCms.createProfile("sRGB")
            converted = ImageCms.profileToProfile(image, src, dst, outputMode="RGB")
            if converted is not None:
                return converted
        except Exception as err:  # a broken profile: fall back, but say so
            logger.warning("%s: ignoring unusable ICC profile (%s); using plain CMYK conversion", image.filename, err)
    return image.convert("RGB")


def _high_bit_to_uint8(values: np.ndarray) -> np.ndarray:
    """Scale 16-bit (or 32-bit integer holding 16-bit) samples to 8 bit by /257, rounded — never clipped."""
    scaled = np.clip(values.astype(np.float64), 0, 65535) / 257.0
    return np.floor(scaled + 0.5).astype(np.uint8)


def _decode(image: Image.Image) -> tuple[np.ndarray, np.ndarray | None]:
    """Pixels of an opened image as (rgb uint8 HxWx3, alpha uint8 HxW or None), whatever its mode."""
    mode = image.mode
    if mode.startswith("I;16") or mode == "I":
        grey = _high_bit_to_uint8(np.asarray(image))
        return np.repeat(grey[:, :, None], 3, axis=2), None
    if mode == "F":
        grey = np.floor(np.clip(np.asarray(image, dtype=np.float64), 0, 255) + 0.5).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2), None
    if mode == "CMYK":
        return np.asarray(_to_srgb_from_cmyk(image), dtype=np.uint8), None
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif mode in ("LA", "La", "PA", "RGBa"):
        image = image.convert("RGBA")
    elif mode == "L" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        rgba = np.asarray(image, dtype=np.uint8)
        return np.ascontiguousarray(rgba[:, :, :3]), np.ascontiguousarray(rgba[:, :, 3])
    return np.asarray(image.convert("RGB"), dtype=np.uint8), None


def _composite(rgb: np.ndarray, alpha: np.ndarray, background: tuple[int, int, int]) -> np.ndarray:
    """Alpha-blend on a solid background so colours hidden under alpha=0 never reach the model."""
    a = alpha.astype(np.uint32)[:, :, None]
    bg = np.asarray(background, dtype=np.uint32)[None, None, :]
    out = (rgb.astype(np.uint32) * a + bg * (255 - a) + 127) // 255
    return out.astype(np.uint8)


def load_image(
    path: Path,
    *,
    keep_alpha: bool = False,
    background: tuple[int, int, int] = (255, 255, 255),
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> LoadedImage:
    """Decode an image to 8-bit RGB with EXIF orientation applied.

    Mode handling: 16-bit grey (`I;16*`, `I`) is scaled /257; CMYK uses its ICC profile if any; palette and
    grey images with transparency, LA and RGBA keep their alpha. With `keep_alpha=False` the alpha is composited
    on `background` (white) and dropped; with `keep_alpha=True` `rgb` holds the raw colour channels and `alpha`
    the mask (None when the image has no alpha; the caller then uses an all-ones mask). Animated files give
    their first frame. Any failure (truncated, corrupt, not an image, too large) raises DatasetError naming the file.
    """
    path = Path(path)
    with _open(path, max_pixels) as image:
        try:
            image.load()
            image = ImageOps.exif_transpose(image) or image
            rgb, alpha = _decode(image)
        except DatasetError:
            raise
        except (OSError, SyntaxError, ValueError, EOFError) as err:
            raise DatasetError(
                f"{path}: image data is truncated or corrupt ({err}); re-export or delete the file", path=path
            ) from err
    if alpha is not None and not keep_alpha:
        rgb, alpha = _composite(rgb, alpha, background), None
    return LoadedImage(rgb=np.ascontiguousarray(rgb), alpha=alpha, path=path)


@dataclass
class ImageScan:
    """Result of checking a list of images up front: sizes of the good ones, reasons for the bad ones."""

    sizes: dict[Path, tuple[int, int]] = field(default_factory=dict)
    bad: dict[Path, str] = field(default_factory=dict)

    @property
    def num_skipped(self) -> int:
        return len(self.bad)

    def summary(self) -> str:
        """One line per bad file, `path: reason`."""
        return "\n".join(f"{p}: {reason}" for p, reason in sorted(self.bad.items()))


def _check_one(path: Path, decode: bool, max_pixels: int) -> tuple[tuple[int, int] | None, str | None]:
    try:
        if decode:
            loaded = load_image(path, keep_alpha=True, max_pixels=max_pixels)
            return loaded.size, None
        return image_size(path, max_pixels=max_pixels), None
    except DatasetError as err:
        return None, str(err).removeprefix(f"{path}: ")


def scan_images(
    paths: Iterable[Path],
    *,
    skip_bad: bool = False,
    decode: bool = True,
    max_pixels: int = MAX_IMAGE_PIXELS,
    workers: int = 1,
) -> ImageScan:
    """Check every image before any model is loaded and report all problems at once.

    `decode=True` fully decodes each file (finds truncated data, which a header read cannot); False reads
    headers only. Bad files raise one DatasetError listing every `path: reason`, or with `skip_bad=True` are
    left out of `sizes`, logged once each and counted in `bad`.
    """
    ordered: Sequence[Path] = [Path(p) for p in paths]
    scan = ImageScan()
    if workers > 1:
        with ThreadPoolExecutor(max_workers=workers) as pool:  # Pillow decodes without holding the GIL
            results = list(pool.map(lambda p: _check_one(p, decode, max_pixels), ordered))
    else:
        results = [_check_one(p, decode, max_pixels) for p in ordered]
    for path, (size, reason) in zip(ordered, results, strict=False):
        if size is not None:
            scan.sizes[path] = size
        else:
            scan.bad[path] = reason or "unreadable"
    if scan.bad and not skip_bad:
        first = next(iter(sorted(scan.bad)))
        raise DatasetError(
            f"{len(scan.bad)} unreadable image(s), fix or delete them or pass --skip_bad_images: "
            + "; ".join(f"{p}: {reason}" for p, reason in sorted(scan.bad.items())),
            path=first,
        )
    for path, reason in sorted(scan.bad.items()):
        logger.warning("skipping image %s: %s", path, reason)
    if scan.bad:
        logger.warning("skipped %d unreadable image(s) of %d", len(scan.bad), len(ordered))
    return scan
