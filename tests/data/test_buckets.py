"""Bucket sets, bucket choice, resize and crop against values computed by hand from spec §2.5."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fluxlora.data.buckets import (
    adjust_bucket_limits,
    assign_bucket,
    color_augment,
    make_buckets,
    no_upscale_bucket,
    plan_resize,
    prepare_image,
    select_bucket,
    single_bucket,
)
from fluxlora.data.images import LoadedImage
from fluxlora.errors import DatasetError

BUCKETS_1024 = make_buckets((1024, 1024), 256, 1024, 64)


def test_bucket_set_1024_is_the_spec_example():
    # spec §2.5: all (x, 1024) and (1024, x) for x = 256..1024 step 64
    expected = {(x, 1024) for x in range(256, 1025, 64)} | {(1024, x) for x in range(256, 1025, 64)}
    assert BUCKETS_1024 == sorted(expected) and len(BUCKETS_1024) == 25


def test_bucket_set_512_by_hand():
    # A = 262144; h = min(1024, floor((A // w) / 64) * 64) for w = 256..1024, kept when h >= 256
    expected = {
        (512, 512), (256, 1024), (1024, 256), (320, 768), (768, 320), (384, 640), (640, 384), (448, 576),
        (576, 448), (704, 320), (320, 704), (832, 256), (256, 832), (896, 256), (256, 896), (960, 256), (256, 960),
    }
    assert make_buckets((512, 512), 256, 1024, 64) == sorted(expected)


def test_bucket_step_must_be_multiple_of_16():
    for bad in (0, 8, 24, 40, 100):
        with pytest.raises(DatasetError) as err:
            make_buckets((512, 512), 256, 1024, bad)
        assert err.value.key == "bucket_reso_steps" and "bucket_reso_steps" in str(err.value)
    assert make_buckets((512, 512), 256, 512, 32)[-1] == (512, 512)


def test_bucket_limits_adjusted_like_sd_scripts():
    assert adjust_bucket_limits((1024, 1024), 250, 1000, 64) == (192, 1024)  # min floored, max ceiled
    with pytest.raises(DatasetError) as err:
        adjust_bucket_limits((512, 512), 640, 1024, 64)
    assert err.value.key == "min_bucket_reso"
    with pytest.raises(DatasetError) as err:
        adjust_bucket_limits((1024, 768), 256, 768, 64)
    assert err.value.key == "max_bucket_reso"


# (image size) -> (bucket, resized size, centre crop (left, top)) with the 1024² predefined buckets, by hand:
# bucket = nearest aspect ratio; scale = Hb/h if w/h > bucket ratio else Wb/w; resized = int(x*scale + 0.5).
PREDEFINED = [
    ((1024, 1024), (1024, 1024), (1024, 1024), (0, 0)),
    ((512, 512), (1024, 1024), (1024, 1024), (0, 0)),
    ((2048, 2048), (1024, 1024), (1024, 1024), (0, 0)),
    ((1, 1), (1024, 1024), (1024, 1024), (0, 0)),
    ((100, 100), (1024, 1024), (1024, 1024), (0, 0)),
    ((800, 600), (1024, 768), (1024, 768), (0, 0)),
    ((600, 800), (768, 1024), (768, 1024), (0, 0)),
    ((640, 480), (1024, 768), (1024, 768), (0, 0)),
    ((1200, 900), (1024, 768), (1024, 768), (0, 0)),
    ((2000, 1500), (1024, 768), (1024, 768), (0, 0)),
    ((1920, 1080), (1024, 576), (1024, 576), (0, 0)),
    ((1280, 720), (1024, 576), (1024, 576), (0, 0)),
    ((720, 1280), (576, 1024), (576, 1024), (0, 0)),
    ((1000, 500), (1024, 512), (1024, 512), (0, 0)),
    ((4000, 1000), (1024, 256), (1024, 256), (0, 0)),
    ((3000, 1000), (1024, 320), (1024, 341), (0, 10)),  # ratio 3: 3.2 is nearer than 2.667
    ((1000, 3000), (320, 1024), (341, 1024), (10, 0)),
    ((10000, 1000), (1024, 256), (2560, 256), (768, 0)),  # panorama: height matched, sides cropped
    ((1536, 1024), (1024, 704), (1056, 704), (16, 0)),  # 1.5: 1.4545 nearer than 1.6
    ((30000, 20000), (1024, 704), (1056, 704), (16, 0)),
    ((1100, 1000), (1024, 960), (1056, 960), (16, 0)),
    ((777, 555), (1024, 704), (1024, 731), (0, 13)),  # 555 * 1024 / 777 = 731.4
]

# bucket_no_upscale at 1024², step 64, by hand (see no_upscale_plan): (size) -> (bucket, resized, crop)
NO_UPSCALE = [
    ((512, 512), (512, 512), (512, 512), (0, 0)),
    ((1024, 1024), (1024, 1024), (1024, 1024), (0, 0)),
    ((500, 300), (448, 256), (500, 300), (26, 22)),
    ((700, 1100), (640, 1088), (700, 1100), (30, 6)),
    ((2048, 2048), (1024, 1024), (1024, 1024), (0, 0)),
    ((1030, 1030), (1024, 1024), (1024, 1024), (0, 0)),
    ((3000, 1000), (1728, 576), (1728, 576), (0, 0)),
    ((1000, 3000), (576, 1728), (576, 1728), (0, 0)),
    ((2000, 1000), (1408, 704), (1408, 704), (0, 0)),
    ((1500, 1000), (1216, 832), (1248, 832), (16, 0)),  # height-rounded candidate has the smaller aspect error
    ((10, 10), (64, 64), (64, 64), (0, 0)),  # §12.12 fix: would be (0, 0); clamped to one step and enlarged
    ((100, 40), (64, 64), (160, 64), (48, 0)),
]

# non-bucket mode at 512²: one bucket, same cover-resize + centre crop
SINGLE = [
    ((512, 512), (512, 512), (512, 512), (0, 0)),
    ((800, 600), (512, 512), (683, 512), (85, 0)),
    ((300, 400), (512, 512), (512, 683), (0, 85)),
    ((64, 64), (512, 512), (512, 512), (0, 0)),
]


@pytest.mark.parametrize("size,bucket,resized,crop", PREDEFINED)
def test_predefined_bucket_resize_crop(size, bucket, resized, crop):
    assert select_bucket(size, BUCKETS_1024) == bucket
    assert assign_bucket(size, resolution=(1024, 1024), enable_bucket=True, buckets=BUCKETS_1024) == (bucket, resized)
    plan = plan_resize(size, bucket, random_crop=False, rng=None)
    assert plan.resized_size == resized
    assert plan.crop_ltrb == (crop[0], crop[1], crop[0] + bucket[0], crop[1] + bucket[1])


@pytest.mark.parametrize("size,bucket,resized,crop", NO_UPSCALE)
def test_no_upscale_bucket_resize_crop(size, bucket, resized, crop):
    assert no_upscale_bucket(size, (1024, 1024), 64) == bucket
    got = assign_bucket(size, resolution=(1024, 1024), enable_bucket=True, bucket_no_upscale=True, step=64)
    assert got == (bucket, resized)
    plan = plan_resize(size, bucket, random_crop=False, rng=None, resized_size=resized)
    assert plan.crop_ltrb[:2] == crop and plan.bucket == bucket


@pytest.mark.parametrize("size,bucket,resized,crop", SINGLE)
def test_non_bucket_mode_cover_resizes(size, bucket, resized, crop):
    assert assign_bucket(size, resolution=(512, 512), enable_bucket=False) == (bucket, resized)
    assert plan_resize(size, bucket, random_crop=False, rng=None).crop_ltrb[:2] == crop


@pytest.mark.parametrize("resolution", [(1024, 1024), (512, 512), (768, 512)])
def test_bucket_choice_and_cover_resize_over_a_grid_of_sizes(resolution):
    """Beyond the hand-made table: for every size of a grid, the bucket is the first (in sorted order) with the
    smallest aspect error, computed here from the definition, and the resize covers it exactly on one side."""
    buckets = make_buckets(resolution, 256, 1024, 64)
    for width in range(40, 3000, 97):
        for height in range(40, 3000, 131):
            errors = [abs(bw / bh - width / height) for bw, bh in buckets]
            expected = (width, height) if (width, height) in buckets else buckets[errors.index(min(errors))]
            bucket, resized = assign_bucket((width, height), resolution=resolution, enable_bucket=True,
                                            buckets=buckets)
            assert bucket == expected, (width, height)
            assert resized[0] >= bucket[0] and resized[1] >= bucket[1], (width, height, resized)
            assert bucket[0] in (resized[0], resized[0] - 1) or bucket[1] in (resized[1], resized[1] - 1)


def test_non_bucket_resolution_must_suit_flux():
    with pytest.raises(DatasetError) as err:
        single_bucket((500, 500))
    assert err.value.key == "resolution"


def test_never_a_zero_bucket():
    for w in (1, 2, 7, 15, 63, 64, 65, 200):
        for h in (1, 3, 31, 64, 100):
            bucket = no_upscale_bucket((w, h), (512, 512), 16)
            assert bucket[0] >= 16 and bucket[1] >= 16 and bucket[0] % 16 == 0 and bucket[1] % 16 == 0


def test_random_crop_offsets_from_rng():
    plan = plan_resize((10000, 1000), (1024, 256), random_crop=True, rng=random.Random(7))
    left = random.Random(7).randint(0, 2560 - 1024)
    assert plan.crop_ltrb == (left, 0, left + 1024, 256)
    both = plan_resize((300, 300), (256, 128), random_crop=True, rng=random.Random(1), resized_size=(300, 300))
    replica = random.Random(1)
    x, y = replica.randint(0, 44), replica.randint(0, 172)
    assert both.crop_ltrb == (x, y, x + 256, y + 128)


# ------------------------------------------------------------------------------------------ prepare_image


def _img(array: np.ndarray, alpha: np.ndarray | None = None) -> LoadedImage:
    return LoadedImage(rgb=array, alpha=alpha, path=Path("x.png"))


def _prep(img, bucket, **kw):
    args = dict(interpolation=None, random_crop=False, flip=False, color_aug=False, rng=random.Random(0),
                alpha_mask=False)
    args.update(kw)
    return prepare_image(img, bucket, **args)


def test_pixels_are_x_over_127_5_minus_1():
    array = np.arange(48 * 32 * 3, dtype=np.int64).reshape(32, 48, 3).astype(np.uint8)
    out = _prep(_img(array), (48, 32))
    assert out.pixels.shape == (3, 32, 48) and out.pixels.dtype == torch.float32
    expected = torch.from_numpy(array.astype(np.float32)).permute(2, 0, 1) / 127.5 - 1
    assert torch.equal(out.pixels, expected)
    assert out.pixels.min() >= -1 and out.pixels.max() <= 1


def test_default_filter_is_area_when_shrinking_lanczos_when_enlarging(helpers):
    array = helpers.gradient(96, 64)
    small = _prep(_img(array), (48, 32))
    box = np.asarray(Image.fromarray(array).resize((48, 32), Image.Resampling.BOX))
    assert torch.equal(small.pixels, torch.from_numpy(box.astype(np.float32)).permute(2, 0, 1) / 127.5 - 1)
    big = _prep(_img(array), (192, 128))
    lanczos = np.asarray(Image.fromarray(array).resize((192, 128), Image.Resampling.LANCZOS))
    assert torch.equal(big.pixels, torch.from_numpy(lanczos.astype(np.float32)).permute(2, 0, 1) / 127.5 - 1)
    nearest = _prep(_img(array), (48, 32), interpolation="nearest")
    near = np.asarray(Image.fromarray(array).resize((48, 32), Image.Resampling.NEAREST))
    assert torch.equal(nearest.pixels, torch.from_numpy(near.astype(np.float32)).permute(2, 0, 1) / 127.5 - 1)


def test_unknown_interpolation_is_named(helpers):
    with pytest.raises(DatasetError) as err:
        _prep(_img(helpers.gradient(64, 64)), (32, 32), interpolation="hamming")
    assert err.value.key == "resize_interpolation"


def test_alpha_mask_stays_aligned_with_pixels():
    """§12.14: an off-aspect image whose alpha equals its red channel must keep them equal after prepare."""
    rng = np.random.default_rng(0)
    red = (rng.random((90, 200)) > 0.5).astype(np.uint8) * 255
    array = np.stack([red, np.zeros_like(red), np.zeros_like(red)], axis=2)
    for flip in (False, True):
        out = _prep(_img(array, alpha=red.copy()), (64, 48), alpha_mask=True, flip=flip)
        assert out.alpha_mask.shape == (1, 48, 64)
        red_out = ((out.pixels[0] + 1) * 127.5).round()
        assert torch.equal(red_out, (out.alpha_mask[0] * 255).round())


def test_alpha_mask_all_ones_without_alpha(helpers):
    out = _prep(_img(helpers.gradient(40, 40)), (32, 32), alpha_mask=True)
    assert torch.equal(out.alpha_mask, torch.ones(1, 32, 32))
    assert _prep(_img(helpers.gradient(40, 40)), (32, 32)).alpha_mask is None


def test_flip_is_a_horizontal_mirror(helpers):
    img = _img(helpers.gradient(50, 40), alpha=helpers.gradient(50, 40)[:, :, 0].copy())
    plain = _prep(img, (32, 32), alpha_mask=True)
    flipped = _prep(img, (32, 32), alpha_mask=True, flip=True)
    assert flipped.flipped and torch.equal(flipped.pixels, plain.pixels.flip(-1))
    assert torch.equal(flipped.alpha_mask, plain.alpha_mask.flip(-1))


def test_flip_aug_draws_from_rng(helpers):
    img = _img(helpers.gradient(32, 32))
    for seed in range(10):
        out = _prep(img, (32, 32), flip_aug=True, rng=random.Random(seed))
        assert out.flipped == (random.Random(seed).random() < 0.5)


def test_color_aug_gamma_and_hue_replica(helpers):
    array = helpers.gradient(16, 16)
    seen = set()
    for seed in range(40):
        rng = random.Random(seed)
        out = color_augment(array, random.Random(seed))
        if rng.random() > 0.33:
            assert np.array_equal(out, array)
            seen.add("none")
        elif rng.random() > 0.5:
            shift = round(rng.uniform(-8, 8) * 256 / 180)  # Pillow hue units
            hsv_in = np.asarray(Image.fromarray(array).convert("HSV")).astype(int)
            hsv_out = np.asarray(Image.fromarray(out).convert("HSV")).astype(int)
            saturated = hsv_in[:, :, 1] > 128  # hue is well defined there
            if shift:
                diff = (hsv_out[:, :, 0] - hsv_in[:, :, 0] - shift + 128) % 256 - 128
                assert np.median(np.abs(diff[saturated])) <= 2
            seen.add("hue")
        else:
            gamma = rng.uniform(0.95, 1.05)
            expected = np.clip(np.floor(255.0 * (array / 255.0) ** gamma + 0.5), 0, 255).astype(np.uint8)
            assert np.array_equal(out, expected)
            seen.add("gamma")
    assert seen == {"none", "hue", "gamma"}


def test_hue_shift_keeps_grey_grey():
    grey = np.full((8, 8, 3), 120, np.uint8)
    for seed in range(40):
        assert np.abs(color_augment(grey, random.Random(seed)).astype(int) - 120).max() <= 3
