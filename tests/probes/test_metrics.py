"""Image metrics against hand-computed values and direct (loop / library) references."""

from __future__ import annotations

import imagehash
import numpy as np
import pytest
from PIL import Image
from skimage.metrics import structural_similarity

from dpdiff.probes import metrics as M


def _images(rng, n, h=16, w=16):
    return rng.random((n, h, w, 3))


def _ref_tiled_l2(a, b, grid):
    """Independent reference: tile edges computed by hand (the first side % grid tiles are 1 larger)."""

    def edges(n):
        base, extra = divmod(n, grid)
        sizes = [base + 1 if t < extra else base for t in range(grid)]
        return [(sum(sizes[:t]), sum(sizes[: t + 1])) for t in range(grid)]

    worst = 0.0
    for r0, r1 in edges(a.shape[0]):
        for c0, c1 in edges(a.shape[1]):
            diff = a[r0:r1, c0:c1].astype(np.float64) - b[r0:r1, c0:c1]
            worst = max(worst, float(np.sqrt(np.sum(diff**2) / diff.size)))
    return worst


def test_identical_images_give_zero_distance_and_full_similarity():
    rng = np.random.default_rng(0)
    for h in (8, 32):
        a = rng.random((h, h, 3))
        assert M.l2(a, a.copy()) == 0.0
        assert M.tiled_l2(a, a.copy()) == 0.0
        assert M.ssim(a, a.copy()) == pytest.approx(1.0)
        assert M.phash_distance(a, a.copy()) == 0


def test_known_values_and_why_tiles_matter():
    a = np.zeros((32, 32, 3))
    assert M.l2(a, a + 0.5) == pytest.approx(0.5)
    b = a.copy()
    b[:8, :8] = 0.4  # one of the 16 tiles differs by 0.4
    assert M.tiled_l2(a, b, grid=4) == pytest.approx(0.4)
    assert M.l2(a, b) == pytest.approx(0.4 / 4)  # sqrt(0.16 / 16)
    assert M.tiled_l2(a, b, grid=1) == pytest.approx(M.l2(a, b))


def test_independent_uniform_noise_is_far_apart():
    rng = np.random.default_rng(1)
    a, b = rng.random((2, 64, 64, 3))
    assert M.l2(a, b) == pytest.approx(np.sqrt(1 / 6), abs=0.01)  # E(U - U')^2 = 1/6
    assert M.tiled_l2(a, b) > 0.15


def test_horizontal_flip_is_a_copy_under_min_over_flips():
    rng = np.random.default_rng(2)
    a = rng.random((12, 12, 3))
    b = a[:, ::-1]
    assert M.l2(a, b) > 0.2
    assert M.min_over_flips(M.l2, a, b) == 0.0
    assert M.min_over_flips(M.tiled_l2, a, b) == 0.0
    assert isinstance(M.min_over_flips(M.l2, a, b), float)
    # batches: the width axis of N x H x W x C
    batch = rng.random((4, 12, 12, 3))
    flipped = batch[:, :, ::-1]
    d = M.min_over_flips(M.cross_l2, batch, flipped)
    assert d.shape == (4, 4)
    np.testing.assert_allclose(np.diag(d), 0.0, atol=1e-6)
    assert np.all(d[~np.eye(4, dtype=bool)] > 0.2)


@pytest.mark.parametrize("shape,grid", [((16, 16), 4), ((10, 13), 4), ((9, 7), 3), ((8, 8), 8)])
def test_tiled_l2_matches_hand_tiling(shape, grid):
    rng = np.random.default_rng(3)
    a, b = rng.random((2, *shape, 3))
    assert M.tiled_l2(a, b, grid=grid) == pytest.approx(_ref_tiled_l2(a, b, grid), rel=1e-12)


