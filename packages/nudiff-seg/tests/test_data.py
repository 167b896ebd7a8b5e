"""Windows, augmentation, real/synthetic mixing and the checks on dataset folders."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from nudiff_postproc import synthetic_instance_map, write_image, write_instance_map
from nudiff_seg import Augment, MixedBatches, load_tiles, window_origins
from nudiff_seg._data import _CV_GAUSSIAN, Tiles, _blur_median_or_noise, _mirror, _shift_hue, affine_source, cut_window


def _tiles(folder, n, size, seed=0):
    rng = np.random.default_rng(seed)
    images, maps = [], []
    for i in range(n):
        inst = synthetic_instance_map((size, size), n_nuclei=20, seed=seed + i)
        image = np.where(inst[..., None] > 0, 90, 220).astype(np.uint8) + rng.integers(
            0, 20, (size, size, 3), dtype=np.uint8
        )
        images.append(image)
        maps.append(inst)
    return Tiles(folder, [f"t{i}" for i in range(n)], images, maps)


def _patch_extractor_origins(length, win, step, mirror):
    """Window starts of HoVer-Net's PatchExtractor along one axis (misc/patch_extractor.py:
    ``mirror`` pads by ``(win - step) // 2`` first; then windows at ``step`` while they fit,
    plus one flush with the end when they do not end there), in unpadded coordinates."""
    pad = (win - step) // 2 if mirror else 0
    length += (win - step) if mirror else 0
    last = (math.floor((length - win) / step) + 1) * step
    starts = list(range(0, last, step)) + ([length - win] if (length - win) % step else [])
    return [s - pad for s in starts]


@pytest.mark.parametrize("windows", ["mirror", "valid"])
@pytest.mark.parametrize(("input_size", "output_size"), [(256, 164), (270, 80)])
def test_window_origins_are_hovernets_patches_and_cover_the_image(windows, input_size, output_size):
    margin = (input_size - output_size) // 2
    for shape in [(1000, 1000), (256, 300), (420, 256), (270, 500)]:
        if windows == "valid" and min(shape) < input_size:
            continue  # no valid window (training refuses such tiles)
        origins = window_origins(shape, input_size, output_size, windows=windows)
        expected = [_patch_extractor_origins(length, input_size, output_size, windows == "mirror") for length in shape]
        assert sorted(map(tuple, origins.tolist())) == sorted((r, c) for r in expected[0] for c in expected[1])
        for rng in (None, np.random.default_rng(3)):
            origins = window_origins(shape, input_size, output_size, rng, windows=windows)
            covered = np.zeros(shape, bool)
            for r, c in origins:
                low, high = (-margin, margin) if windows == "mirror" else (0, 0)
                assert low <= r <= shape[0] - input_size + high and low <= c <= shape[1] - input_size + high
                covered[r + margin : r + margin + output_size, c + margin : c + margin + output_size] = True
            if windows == "mirror":  # every pixel is the output of some window
                assert covered.all()
            else:  # every pixel except the outer band
                assert covered[margin:-margin, margin:-margin].all() and not covered[:margin].any()
    # a tile one output region wide has one mirror window, its output the tile itself
    assert window_origins((164, 200), 256, 164, windows="mirror").tolist() == [[-46, -46], [-46, -10]]
    with pytest.raises(ValueError, match=r"an image of \(163, 300\) px has no mirror window: .* >= 164"):
        window_origins((163, 300), 256, 164, windows="mirror")
    with pytest.raises(ValueError, match=r"an image of \(255, 300\) px has no valid window: .* >= 256"):
        window_origins((255, 300), 256, 164, windows="valid")
    with pytest.raises(ValueError, match="`windows` must be one of \\('mirror', 'valid'\\), got 'same'"):
        window_origins((300, 300), 256, 164, windows="same")


def test_a_window_beyond_the_tile_shows_it_mirrored(tmp_path):
    tiles = _tiles(tmp_path, 1, 256)
    image, np_t, _ = cut_window(tiles, 0, (-46, 46), 256, 164, None, np.random.default_rng(0))
    padded = np.pad(tiles.images[0], ((46, 46), (46, 46), (0, 0)), mode="reflect")  # HoVer-Net's padding
    np.testing.assert_array_equal(image, padded[0:256, 92:348])
    # the output region is the tile's own rows 0..163 and columns 92..255
    np.testing.assert_array_equal(np_t > 0, tiles.maps[0][:164, 92:] > 0)


def test_mixing_by_ratio_and_by_pool(tmp_path):
    real, synthetic = _tiles(tmp_path / "r", 3, 256), _tiles(tmp_path / "s", 5, 256, seed=10)
    mixed = MixedBatches(real, synthetic, ratio=0.5, batch=4, input_size=256, output_size=164, augment=None)
    plan = mixed.epoch(np.random.default_rng(0))
    # every real window once (valid: one per 256 px tile); each batch half synthetic
    assert sorted(i for b in plan for t, i, _ in b if t is real) == [0, 1, 2]
    assert all(sum(t is synthetic for t, _, _ in b) == 2 for b in plan)
    pooled = MixedBatches(real, synthetic, ratio="pool", batch=4, input_size=256, output_size=164, augment=None)
    flat = [w for b in pooled.epoch(np.random.default_rng(0)) for w in b]
    # the synthetic tiles cut by mirror: 2 x 2 each, HoVer-Net's patches, the same every epoch
    assert len(flat) == 3 + 5 * 4 and sum(t is synthetic for t, _, _ in flat) == 20
    again = {tuple(o) for b in pooled.epoch(np.random.default_rng(1)) for t, i, o in b if t is synthetic and i == 0}
    assert again == {(-46, -46), (-46, 46), (46, -46), (46, 46)}
    sizes = {"batch": 4, "input_size": 256, "output_size": 164, "augment": None}
    swapped = MixedBatches(real, synthetic, ratio="pool", windows="mirror", synthetic_windows="valid", **sizes)
    flat = [w for b in swapped.epoch(np.random.default_rng(0)) for w in b]
    assert len(flat) == 3 * 4 + 5 and sum(t is synthetic for t, _, _ in flat) == 5
    with pytest.raises(ValueError, match="`synthetic_windows` must be one of"):
        MixedBatches(real, synthetic, ratio="pool", synthetic_windows="same", **sizes)
    with pytest.raises(ValueError, match="must be in \\[0, 1\\) or 'pool', got 1.5"):
        MixedBatches(real, synthetic, ratio=1.5, batch=4, input_size=256, output_size=164, augment=None)
    for ratio, batch in ((0.6, 1), (0.9, 4), (0.75, 2)):  # rounds to a whole batch of synthetic windows
        with pytest.raises(ValueError, match=f"`--synthetic-ratio` {ratio} of a batch of {batch} leaves no real"):
            MixedBatches(real, synthetic, ratio=ratio, batch=batch, input_size=256, output_size=164, augment=None)


def test_ids_past_int32_are_compacted_not_wrapped(tmp_path):
    inst = np.zeros((64, 64), np.int64)
    inst[4:20, 4:20] = 7
    inst[30:50, 30:50] = 2**32 + 7  # would wrap onto 7 as int32
    inst[52:60, 2:10] = 3_000_000_000  # would turn negative
    write_image(tmp_path / "images" / "a.png", np.full((64, 64, 3), 200, np.uint8))
    write_instance_map(tmp_path / "instance_maps" / "a.npy", inst)
    (got,) = load_tiles(tmp_path).maps
    assert got.dtype == np.int32 and sorted(np.unique(got).tolist()) == [0, 1, 2, 3]
    for a, b in ((7, 1), (3_000_000_000, 2), (2**32 + 7, 3)):  # the same nuclei, in id order
        np.testing.assert_array_equal(inst == a, got == b)


def test_augmented_windows_keep_image_and_targets_aligned(tmp_path):
    tiles = _tiles(tmp_path, 1, 300)
    rng = np.random.default_rng(5)
    aug = Augment()
    for _ in range(4):
        image, np_t, hv_t = cut_window(tiles, 0, (20, 30), 256, 164, aug, rng)
        assert image.dtype == np.uint8 and image.shape == (256, 256, 3)
        assert np_t.shape == (164, 164) and hv_t.shape == (164, 164, 2)
        # nuclei are the dark pixels of these images, whatever the transform
        dark = image[46:210, 46:210].mean(axis=-1) < 160
        assert (dark == (np_t > 0)).mean() > 0.97


def test_folder_checks_name_the_file(tmp_path):
    inst = synthetic_instance_map((64, 64), n_nuclei=5, seed=0)
    write_image(tmp_path / "d" / "images" / "a.png", np.zeros((64, 64, 3), np.uint8))
    write_instance_map(tmp_path / "d" / "instance_maps" / "a.png", inst)
    write_image(tmp_path / "d" / "images" / "b.png", np.zeros((64, 64, 3), np.uint8))
    with pytest.raises(ValueError, match="1 image\\(s\\) have no instance map"):
        load_tiles(tmp_path / "d")
    write_instance_map(tmp_path / "d" / "instance_maps" / "b.png", inst[:32])
    with pytest.raises(ValueError, match="b.png' is \\(64, 64\\) but its instance map .* is \\(32, 64\\)"):
        load_tiles(tmp_path / "d")
    assert load_tiles(tmp_path / "d", names=["a"]).names == ["a"]
    with pytest.raises(ValueError, match="no image for 1 listed name"):
        load_tiles(tmp_path / "d", names=["a", "zz"])
    with pytest.raises(ValueError, match="a.png' is 64x64; the model's input window needs 256x256"):
        load_tiles(tmp_path / "d", names=["a"], min_size=256)


def _rgba(alpha):
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 4), dtype=np.uint8)
    pixels[..., 3] = alpha
    return pixels


@pytest.mark.parametrize("suffix", [".png", ".tif"])
@pytest.mark.parametrize(
    ("pixels", "message"),
    [
        (np.zeros((64, 64), np.uint8), "is a grayscale image of shape \\(64, 64\\)"),
        (_rgba(200), "has an alpha channel that is not opaque at 4096 pixel"),
    ],
)
def test_grayscale_and_translucent_images_are_refused_in_any_format(tmp_path, suffix, pixels, message):
    import imageio.v3 as iio
    import tifffile

    (tmp_path / "images").mkdir()
    path = tmp_path / "images" / f"a{suffix}"
    iio.imwrite(path, pixels) if suffix == ".png" else tifffile.imwrite(path, pixels)
    write_instance_map(tmp_path / "instance_maps" / "a.png", synthetic_instance_map((64, 64), n_nuclei=5, seed=0))
    with pytest.raises(ValueError, match=f"a\\{suffix}' {message}"):
        load_tiles(tmp_path)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_an_opaque_alpha_channel_is_dropped(tmp_path, suffix):
    """CoNSeP's PNG images are RGBA with alpha 255 everywhere; HoVer-Net (cv2.imread) reads the RGB."""
    import imageio.v3 as iio
    import tifffile

    pixels = _rgba(255)
    (tmp_path / "images").mkdir()
    path = tmp_path / "images" / f"a{suffix}"
    iio.imwrite(path, pixels) if suffix == ".png" else tifffile.imwrite(path, pixels)
    write_instance_map(tmp_path / "instance_maps" / "a.png", synthetic_instance_map((64, 64), n_nuclei=5, seed=0))
    np.testing.assert_array_equal(load_tiles(tmp_path).images[0], pixels[..., :3])


