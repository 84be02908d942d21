"""Writers: GeoJSON polygons round-trip to the raster (holes, validity, offsets), OME-TIFF pyramid, stats."""

from __future__ import annotations

import json

import numpy as np
import pytest

shapely = pytest.importorskip("shapely")
tifffile = pytest.importorskip("tifffile")

from ldiffusion.infer.writers import (  # noqa: E402
    area_stats,
    class_counts,
    component_polygons,
    default_palette,
    iter_class_polygons,
    write_geojson,
    write_ome_tiff,
    write_overlay_png,
)


def rasterize(features, shape, scale=1.0, offset=(0.0, 0.0), names=None):
    """Pixel-centre rasterisation of GeoJSON features back into a label map."""
    from shapely.geometry import shape as to_shape

    H, W = shape
    yy, xx = np.mgrid[0:H, 0:W]
    cx, cy = offset[0] + (xx + 0.5) * scale, offset[1] + (yy + 0.5) * scale
    out = np.zeros(shape, np.uint8)
    for f in features:
        geom = to_shape(f["geometry"])
        assert geom.is_valid, f
        inside = shapely.contains_xy(geom, cx, cy)
        assert not out[inside].any(), "polygons overlap"
        out[inside] = names.index(f["properties"]["classification"]["name"])
    return out


def _labels_with_holes():
    lab = np.zeros((64, 80), np.uint8)
    lab[4:40, 4:40] = 1
    lab[10:30, 10:30] = 0  # a hole
    lab[15:20, 15:20] = 2  # an island of another class in the hole
    lab[12, 12] = 1  # an island of the same class inside the hole
    lab[40, 40] = 1  # touches the big ring only diagonally: a separate object
    lab[50:60, 50:75] = 2
    lab[52:54, 52:54] = 0  # hole touching nothing
    lab[55, 60:70] = 0  # a slit hole
    lab[56, 69] = 0
    lab[5:8, 60:63] = 1
    lab[6, 61] = 0  # 1-pixel hole
    lab[20, 5] = 0  # hole whose corner touches ... nothing else
    lab[4, 20] = 0  # a notch on the outline
    lab[30, 30] = 1  # diagonal to the hole corner of the ring
    return lab


@pytest.mark.parametrize("block_px", [2048, 16, 7])
def test_geojson_round_trip_exact(tmp_path, block_px):
    lab = _labels_with_holes()
    names = ["background", "tumour", "stroma"]
    counts = write_geojson(tmp_path / "a.geojson", lab, names, default_palette(3), block_px=block_px)
    fc = json.loads((tmp_path / "a.geojson").read_text())
    assert fc["type"] == "FeatureCollection"
    assert sum(counts.values()) == len(fc["features"])
    f0 = fc["features"][0]
    assert f0["properties"]["objectType"] == "annotation"
    assert set(f0["properties"]["classification"]) == {"name", "color"}
    np.testing.assert_array_equal(rasterize(fc["features"], lab.shape, names=names), lab)
    assert any(len(f["geometry"]["coordinates"]) > 1 for f in fc["features"])  # holes kept


def test_geojson_scale_and_offset(tmp_path):
    lab = _labels_with_holes()
    names = ["bg", "a", "b"]
    write_geojson(tmp_path / "b.geojson", lab, names, default_palette(3), scale=4.0, offset=(1000.0, -200.0))
    fc = json.loads((tmp_path / "b.geojson").read_text())
    xs = [p[0] for f in fc["features"] for p in f["geometry"]["coordinates"][0]]
    assert min(xs) == 1000 + 4 * 4 and isinstance(xs[0], int)
    back = rasterize(fc["features"], lab.shape, scale=4.0, offset=(1000.0, -200.0), names=names)
    np.testing.assert_array_equal(back, lab)


def test_random_rasters_round_trip():
    rng = np.random.default_rng(0)
    for _ in range(10):
        lab = (rng.random((30, 41)) < 0.55).astype(np.uint8) * rng.integers(1, 3, (30, 41)).astype(np.uint8)
        feats = [
            {"geometry": p.__geo_interface__, "properties": {"classification": {"name": str(c)}}}
            for c, p in iter_class_polygons(lab, [1, 2], block_px=9)
        ]
        np.testing.assert_array_equal(rasterize(feats, lab.shape, names=["0", "1", "2"]), lab)


