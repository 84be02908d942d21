"""Tile grids cover every pixel, overlap as asked, and write regions partition the image."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from ldiffusion.core.errors import InputError
from ldiffusion.infer.tiling import gaussian_weight, tile_grid, tile_starts


@pytest.mark.parametrize(
    ("w", "h", "tile", "overlap"),
    [(1000, 600, 512, 64), (512, 512, 512, 0), (100, 50, 64, 16), (37, 300, 64, 63), (4096, 4096, 512, 64)],
)
def test_grid_covers_and_write_regions_partition(w, h, tile, overlap):
    tiles = tile_grid(w, h, tile, overlap)
    cover = np.zeros((h, w), np.int32)
    own = np.zeros((h, w), np.int32)
    for t in tiles:
        cover[t.y : t.y + t.h, t.x : t.x + t.w] += 1
        own[t.write_y : t.write_y + t.write_h, t.write_x : t.write_x + t.write_w] += 1
        # the write region lies inside the read region
        assert t.x <= t.write_x and t.write_x + t.write_w <= t.x + t.w
        assert t.y <= t.write_y and t.write_y + t.write_h <= t.y + t.h
    assert (cover >= 1).all()
    assert (own == 1).all()
    assert [t.index for t in tiles] == list(range(len(tiles)))
    ys = [t.y for t in tiles]
    assert ys == sorted(ys)


def test_tiles_inside_image_and_overlap():
    tiles = tile_grid(1000, 1000, 256, 32)
    xs = sorted({t.x for t in tiles})
    assert xs[0] == 0 and xs[-1] == 1000 - 256
    assert all(b - a <= 256 - 32 for a, b in itertools.pairwise(xs))


def test_small_image_single_tile():
    (t,) = tile_grid(10, 20, 64, 8)
    assert (t.x, t.y, t.w, t.h, t.write_w, t.write_h) == (0, 0, 64, 64, 10, 20)
    assert tile_starts(10, 64, 56) == [0]


@pytest.mark.parametrize(
    ("args", "msg"),
    [((0, 10, 8, 0), "positive"), ((10, 10, 8, 8), "overlap_px"), ((10, 10, 0, 0), "tile_px")],
)
def test_invalid(args, msg):
    with pytest.raises(InputError, match=msg):
        tile_grid(*args)


def test_gaussian_weight():
    g = gaussian_weight(64)
    assert g.shape == (64, 64) and g.dtype == np.float32
    assert g.max() == pytest.approx(1.0) and g.min() >= 1e-3
    np.testing.assert_allclose(g, g.T)
    np.testing.assert_allclose(g, g[::-1, ::-1])
