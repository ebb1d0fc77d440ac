"""Image discovery and decoding: every mode, EXIF rotation, and every bad input named."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from fluxlora.data.images import IMAGE_EXTENSIONS, image_size, list_images, load_image, scan_images
from fluxlora.errors import DatasetError


def test_list_images_any_case_sorted_not_recursive(image_dir, helpers):
    names = ["b.PNG", "a.jpg", "c.JpEg", "d.webp", "e.bmp"]
    for name in names:
        helpers.save_array(image_dir / name, helpers.gradient(8, 8))
    (image_dir / "notes.txt").write_text("x")
    helpers.save_array(image_dir / "anim.gif", helpers.gradient(8, 8))
    helpers.save_array(image_dir / "sub" / "f.png", helpers.gradient(8, 8))
    assert list_images(image_dir) == sorted(image_dir / n for n in names)
    assert set(IMAGE_EXTENSIONS) == {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


def test_list_images_missing_folder_names_it(tmp_path):
    with pytest.raises(DatasetError) as err:
        list_images(tmp_path / "nope")
    assert err.value.path == str(tmp_path / "nope") and "nope" in str(err.value)


def _two_halves(width=40, height=20):
    """Left half red, right half blue: rotation direction is visible."""
    array = np.zeros((height, width, 3), np.uint8)
    array[:, : width // 2] = (255, 0, 0)
    array[:, width // 2 :] = (0, 0, 255)
    return array


@pytest.mark.parametrize("orientation", [6, 8])
def test_exif_orientation_rotates_pixels_and_header_size(image_dir, orientation):
    image = Image.fromarray(_two_halves())
    exif = image.getexif()
    exif[0x0112] = orientation
    path = image_dir / f"o{orientation}.png"
    image.save(path, exif=exif)
    assert image_size(path) == (20, 40)  # portrait after rotation
    loaded = load_image(path)
    assert loaded.size == (20, 40)
    top, bottom = loaded.rgb[0, 10], loaded.rgb[-1, 10]
    # 6 = rotate 90° clockwise to display: the stored left (red) column becomes the top row; 8 is the reverse.
    red, blue = [255, 0, 0], [0, 0, 255]
    assert (top.tolist(), bottom.tolist()) == ((red, blue) if orientation == 6 else (blue, red))


def test_grey_l_becomes_rgb(image_dir, helpers):
    path = helpers.save_array(image_dir / "g.png", np.full((6, 7), 100, np.uint8))
    loaded = load_image(path)
    assert loaded.rgb.shape == (6, 7, 3) and loaded.rgb.dtype == np.uint8
    assert (loaded.rgb == 100).all() and loaded.alpha is None


def test_sixteen_bit_grey_is_scaled_not_clipped(image_dir):
    ramp = np.linspace(0, 65535, 64 * 64).round().astype(np.uint16).reshape(64, 64)
    path = image_dir / "i16.png"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode.startswith("I")
    loaded = load_image(path)
    expected = np.floor(ramp / 257.0 + 0.5).astype(np.uint8)  # 65535 -> 255, 32896 -> 128
    assert np.array_equal(loaded.rgb[:, :, 0], expected)
    assert (loaded.rgb == 255).mean() < 0.01  # a plain convert("RGB") makes ~99 % of this ramp white
    mid = np.full((8, 8), 32896, np.uint16)
    Image.fromarray(mid).save(image_dir / "mid.png")
    assert abs(load_image(image_dir / "mid.png").rgb.mean() - 128) <= 1


def test_rgba_hidden_colour_is_composited_on_white(image_dir):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 255  # red everywhere...
    rgba[:2, :, 3] = 0  # ...fully transparent on top
    rgba[2:, :, 3] = 128  # half transparent below
    path = image_dir / "a.png"
    Image.fromarray(rgba, "RGBA").save(path)
    loaded = load_image(path)
    assert loaded.alpha is None
    assert (loaded.rgb[:2] == 255).all()  # white, not the hidden red
    # red over white at alpha 128/255: R = 255, G = B = 255 * 127/255 = 127
    assert loaded.rgb[3, 0].tolist() == [255, 127, 127]
    kept = load_image(path, keep_alpha=True)
    assert (kept.rgb[..., 0] == 255).all() and (kept.rgb[..., 1] == 0).all()
    assert kept.alpha.tolist() == [[0] * 4] * 2 + [[128] * 4] * 2


def test_la_image_keeps_alpha(image_dir):
    la = np.zeros((3, 3, 2), np.uint8)
    la[..., 0] = 100
    la[0, :, 1] = 255
    path = image_dir / "la.png"
    Image.fromarray(la, "LA").save(path)
    kept = load_image(path, keep_alpha=True)
    assert (kept.rgb == 100).all() and kept.alpha[0].tolist() == [255] * 3 and kept.alpha[1].tolist() == [0] * 3
    flat = load_image(path)
    assert flat.rgb[0, 0].tolist() == [100] * 3 and flat.rgb[1, 0].tolist() == [255] * 3


def test_palette_with_transparency(image_dir):
    image = Image.new("P", (4, 2))
    image.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    image.putdata([0, 0, 1, 1] * 2)
    path = image_dir / "p.png"
    image.save(path, transparency=0)  # palette index 0 (red) is transparent
    loaded = load_image(path, keep_alpha=True)
    assert loaded.alpha[:, :2].max() == 0 and loaded.alpha[:, 2:].min() == 255
    assert load_image(path).rgb[0].tolist() == [[255, 255, 255]] * 2 + [[0, 255, 0]] * 2


def test_cmyk_jpeg_becomes_rgb(image_dir):
    cmyk = np.zeros((16, 16, 4), np.uint8)
    cmyk[:, 8:, 3] = 255  # right half: full black ink
    path = image_dir / "c.jpg"
    Image.fromarray(cmyk, "CMYK").save(path, quality=95)
    loaded = load_image(path)
    assert loaded.rgb.shape == (16, 16, 3)
    assert loaded.rgb[:, :6].min() > 235 and loaded.rgb[:, 10:].max() < 20


def test_jpeg_named_png_still_loads(image_dir, helpers):
    path = helpers.save_array(image_dir / "x.png", helpers.gradient(8, 8), format="JPEG")
    assert load_image(path).size == (8, 8)


def _assert_names(err: pytest.ExceptionInfo, path) -> None:
    assert err.value.path == str(path) and str(path) in str(err.value) and "\n" not in str(err.value)


def test_truncated_png_is_named(image_dir, helpers):
    path = helpers.save_array(image_dir / "t.png", helpers.gradient(64, 64))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError) as err:
        load_image(path)
    _assert_names(err, path)
    assert "truncated" in str(err.value) or "corrupt" in str(err.value)


def test_truncated_jpeg_is_named(image_dir, helpers):
    path = helpers.save_array(image_dir / "t.jpg", helpers.gradient(64, 64))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError) as err:
        load_image(path)
    _assert_names(err, path)


def test_zero_byte_file_is_named(image_dir):
    path = image_dir / "empty.png"
    path.write_bytes(b"")
    for fn in (load_image, image_size):
        with pytest.raises(DatasetError) as err:
            fn(path)
        _assert_names(err, path)
        assert "empty" in str(err.value)


def test_text_named_png_is_named(image_dir):
    path = image_dir / "notes.png"
    path.write_text("not an image at all")
    with pytest.raises(DatasetError) as err:
        load_image(path)
    _assert_names(err, path)


def test_decompression_bomb_header_is_refused(image_dir, helpers):
    path = helpers.png_header_only(image_dir / "bomb.png", 30000, 30000)
    for fn in (image_size, load_image):
        with pytest.raises(DatasetError) as err:
            fn(path)
        _assert_names(err, path)
        assert "too large" in str(err.value)


def test_pixel_limit_message_gives_size(image_dir, helpers):
    path = helpers.save_array(image_dir / "big.png", helpers.gradient(20, 10))
    with pytest.raises(DatasetError) as err:
        load_image(path, max_pixels=199)
    _assert_names(err, path)
    assert "20x10" in str(err.value) and "199" in str(err.value)
    assert load_image(path, max_pixels=200).size == (20, 10)


def test_scan_reports_all_bad_files_at_once_or_skips(image_dir, helpers):
    good = helpers.save_array(image_dir / "good.png", helpers.gradient(12, 10))
    empty = image_dir / "empty.jpg"
    empty.write_bytes(b"")
    cut = helpers.save_array(image_dir / "cut.png", helpers.gradient(64, 64))
    cut.write_bytes(cut.read_bytes()[:200])
    with pytest.raises(DatasetError) as err:
        scan_images([good, empty, cut])
    assert str(empty) in str(err.value) and str(cut) in str(err.value) and str(good) + ":" not in str(err.value)
    scan = scan_images([good, empty, cut], skip_bad=True)
    assert scan.sizes == {good: (12, 10)} and set(scan.bad) == {empty, cut} and scan.num_skipped == 2
    # a header-only scan cannot see the truncation, only the empty file
    assert set(scan_images([good, empty, cut], skip_bad=True, decode=False).bad) == {empty}


def test_webp_and_bmp_load(image_dir, helpers):
    array = helpers.gradient(9, 5)
    bmp = helpers.save_array(image_dir / "x.bmp", array)
    assert np.array_equal(load_image(bmp).rgb, array)
    webp = helpers.save_array(image_dir / "x.webp", array, lossless=True)
    assert np.array_equal(load_image(webp).rgb, array)


def test_animated_webp_gives_first_frame(image_dir):
    frames = [Image.new("RGB", (4, 4), c) for c in ((10, 20, 30), (200, 0, 0))]
    buf = io.BytesIO()
    frames[0].save(buf, format="WEBP", save_all=True, append_images=frames[1:], lossless=True)
    path = image_dir / "anim.webp"
    path.write_bytes(buf.getvalue())
    assert load_image(path).rgb[0, 0].tolist() == [10, 20, 30]
