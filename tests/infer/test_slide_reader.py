"""Slide readers: units, padding, pyramid levels, mpp override, thumbnails, missing extras."""

from __future__ import annotations

import numpy as np
import pytest

from ldiffusion.core.errors import InputError
from ldiffusion.infer.slide import ArraySlide, VirtualSlide, he_pattern, open_slide


def _image(h=300, w=400):
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x % 256, y % 256, (x + y) % 256], -1).astype(np.uint8)


def test_array_slide_levels_and_reads():
    img = _image()
    s = ArraySlide(img, mpp=0.5, downsamples=[1, 2, 4])
    assert s.dimensions == (400, 300)
    assert s.level_dimensions == ((400, 300), (200, 150), (100, 75))
    np.testing.assert_array_equal(s.read_region(10, 20, 30, 40), img[20:60, 10:40])
    # level 1: location in level-0 px, size in level px
    np.testing.assert_array_equal(s.read_region(10, 20, 8, 6, level=1), img[20:32:2, 10:26:2])


def test_read_region_pads_white_outside():
    img = _image(50, 60)
    s = ArraySlide(img)
    r = s.read_region(-5, 40, 20, 20)
    assert r.shape == (20, 20, 3)
    assert (r[:, :5] == 255).all() and (r[10:] == 255).all()
    np.testing.assert_array_equal(r[:10, 5:], img[40:50, 0:15])
    assert (s.read_region(1000, 1000, 4, 4) == 255).all()


def test_read_scaled_and_thumbnail():
    s = VirtualSlide(4096, 2048, he_pattern, mpp=0.25, downsamples=(1, 4, 16))
    r = s.read_scaled(0, 0, 100, 50, 8.0)
    assert r.shape == (50, 100, 3)
    thumb, ds = s.thumbnail(512)
    assert thumb.shape == (256, 512, 3) and ds == pytest.approx(8.0)
    assert (thumb[:20, :20] == 255).all()  # the white margin of the pattern


def test_open_tiff_with_tiffslide_and_mpp_override(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    pytest.importorskip("tiffslide")
    img = _image(512, 512)
    path = tmp_path / "s.tif"
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        tif.write(
            img,
            subifds=1,
            tile=(256, 256),
            photometric="rgb",
            compression="zlib",
            resolution=(1e4 / 0.5, 1e4 / 0.5),
            resolutionunit="CENTIMETER",
        )
        tif.write(img[::2, ::2], subfiletype=1, tile=(256, 256), photometric="rgb", compression="zlib")
    with open_slide(path) as s:
        assert s.dimensions == (512, 512) and s.level_count == 2
        assert s.mpp == pytest.approx(0.5)
        assert s.bounds_offset == (0, 0)
        np.testing.assert_array_equal(s.read_region(100, 200, 64, 32), img[200:232, 100:164])
        assert (s.read_region(500, 500, 20, 20)[12:, 12:] == 255).all()
    with open_slide(path, mpp=0.25) as s:
        assert s.mpp == 0.25


def test_open_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        open_slide(tmp_path / "missing.svs")
    (tmp_path / "x.mrxs").write_bytes(b"")
    with pytest.raises(InputError, match="openslide"):
        open_slide(tmp_path / "x.mrxs")
    with pytest.raises(InputError, match="mpp"):
        open_slide(tmp_path / "x.mrxs", mpp=-1)