@pytest.mark.parametrize("chunk_size", [None, 1, 3])
def test_cross_matrices_agree_with_scalar_functions(chunk_size):
    rng = np.random.default_rng(4)
    gen = _images(rng, 5, 10, 14).astype(np.float32)
    train = _images(rng, 7, 10, 14)
    cl2 = M.cross_l2(gen, train, chunk_size=chunk_size)
    ctl2 = M.cross_tiled_l2(gen, train, grid=3, chunk_size=chunk_size)
    assert cl2.shape == ctl2.shape == (5, 7)
    for i, j in [(0, 0), (1, 6), (4, 3), (2, 2)]:
        assert cl2[i, j] == pytest.approx(M.l2(gen[i], train[j]), abs=1e-7)
        assert ctl2[i, j] == pytest.approx(_ref_tiled_l2(gen[i], train[j], 3), abs=1e-7)
    assert np.all(ctl2 >= cl2 - 1e-9)  # the max over tiles is at least the RMS over the image


def test_pairwise_tiled_l2_is_symmetric_with_zero_diagonal():
    rng = np.random.default_rng(5)
    imgs = _images(rng, 9, 12, 12)
    imgs[3] = imgs[1]  # an exact duplicate
    d = M.pairwise_tiled_l2(imgs, grid=4, chunk_size=4)
    assert d.shape == (9, 9)
    assert np.array_equal(d, d.T)
    assert np.all(np.diag(d) == 0.0)
    assert d[1, 3] == pytest.approx(0.0, abs=1e-6)
    for i, j in [(0, 1), (2, 8), (5, 7)]:
        assert d[i, j] == pytest.approx(_ref_tiled_l2(imgs[i], imgs[j], 4), abs=1e-7)


def test_cross_handles_empty_sets():
    rng = np.random.default_rng(6)
    assert M.cross_l2(np.zeros((0, 8, 8, 3)), _images(rng, 3, 8, 8)).shape == (0, 3)


@pytest.mark.parametrize("side", [3, 5, 8, 32])
def test_ssim_on_small_images_matches_skimage(side):
    rng = np.random.default_rng(7)
    a = rng.random((side, side, 3))
    b = np.clip(a + 0.1 * rng.standard_normal(a.shape), 0, 1)
    win = min(7, side if side % 2 else side - 1)
    expected = structural_similarity(a, b, win_size=win, channel_axis=-1, data_range=1.0)
    assert M.ssim(a, b) == pytest.approx(expected)
    assert M.ssim(a, b) < 1.0


def test_ssim_rejects_images_too_small_for_any_window():
    with pytest.raises(ValueError, match="3 x 3"):
        M.ssim(np.zeros((2, 2, 3)), np.zeros((2, 2, 3)))


def test_phash_distance_matches_imagehash_on_uint8_rgb():
    rng = np.random.default_rng(8)
    a, b = rng.random((2, 32, 32, 3))
    pa = Image.fromarray(np.round(a * 255).astype(np.uint8), "RGB")
    pb = Image.fromarray(np.round(b * 255).astype(np.uint8), "RGB")
    expected = imagehash.phash(pa) - imagehash.phash(pb)
    got = M.phash_distance(a, b)
    assert isinstance(got, int)
    assert got == expected > 0


def test_to_float_images_round_trip():
    rng = np.random.default_rng(9)
    u8 = rng.integers(0, 256, size=(2, 6, 5, 3), dtype=np.uint8)
    arr = M.to_float_images([Image.fromarray(x, "RGB") for x in u8])
    assert arr.shape == (2, 6, 5, 3) and arr.dtype == np.float32
    np.testing.assert_allclose(arr * 255, u8, atol=1e-4)
    with pytest.raises(ValueError, match="differ in size"):
        M.to_float_images([Image.fromarray(u8[0]), Image.fromarray(u8[0][:5])])


def test_inputs_are_validated():
    a = np.zeros((8, 8, 3))
    with pytest.raises(ValueError, match="uint8"):
        M.l2(a.astype(np.uint8), a)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        M.l2(a + 255.0, a)
    with pytest.raises(ValueError, match="shapes differ"):
        M.l2(a, np.zeros((8, 9, 3)))
    with pytest.raises(ValueError, match="grid"):
        M.tiled_l2(a, a, grid=9)
    with pytest.raises(ValueError, match="chunk_size"):
        M.cross_l2(a[None], a[None], chunk_size=0)
