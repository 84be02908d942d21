"""Tile geometry, nearest-level sampling of label pyramids, the LRU cache, path and host checks."""

from __future__ import annotations

import numpy as np
import pytest

from ldiffusion.core.errors import InputError
from ldiffusion.view.server import check_host, is_loopback, unsafe_path
from ldiffusion.view.tiles import (
    UNCERTAINTY_LUT,
    LabelPyramid,
    TileCache,
    TileGrid,
    colour_labels,
    uncertainty_alpha,
)


def test_grid_levels_and_edge_tiles():
    g = TileGrid(1600, 1000, 256)
    assert g.max_level == 11  # 2**11 = 2048 >= 1600
    assert g.level_size(11) == (1600, 1000)
    assert g.level_size(10) == (800, 500)
    assert g.level_size(0) == (1, 1)
    assert g.tile_region(11, 6, 3) == (1536, 768, 64, 232, 1)  # cropped edge tile
    assert g.tile_region(9, 1, 0) == (1024, 0, 144, 250, 4)
    with pytest.raises(InputError, match="outside level"):
        g.tile_region(11, 7, 0)
    with pytest.raises(InputError, match="out of range"):
        g.tile_region(12, 0, 0)


def test_min_level_bounds_the_source_read():
    g = TileGrid(100_000, 80_000, 256)
    lvl = g.min_level_for(64.0)
    assert g.downsample(lvl) <= 4 * 64 < g.downsample(lvl - 1)


@pytest.fixture
def pyramid(tmp_path):
    pytest.importorskip("tifffile")
    pytest.importorskip("zarr")
    from ldiffusion.infer.writers import write_ome_tiff

    rng = np.random.default_rng(0)
    lab = rng.integers(0, 4, (600, 900)).astype(np.uint8)
    write_ome_tiff(tmp_path / "l.ome.tif", [lab, lab[::2, ::2], lab[::8, ::8]], mpp=0.5, uuid="t")
    p = LabelPyramid(tmp_path / "l.ome.tif")
    yield p, lab
    p.close()


def test_label_sampling_is_exact_on_each_level(pyramid):
    p, lab = pyramid
    assert p.ratios == [1, 2, 8]
    v, inside = p.sample(100, 40, 50, 30, 1, origin=(0, 0), scale=1)
    assert inside.all() and np.array_equal(v, lab[40:70, 100:150])
    v, _ = p.sample(100, 40, 50, 30, 2, origin=(0, 0), scale=1)  # level 1 = every 2nd pixel
    assert np.array_equal(v, lab[::2, ::2][20:50, 50:100])
    v, _ = p.sample(0, 0, 20, 10, 16, origin=(0, 0), scale=1)  # coarser than level 2: nearest on it
    assert np.array_equal(v, lab[::8, ::8][1::2, 1::2][:10, :20][: v.shape[0], : v.shape[1]])


def test_label_sampling_with_origin_scale_and_outside(pyramid):
    p, lab = pyramid
    # the map starts at level-0 (1000, 500) with 2 level-0 px per map pixel
    v, inside = p.sample(996, 500, 8, 2, 1, origin=(1000, 500), scale=2)
    assert inside[:, :4].sum() == 0 and inside[:, 4:].all()
    assert np.array_equal(v[:, 4:], lab[0:1, 0:2].repeat(2, 1).repeat(2, 0))
    assert (v[:, :4] == 0).all()


def test_colours_and_alpha():
    pal = np.array([[0, 0, 0], [10, 20, 30], [200, 100, 0]], np.uint8)
    vals = np.array([[0, 1, 2]], np.uint8)
    rgba = colour_labels(vals, np.array([[True, True, False]]), pal)
    assert rgba[0, 1].tolist() == [10, 20, 30, 255]
    assert rgba[0, 0, 3] == 0 and rgba[0, 2, 3] == 0  # background and outside transparent
    assert uncertainty_alpha(np.array([0, 10, 85, 255], np.uint8)).tolist() == [0, 30, 255, 255]
    assert UNCERTAINTY_LUT[0].tolist() == [68, 1, 84] and UNCERTAINTY_LUT[255].tolist() == [253, 231, 37]


def test_cache_evicts_least_recently_used():
    c = TileCache(max_bytes=25)
    calls = []

    def make(k):
        calls.append(k)
        return bytes(10)

    for k in ("a", "b"):
        c.get(k, lambda k=k: make(k))
    c.get("a", lambda: make("a"))  # hit; "b" is now the oldest
    c.get("c", lambda: make("c"))  # 30 bytes > 25: evict "b"
    c.get("a", lambda: make("a"))
    c.get("b", lambda: make("b"))
    assert calls == ["a", "b", "c", "b"]
    assert c.hits == 2


@pytest.mark.parametrize(
    "path",
    [
        "/static/../x",
        "/a/./b",
        "//etc/passwd",
        "/files/s//etc/passwd",
        "/files/s/%2Fetc%2Fpasswd",
        "/static/%2e%2e/%2e%2e/x",
        "/static/..%5cx",
        "/files/s/a%00b",
        "relative",
    ],
)
def test_unsafe_paths(path):
    assert unsafe_path(path)


def test_safe_paths():
    for p in ("/", "/slide/my%20slide", "/tiles/s/labels/11/0_0.png", "/static/openseadragon/images/a.png"):
        assert not unsafe_path(p)


def test_host_check():
    for h in ("127.0.0.1", "127.0.0.2", "localhost", "::1", "[::1]"):
        assert is_loopback(h)
        check_host(h, allow_remote=False)
    for h in ("0.0.0.0", "192.168.1.5", "::", "example.org"):
        assert not is_loopback(h)
        with pytest.raises(InputError, match="--allow-remote"):
            check_host(h, allow_remote=False)
        check_host(h, allow_remote=True)