def test_component_polygon_is_exact_square():
    (p,) = component_polygons(np.ones((1, 1), bool), origin=(3, 4))
    assert p.equals(shapely.box(3, 4, 4, 5))
    comp = np.array([[1, 1, 1], [1, 0, 1], [1, 1, 1]], bool)
    (p,) = component_polygons(comp)
    assert p.area == 8 and len(p.interiors) == 1 and p.is_valid


def test_ome_tiff_pyramid(tmp_path):
    lab = (np.arange(600 * 500).reshape(600, 500) % 5).astype(np.uint8)
    levels = [lab, lab[::2, ::2], lab[::4, ::4]]
    write_ome_tiff(
        tmp_path / "l.ome.tif", levels, mpp=0.25, uuid="urn:uuid:00000000-0000-0000-0000-000000000001"
    )
    with tifffile.TiffFile(tmp_path / "l.ome.tif") as tf:
        assert tf.is_ome and tf.is_bigtiff
        series = tf.series[0]
        assert [lv.shape for lv in series.levels] == [(600, 500), (300, 250), (150, 125)]
        page = series.levels[0].pages[0]
        assert page.is_tiled and page.tilewidth == 256 and page.compression == 8  # ADOBE_DEFLATE (zlib)
        np.testing.assert_array_equal(series.levels[1].asarray(), levels[1])
        assert 'PhysicalSizeX="0.25"' in tf.ome_metadata
    first = (tmp_path / "l.ome.tif").read_bytes()
    write_ome_tiff(
        tmp_path / "l.ome.tif", levels, mpp=0.25, uuid="urn:uuid:00000000-0000-0000-0000-000000000001"
    )
    assert (tmp_path / "l.ome.tif").read_bytes() == first  # deterministic


def test_stats_and_overlay(tmp_path):
    lab = np.zeros((100, 100), np.uint8)
    lab[:50] = 1
    lab[50:, :25] = 2
    counts = class_counts(lab, 3, block_px=33)
    assert counts.tolist() == [3750, 5000, 1250]
    st = area_stats(counts, ["bg", "a", "b"], label_mpp=0.5, level0_px_per_label_px=2.0)
    assert st["classes"][1]["area_mm2"] == pytest.approx(5000 * 0.25e-6)
    assert st["classes"][1]["area_px_level0"] == 20000
    assert st["classes"][2]["fraction_of_foreground"] == pytest.approx(0.2)
    assert area_stats(counts, ["bg", "a", "b"], label_mpp=None)["classes"][1]["area_mm2"] is None
    write_overlay_png(tmp_path / "o.png", np.full((50, 50, 3), 255, np.uint8), lab, default_palette(3))
    from PIL import Image

    assert Image.open(tmp_path / "o.png").size == (50, 50)


def test_contour_geojson_one_polygon_per_object_grown_over_the_boundary(tmp_path):
    from ldiffusion.data.targets import contour_target

    inst = np.zeros((40, 60), np.int32)
    inst[10:30, 8:30] = 1
    inst[10:30, 30:52] = 2  # touching rectangles: one component in a plain class map
    labels = contour_target((inst > 0).astype(np.uint8), inst, 2, boundary_class=2)
    path = tmp_path / "a.geojson"
    pal = np.array([[0, 0, 0], [255, 0, 0], [255, 255, 255]], np.uint8)
    counts = write_geojson(path, labels, ["background", "nucleus", "boundary"], pal, skip=(0, 2), grow_px=2)
    assert counts == {"nucleus": 2}
    feats = json.loads(path.read_text())["features"]
    areas = sorted(shapely.geometry.shape(f["geometry"]).area for f in feats)
    assert areas == [20 * 22, 20 * 22]  # interiors (16 x 18) grown by 2 px give the objects back


def test_geojson_drops_polygons_under_the_minimum_area(tmp_path):
    labels = np.zeros((40, 60), np.uint8)
    labels[5:25, 5:25] = 1  # 400 px
    labels[30:33, 40:43] = 1  # 9 px
    pal = np.array([[0, 0, 0], [255, 0, 0]], np.uint8)
    path = tmp_path / "a.geojson"
    assert write_geojson(path, labels, ["background", "gland"], pal, min_area_px=10) == {"gland": 1}
    assert write_geojson(path, labels, ["background", "gland"], pal) == {"gland": 2}