def test_a_corrupt_image_is_named(tmp_path):
    (tmp_path / "images").mkdir()
    write_image(tmp_path / "images" / "a.png", np.zeros((64, 64, 3), np.uint8))
    data = (tmp_path / "images" / "a.png").read_bytes()
    (tmp_path / "images" / "a.png").write_bytes(data[: len(data) // 2])
    write_instance_map(tmp_path / "instance_maps" / "a.png", synthetic_instance_map((64, 64), n_nuclei=5, seed=0))
    with pytest.raises(ValueError, match="a.png"):
        load_tiles(tmp_path)


def test_stain_jitter_is_skimages_hed_jitter_without_its_clipping():
    from nudiff_seg._data import _jitter_stains
    from skimage.color import hed2rgb, hed_from_rgb, rgb2hed

    rng = np.random.default_rng(0)
    x = rng.uniform(0.05, 1.0, (64, 64, 3)).astype(np.float32)  # any colour: many negative stains
    hed = rgb2hed(x)
    assert (hed == 0).any(axis=-1).mean() > 0.3  # rgb2hed clipped them
    # no jitter gives back the image (hed2rgb(rgb2hed(x)) does not)
    np.testing.assert_allclose(_jitter_stains(x, np.random.default_rng(1), 1e-12), x, atol=1e-5)
    assert np.abs(hed2rgb(hed) - x).max() > 0.1
    # where no stain is clipped, the jitter is scikit-image's: hed2rgb(hed * scale + shift)
    sigma = 0.05
    draws = np.random.default_rng(2)
    scale, shift = 1.0 + draws.normal(0.0, sigma, 3), draws.normal(0.0, sigma, 3)
    got = _jitter_stains(x, np.random.default_rng(2), sigma)
    unclipped_stains = np.log(np.maximum(x, 1e-6)) / np.log(1e-6) @ hed_from_rgb
    shift = shift * np.abs(unclipped_stains).reshape(-1, 3).mean(axis=0)
    expected = np.clip(hed2rgb(hed * scale + shift), 0, 1)
    unclipped = (hed > 0).all(axis=-1)
    assert unclipped.sum() > 100
    np.testing.assert_allclose(got[unclipped], expected[unclipped], atol=1e-5)


def test_name_lists_keep_names_with_spaces_and_hashes(tmp_path):
    from nudiff_seg import read_name_list

    (tmp_path / "subset.txt").write_text("#1_r00000_c00000\nslide#1_r00000_c00000\n\n  my tile 2  \n")
    assert read_name_list(tmp_path / "subset.txt") == ["#1_r00000_c00000", "slide#1_r00000_c00000", "my tile 2"]
    (tmp_path / "utf16.txt").write_text("a\nb\n", encoding="utf-16")
    with pytest.raises(ValueError, match="utf16.txt' is not UTF-8 text"):
        read_name_list(tmp_path / "utf16.txt")
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(ValueError, match="empty.txt' names nothing; expected one name per line"):
        read_name_list(tmp_path / "empty.txt")
    with pytest.raises(FileNotFoundError, match="subset list not found"):
        read_name_list(tmp_path / "none.txt")


@pytest.mark.parametrize("size", [6, 7])
def test_affine_source_of_the_identity_and_of_a_quarter_turn(size):
    window = np.arange(20 * 30).reshape(20, 30)[3 : 3 + size, 5 : 5 + size]
    rows, cols = affine_source((20, 30), (3, 5), size, np.eye(2), np.zeros(2))
    np.testing.assert_array_equal(np.arange(20 * 30).reshape(20, 30)[rows, cols], window)
    # source = centre + (-d_col, d_row): a clockwise quarter turn about the window's centre
    quarter = np.array([[0.0, -1.0], [1.0, 0.0]])
    rows, cols = affine_source((20, 30), (3, 5), size, quarter, np.zeros(2))
    np.testing.assert_array_equal(np.arange(20 * 30).reshape(20, 30)[rows, cols], np.rot90(window, -1))
    # a shift moves the window's centre in the image
    rows, cols = affine_source((20, 30), (3, 5), size, np.eye(2), np.array([2.0, -1.0]))
    np.testing.assert_array_equal(
        np.arange(20 * 30).reshape(20, 30)[rows, cols], np.arange(20 * 30).reshape(20, 30)[5 : 5 + size, 4 : 4 + size]
    )


@pytest.mark.parametrize("length", [1, 2, 5])
def test_mirror_is_numpys_reflect_padding(length):
    pad = 4 * length + 3
    index = np.arange(-pad, length + pad)
    padded = np.pad(np.arange(length), pad, mode="reflect") if length > 1 else np.zeros(length + 2 * pad, int)
    np.testing.assert_array_equal(_mirror(index, length), padded[index + pad])


def test_drawn_affine_transforms_stay_in_hovernets_ranges():
    rng = np.random.default_rng(0)
    for _ in range(200):
        matrix, shift = Augment().draw_affine(256, rng)
        forward = np.linalg.inv(matrix)
        singular = np.linalg.svd(forward, compute_uv=False)  # the axes' scales, sheared a little
        assert 0.8 * 0.95 <= singular.min() and singular.max() <= 1.2 / 0.95
        assert np.all(np.abs(shift) <= 0.01 * 256)
    rotation_only = Augment(scale=0.0, shear=0.0, translate=0.0)
    for _ in range(20):
        matrix, shift = rotation_only.draw_affine(256, rng)
        np.testing.assert_allclose(matrix @ matrix.T, np.eye(2), atol=1e-12)
        assert np.linalg.det(matrix) == pytest.approx(1.0) and not shift.any()
    assert not Augment(scale=0.0, shear=0.0, rotate=0.0, translate=0.0).affine


def test_affine_windows_reach_beyond_the_tile_by_mirroring():
    """A window at the tile's corner, turned 45 degrees: its corners lie outside the tile and
    show the mirrored tile."""
    turn = np.deg2rad(45.0)
    matrix = np.array([[np.cos(turn), -np.sin(turn)], [np.sin(turn), np.cos(turn)]])
    rows, cols = affine_source((256, 256), (0, 0), 256, matrix, np.zeros(2))
    assert rows.min() >= 0 and rows.max() <= 255 and cols.min() >= 0 and cols.max() <= 255
    # the top-right corner's source lies about 53 px above the tile: mirrored back inside
    centre = 127.5
    raw_row = centre + matrix[0] @ np.array([-centre, centre])
    assert raw_row < -50 and rows[0, -1] == round(-raw_row)


def test_opencvs_small_gaussian_kernels_are_binomial():
    from math import comb

    for k, kernel in _CV_GAUSSIAN.items():
        np.testing.assert_array_equal(kernel, [comb(k - 1, i) / 2 ** (k - 1) for i in range(k)])


def test_hue_turns_around_the_colour_circle():
    """In 8-bit HSV, as HoVer-Net's OpenCV: a turn rounds to 1/256 (1.4 degrees) and the
    channels to 1/255."""
    rgb = np.array([[[1.0, 0.0, 0.0], [0.2, 0.6, 0.4]]], np.float32)
    np.testing.assert_allclose(_shift_hue(rgb, 1 / 3)[0, 0], [0.0, 1.0, 0.0], atol=3 / 255)  # red -> green
    np.testing.assert_allclose(_shift_hue(rgb, 1.0), rgb, atol=1 / 255)
    turned = _shift_hue(rgb, 0.1)[0, 1]  # value and saturation stay: the largest and smallest channel
    assert turned.max() == pytest.approx(0.6, abs=1 / 255) and turned.min() == pytest.approx(0.2, abs=2 / 255)


def test_blur_median_and_noise_each_keep_a_flat_image_flat_but_the_noise():
    flat = np.full((32, 32, 3), 0.5, np.float32)
    kinds = set()
    for seed in range(30):
        out = _blur_median_or_noise(flat, np.random.default_rng(seed), 0.05)
        assert out.shape == flat.shape and out.dtype == np.float32
        kinds.add("noise" if not np.array_equal(out, flat) else "filter")
        assert np.abs(out - 0.5).max() < 0.05 * 6  # noise of sd <= 0.05
    assert kinds == {"noise", "filter"}


def _only(**on) -> Augment:
    """An Augment with every part off but ``on``."""
    off = dict(scale=0, shear=0, rotate=0, translate=0, dihedral=False, hed_sigma=0, blur_noise=False)
    return Augment(**{**off, "hue": 0, "saturation": 0, "brightness": 0, "contrast": 0, **on})


def test_augment_with_nothing_on_gives_the_window_back(tmp_path):
    tiles = _tiles(tmp_path, 1, 300)
    none = _only()
    image, _, _ = cut_window(tiles, 0, (20, 30), 256, 164, none, np.random.default_rng(0))
    np.testing.assert_array_equal(image, tiles.images[0][20:276, 30:286])


class _HighestDraws:
    """A generator stand-in whose uniform draws are the top of their range."""

    def uniform(self, low, high, size=None):
        return np.full(size, high, float) if size is not None else float(high)


def test_a_drawn_scale_of_1_2_magnifies_the_window():
    """Each axis scaled by 1.2: the window shows 1/1.2 of its side of the tile."""
    matrix, shift = Augment(shear=0.0, rotate=0.0, translate=0.0).draw_affine(256, _HighestDraws())
    np.testing.assert_allclose(matrix, np.eye(2) / 1.2, atol=1e-12)
    rows, cols = affine_source((1000, 1000), (300, 300), 256, matrix, shift)
    assert rows.max() - rows.min() == pytest.approx(255 / 1.2, abs=1) and cols.max() - cols.min() == pytest.approx(
        255 / 1.2, abs=1
    )


def test_augmented_hue_moves_by_at_most_hovernets_8_units():
    from skimage.color import rgb2hsv

    tiles = Tiles(
        None, ["red"], [np.tile(np.array([200, 40, 40], np.uint8), (256, 256, 1))], [np.zeros((256, 256), np.int32)]
    )
    hue_only = _only(hue=8.0)
    rng, shifts = np.random.default_rng(0), []
    for _ in range(100):
        image, _, _ = cut_window(tiles, 0, (0, 0), 256, 164, hue_only, rng)
        hue = rgb2hsv(image[:1, :1] / 255.0)[0, 0, 0]
        shifts.append(min(hue, 1 - hue))  # red sits at hue 0
    assert max(shifts) <= 8 / 180 + 2e-3 and max(shifts) > 0.9 * 8 / 180  # 8 OpenCV units: 16 degrees


def test_a_synthetic_share_that_a_batch_cannot_keep_is_refused_by_name():
    from nudiff_seg import check_synthetic_ratio

    for ratio, batch in (("pool", 1), (0, 4), (0.5, 4), (0.25, 4), (0.7, 4)):  # 0.7 of 4: 3 synthetic, 1 real
        check_synthetic_ratio(ratio, batch)
    for ratio, batch, message in (
        (1.0, 4, "`--synthetic-ratio` must be in [0, 1) or 'pool', got 1.0"),
        (True, 4, "got True"),
        ("half", 4, "got 'half'"),
        (0.1, 4, "`--synthetic-ratio` 0.1 of a batch of 4 is no synthetic window"),
        (0.9, 4, "0.9 of a batch of 4 leaves no real window (it rounds to 4 synthetic)"),
    ):
        with pytest.raises(ValueError, match=re.escape(message)):
            check_synthetic_ratio(ratio, batch)
    with pytest.raises(ValueError, match=re.escape("runs[0].synthetic_ratio 0.1 of a batch of 2")):
        check_synthetic_ratio(0.1, 2, "runs[0].synthetic_ratio")
