"""QuPath GeoJSON -> tiles (`data prepare qupath`) and Aperio XML -> GeoJSON (`data export-geojson`).

The fixture slide is a synthetic 1024 x 1024 pyramidal TIFF (levels 1, 2, 4; mpp 0.25) and its
GeoJSON is written the way QuPath writes it: a FeatureCollection with a "Region" annotation, a
MultiPolygon with a hole ("Tumor"), a "Stroma" polygon with a packed-int colour, a self-intersecting
"bow-tie" and a detection. Vertices sit off the pixel sample points (x.3 / x.7), so the expected
labels can be computed independently with shapely point tests at the pixel centres.
"""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

import numpy as np
import pytest

from ldiffusion.cli import main
from ldiffusion.core.errors import ConfigError, InputError
from ldiffusion.data.converters.monuseg import rasterise_polygons
from ldiffusion.data.format import read_dataset_info, read_image, read_mask
from ldiffusion.data.qupath import (
    PaintItem,
    build_classes,
    parse_color,
    polygon_pixels,
    prepare_qupath,
    rasterise,
    read_geojson,
    tile_origins,
)
from ldiffusion.infer.slide import ArraySlide, open_slide

shapely = pytest.importorskip("shapely")
tifffile = pytest.importorskip("tifffile")
pytest.importorskip("tiffslide")

MPP = 0.25
SIZE = 1024

REGION = [[100.3, 100.3], [700.3, 100.3], [700.3, 700.3], [100.3, 700.3], [100.3, 100.3]]
TUMOR = [  # MultiPolygon: a square with a square hole, and a triangle
    [
        [[200.3, 200.3], [500.7, 200.3], [500.7, 500.7], [200.3, 500.7], [200.3, 200.3]],
        [[300.3, 300.3], [400.7, 300.3], [400.7, 400.7], [300.3, 400.7], [300.3, 300.3]],
    ],
    [[[550.3, 150.3], [680.7, 150.3], [615.5, 330.7], [550.3, 150.3]]],
]
STROMA = [[120.3, 540.3], [480.7, 560.3], [460.7, 690.7], [130.3, 680.7], [120.3, 540.3]]
BOWTIE = [[520.3, 420.3], [690.7, 590.1], [690.7, 420.3], [520.3, 590.1], [520.3, 420.3]]
OUTSIDE = [[880.3, 880.3], [990.7, 880.3], [990.7, 990.7], [880.3, 990.7], [880.3, 880.3]]  # no region
DETECTION = [[250.3, 250.3], [270.7, 250.3], [270.7, 270.7], [250.3, 270.7], [250.3, 250.3]]


def _feature(
    geometry: dict,
    cls: dict | str | None,
    *,
    name: str | None = None,
    otype: str = "annotation",
    fid: str | None = None,
) -> dict:
    props: dict = {"objectType": otype, "isLocked": False}
    if cls is not None:
        props["classification"] = cls
    if name is not None:
        props["name"] = name
    feat = {"type": "Feature", "id": fid or f"id-{name}", "geometry": geometry, "properties": props}
    return feat


def qupath_collection() -> dict:
    """The fixture GeoJSON, in the layout of QuPath 0.4/0.5 "Export objects as GeoJSON"."""
    return {
        "type": "FeatureCollection",
        "features": [
            _feature(
                {"type": "Polygon", "coordinates": [REGION]},
                {"name": "Region", "color": [0, 0, 180]},
                name="area",
            ),
            _feature(
                {"type": "MultiPolygon", "coordinates": TUMOR},
                {"name": "Tumor", "color": [200, 0, 0]},
                name="tumour",
            ),
            _feature(
                {"type": "Polygon", "coordinates": [STROMA]},
                {"name": "Stroma", "color": -16711936},
                name="stroma",
            ),
            _feature({"type": "Polygon", "coordinates": [OUTSIDE]}, "Tumor", name="outside"),
            _feature(
                {"type": "Polygon", "coordinates": [BOWTIE]},
                {"name": "Stroma"},
                name="bowtie",
                fid="bow-tie-uuid",
            ),
            _feature(
                {"type": "Polygon", "coordinates": [DETECTION]},
                {"name": "Stroma"},
                name="cell",
                otype="detection",
            ),
        ],
    }


def _slide_pixels() -> np.ndarray:
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    return np.stack([(x * 7) % 251, (y * 5) % 241, ((x + y) * 3) % 239], -1).astype(np.uint8)


def write_pyramid(path: Path, img: np.ndarray, mpp: float | None = MPP, levels: int = 3) -> list[np.ndarray]:
    """Write a tiled pyramidal TIFF (SubIFDs, halving by striding) and return its levels."""
    pyramid = [img]
    for _ in range(1, levels):
        pyramid.append(np.ascontiguousarray(pyramid[-1][::2, ::2]))
    res = {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"} if mpp else {}
    opts = {"tile": (256, 256), "photometric": "rgb", "compression": "zlib"}
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        tif.write(img, subifds=levels - 1, metadata=None, **res, **opts)
        for k, lvl in enumerate(pyramid[1:], start=1):
            r = (
                {"resolution": (1e4 / mpp / 2**k, 1e4 / mpp / 2**k), "resolutionunit": "CENTIMETER"}
                if mpp
                else {}
            )
            tif.write(lvl, subfiletype=1, metadata=None, **r, **opts)
    return pyramid


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("qupath")
    (root / "slides").mkdir()
    (root / "ann").mkdir()
    levels = write_pyramid(root / "slides" / "case1.tif", _slide_pixels())
    (root / "ann" / "case1.geojson").write_text(json.dumps(qupath_collection(), indent=2))
    return {"root": root, "slides": root / "slides", "ann": root / "ann", "levels": levels}


def reference_labels(width: int, height: int, downsample: float) -> np.ndarray:
    """Independent rasterisation: shapely point tests at the pixel centres (QuPath frame).

    Paint order as documented: region 0, annotations in file order, detections, (no ignore).
    Classes: background 0, Stroma 1, Tumor 2 (sorted names).
    """
    cols = (np.arange(width) + 0.5) * downsample
    rows = (np.arange(height) + 0.5) * downsample
    X, Y = np.meshgrid(cols, rows)
    lab = np.full((height, width), 255, np.uint8)
    tumour = shapely.MultiPolygon([shapely.Polygon(p[0], p[1:]) for p in TUMOR])
    # the bow-tie repaired by hand: two triangles meeting where its diagonals cross
    a, b, c, d = BOWTIE[:4]
    x = shapely.LineString([a, b]).intersection(shapely.LineString([c, d]))
    bowtie = shapely.MultiPolygon([shapely.Polygon([a, (x.x, x.y), d]), shapely.Polygon([(x.x, x.y), b, c])])
    for geom, v in (
        (shapely.Polygon(REGION), 0),
        (tumour, 2),
        (shapely.Polygon(STROMA), 1),
        (shapely.Polygon(OUTSIDE), 2),
        (bowtie, 1),
        (shapely.Polygon(DETECTION), 1),
    ):
        lab[shapely.intersects_xy(geom, X, Y)] = v
    return lab


@pytest.fixture(autouse=True)
def _restore_logging():
    """`main()` reconfigures the root logger onto the captured stderr; undo it after each test."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def _tile_pos(tid: str) -> tuple[int, int]:
    x, y = tid.rsplit("_x", 1)[1].split("_y")
    return int(x), int(y)


# ---------------------------------------------------------------------- pure pieces


def test_parse_color_forms() -> None:
    assert parse_color([1, 2, 3], "x") == (1, 2, 3)
    assert parse_color([1, 2, 3, 255], "x") == (1, 2, 3)
    assert parse_color(-16711936, "x") == (0, 255, 0)  # QuPath's packed ARGB int
    assert parse_color(0xFF8000, "x") == (255, 128, 0)
    assert parse_color(None, "x") is None
    with pytest.raises(InputError, match="colour"):
        parse_color([300, 0, 0], "feature 1")


def test_polygon_pixels_hole_and_convention() -> None:
    # QuPath frame: box [0, 4] covers pixels 0..3; the hole [1, 3] removes 1..2 except its boundary
    square = shapely.Polygon([(0, 0), (4, 0), (4, 4), (0, 4)], [[(1, 1), (3, 1), (3, 3), (1, 3)]])
    m = np.zeros((6, 6), np.uint8)
    m[polygon_pixels(square, (6, 6))] = 1
    expected = np.zeros((6, 6), np.uint8)
    expected[:4, :4] = 1
    expected[1:3, 1:3] = 0  # centres 1.5, 2.5 are strictly inside the hole
    np.testing.assert_array_equal(m, expected)
    # Aperio frame (centres on integers): the boundary is included, like the MoNuSeg converter
    m0 = np.zeros((6, 6), np.uint8)
    m0[polygon_pixels(shapely.box(0, 0, 2, 2), (6, 6), pixel_centre=0.0)] = 1
    assert m0[:3, :3].all() and m0.sum() == 9


def test_matches_monuseg_rasterisation_on_random_polygons() -> None:
    """pixel_centre=0 fills exactly the pixels of the MoNuSeg converter's `rasterise_polygons`."""
    rng = np.random.default_rng(0)
    for k in range(200):
        n = int(rng.integers(3, 10))
        centre = rng.uniform(5, 45, 2)
        ang = np.sort(rng.uniform(0, 2 * np.pi, n))
        rad = rng.uniform(2, 12, n)
        poly = centre + np.stack([rad * np.cos(ang), rad * np.sin(ang)], 1)
        if k % 2:
            poly = np.round(poly)  # integer vertices: sample points on edges and vertices
        ref = rasterise_polygons([poly], (50, 50)) > 0
        geom = shapely.Polygon(poly)
        if not geom.is_valid:
            continue
        got = np.zeros((50, 50), bool)
        got[polygon_pixels(geom, (50, 50), pixel_centre=0.0)] = True
        np.testing.assert_array_equal(got, ref)
        # shifted into QuPath's frame (+0.5) with the default convention: the same pixels
        got2 = np.zeros((50, 50), bool)
        got2[polygon_pixels(shapely.Polygon(poly + 0.5), (50, 50))] = True
        np.testing.assert_array_equal(got2, ref)


def test_rasterise_paint_order_and_instances() -> None:
    items = [
        PaintItem(shapely.box(0, 0, 8, 8), 0),
        PaintItem(shapely.box(1, 1, 4, 4), 2, instance=True),
        PaintItem(shapely.box(3, 3, 6, 6), 1, instance=True),
        PaintItem(shapely.box(5, 5, 7, 7), 255),
    ]
    label, inst = rasterise(items, (10, 10), with_instances=True)
    assert label[0, 0] == 0 and label[9, 9] == 255
    assert label[1, 1] == 2 and label[3, 3] == 1 and label[5, 5] == 255  # later wins; ignore last
    assert inst[1, 1] == 1 and inst[3, 3] == 2 and inst[5, 5] == 0 and inst[0, 0] == 0


def test_tile_origins_region_grid_is_aligned() -> None:
    assert tile_origins(1000, 600, 512) == [(0, 0), (488, 0), (0, 88), (488, 88)]
    # an image placed at (256, 256) with its pixels' corners in QuPath's frame: exactly one tile
    assert tile_origins(6000, 6000, 1000, grid="region", regions=[(256, 256, 1256, 1256)]) == [(256, 256)]
    # the same image in the Aperio frame (corners at -0.5)
    assert tile_origins(
        6000, 6000, 1000, grid="region", regions=[(255.5, 255.5, 1255.5, 1255.5)], pixel_centre=0.0
    ) == [(256, 256)]
    # at downsample 2 a 512-px tile covers 1024 level-0 pixels
    assert tile_origins(1024, 1024, 256, 2.0) == [(0, 0), (512, 0), (0, 512), (512, 512)]


def test_read_geojson_forms(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    feats = qupath_collection()["features"]
    p = tmp_path / "a.geojson"
    legacy = {
        "type": "Feature",
        "id": "PathDetectionObject",
        "geometry": {"type": "Polygon", "coordinates": [DETECTION]},
        "properties": {},
    }
    line = _feature({"type": "LineString", "coordinates": [[0, 0], [5, 5]]}, "Tumor", name="line")
    p.write_text(json.dumps([*feats, legacy, line]))  # a bare array, as QuPath can also write
    with caplog.at_level(logging.WARNING):
        got = read_geojson(p)
    assert [f.name for f in got] == ["area", "tumour", "stroma", "outside", "bowtie", "cell", None]
    assert got[1].geometry.geom_type == "MultiPolygon" and len(got[1].geometry.geoms[0].interiors) == 1
    assert got[2].color == (0, 255, 0) and got[3].class_name == "Tumor" and got[3].color is None
    assert got[5].object_type == "detection" and got[6].object_type == "detection"
    assert got[6].class_name == "Unclassified"
    assert got[4].repaired and got[4].geometry.is_valid and got[4].geometry.geom_type == "MultiPolygon"
    assert "feature 4 (name 'bowtie', id 'bow-tie-uuid', class 'Stroma')" in caplog.text
    assert "make_valid" in caplog.text and "LineString" in caplog.text
    assert [f.name for f in read_geojson(p, object_types=("annotation",))] == [
        "area",
        "tumour",
        "stroma",
        "outside",
        "bowtie",
    ]
    (tmp_path / "bad.geojson").write_text('{"type": "Topology"}')
    with pytest.raises(InputError, match=r"bad\.geojson: not QuPath GeoJSON"):
        read_geojson(tmp_path / "bad.geojson")


def test_build_classes(tmp_path: Path) -> None:
    found = {"Tumor": (200, 0, 0), "Stroma": None, "Region*": (0, 0, 180), "Unclassified": None}
    classes, values = build_classes(found)
    assert [(c.id, c.name) for c in classes] == [(0, "background"), (1, "Stroma"), (2, "Tumor")]
    assert classes[2].color == (200, 0, 0)
    assert values["Region*"] == 0 and values["Ignore*"] == 255 and "Unclassified" not in values
    table = tmp_path / "classes.json"
    table.write_text(
        json.dumps(
            [
                {"id": 0, "name": "background"},
                {"id": 1, "name": "Tumor"},
                {"id": 2, "name": "Stroma", "color": [1, 2, 3]},
            ]
        )
    )
    classes, values = build_classes(found, class_file=table)
    assert values["Tumor"] == 1 and classes[2].color == (1, 2, 3) and classes[1].color == (200, 0, 0)
    table.write_text(json.dumps({"Tumor": 1}))
    with pytest.raises(ConfigError, match=r"\['Stroma'\].*names found: \['Region\*', 'Stroma', 'Tumor'"):
        build_classes(found, class_file=table)
    table.write_text(json.dumps({"Tumor": 1, "Stroma": 3}))
    with pytest.raises(ConfigError, match=r"0\.\.K-1"):
        build_classes(found, class_file=table)


# ---------------------------------------------------------------------- the command


def test_prepare_matches_independent_rasterisation(
    project: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "ds"
    args = [
        "data",
        "prepare",
        "qupath",
        str(out),
        "--slides",
        str(project["slides"]),
        "--annotations",
        str(project["ann"]),
        "--mpp",
        "0.5",
        "--tile",
        "128",
        "--region-class",
        "Region",
        "--split-by",
        "tile",
        "--val-fraction",
        "0.2",
        "--test-fraction",
        "0.2",
        "--no-progress",
    ]
    assert main(args) == 0
    cap = capsys.readouterr()  # the command's logging goes to stderr
    assert "feature 4 (name 'bowtie', id 'bow-tie-uuid', class 'Stroma') has invalid geometry" in cap.err
    assert "prepared 'qupath'" in cap.out
    info = read_dataset_info(out)
    assert info.class_names == ["background", "Stroma", "Tumor"] and info.mpp == 0.5
    assert info.task == "semantic" and [c.color for c in info.classes][1:] == [(0, 255, 0), (200, 0, 0)]
    assert set(info.groups.values()) == {"case1"}
    ref = reference_labels(512, 512, 2.0)
    level1 = project["levels"][1]
    written = set(info.ids("all"))
    assert written and len(info.splits["val"]) >= 1 and len(info.splits["test"]) >= 1
    for y in range(0, 512, 128):
        for x in range(0, 512, 128):
            tid = f"case1_x{2 * x}_y{2 * y}"
            want = ref[y : y + 128, x : x + 128]
            if tid not in written:
                assert (want == 255).all(), f"{tid} was skipped but has labelled pixels"
                continue
            np.testing.assert_array_equal(read_mask(out / "labels" / f"{tid}.png"), want)
            np.testing.assert_array_equal(
                read_image(out / "images" / f"{tid}.png"), level1[y : y + 128, x : x + 128]
            )
    assert len(written) < 16  # the tiles right of and below the region, without objects, are skipped
    labels = np.concatenate([read_mask(out / "labels" / f"{t}.png").ravel() for t in sorted(written)])
    assert {0, 1, 2, 255} <= set(np.unique(labels).tolist())
    # the hole of the tumour square stays background; pixels outside the region are ignored
    hole = read_mask(out / "labels" / "case1_x256_y256.png")
    assert hole[(350 - 256) // 2, (350 - 256) // 2] == 0
    assert main(["data", "check", str(out)]) == 0
    assert "OK: ds" in capsys.readouterr().out
    # same options and annotations: skipped; --force prepares again
    assert main(args) == 0
    assert "skipping" in capsys.readouterr().out
    assert main([*args, "--force"]) == 0
    assert "prepared 'qupath'" in capsys.readouterr().out


def test_prepare_native_resolution_with_instances(project: dict, tmp_path: Path) -> None:
    out = tmp_path / "inst"
    info = prepare_qupath(
        project["ann"],
        out,
        slides=[project["slides"] / "case1.tif"],
        open_slide=open_slide,
        tile_px=512,
        region_classes=("Region",),
        val_fraction=0,
        test_fraction=0,
        instances=True,
        progress=False,
    )
    assert info.task == "instance" and info.mpp == MPP and len(info.splits) == 1
    ref = reference_labels(1024, 1024, 1.0)
    for tid in info.ids("all"):
        x, y = _tile_pos(tid)
        lab = read_mask(out / "labels" / f"{tid}.png")
        np.testing.assert_array_equal(lab, ref[y : y + 512, x : x + 512])
        inst = read_mask(out / "instances" / f"{tid}.png")
        assert inst.dtype == np.uint16
        assert ((inst > 0) == ((lab != 0) & (lab != 255))).all()
    inst = read_mask(out / "instances" / "case1_x0_y0.png")
    assert len(np.unique(inst[inst > 0])) == 2  # the tumour square and the detection
    inst = read_mask(out / "instances" / "case1_x512_y0.png")
    assert len(np.unique(inst[inst > 0])) == 2  # the tumour triangle and the repaired bow-tie (one object)
    assert main(["data", "check", str(out)]) == 0


def test_prepare_errors(project: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = [
        "data",
        "prepare",
        "qupath",
        str(tmp_path / "o"),
        "--slides",
        str(project["slides"]),
        "--annotations",
        str(project["ann"]),
        "--no-progress",
        "--region-class",
        "Region",
    ]
    classes = tmp_path / "classes.json"
    classes.write_text(json.dumps({"Tumor": 1}))
    assert main([*base, "--classes", str(classes)]) == 2
    err = capsys.readouterr().err
    assert "['Stroma']" in err and "names found: ['Region', 'Stroma', 'Tumor']" in err
    assert str(classes) in err
    # one slide cannot be split by slide into train / val / test
    assert main(base) == 2
    assert "--split-by tile" in capsys.readouterr().err
    assert main([*base, "--mpp", "0.1"]) == 2
    assert "upsampling" in capsys.readouterr().err
    assert main([*base[:3], str(tmp_path / "o")]) == 2
    assert "--annotations" in capsys.readouterr().err
    assert main(["data", "prepare", "glas", str(tmp_path), str(tmp_path / "x"), "--slides", "a"]) == 2
    assert "FORMAT qupath" in capsys.readouterr().err


def test_prepare_without_mpp_metadata_needs_slide_mpp(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "s").mkdir()
    (tmp_path / "a").mkdir()
    write_pyramid(tmp_path / "s" / "case1.tif", _slide_pixels()[:512, :512], mpp=None, levels=2)
    (tmp_path / "a" / "case1.svs.geojson").write_text(json.dumps(qupath_collection()))  # QuPath's naming
    args = [
        "data",
        "prepare",
        "qupath",
        str(tmp_path / "o"),
        "--slides",
        str(tmp_path / "s"),
        "--annotations",
        str(tmp_path / "a"),
        "--mpp",
        "0.5",
        "--tile",
        "128",
        "--val-fraction",
        "0",
        "--test-fraction",
        "0",
        "--region-class",
        "Region",
        "--no-progress",
    ]
    assert main(args) == 2
    assert "--slide-mpp" in capsys.readouterr().err
    assert main([*args, "--slide-mpp", "0.25"]) == 0
    assert read_dataset_info(tmp_path / "o").mpp == 0.5


# ---------------------------------------------------------------------- Aperio XML -> GeoJSON -> tiles


def _aperio_xml(polys: list[np.ndarray]) -> str:
    regions = "".join(
        f'<Region Id="{k + 1}"><Vertices>'
        + "".join(f'<Vertex X="{x}" Y="{y}"/>' for x, y in p)
        + "</Vertices></Region>"
        for k, p in enumerate(polys)
    )
    return (
        f'<Annotations MicronsPerPixel="0.25"><Annotation Id="1"><Regions>{regions}</Regions>'
        "</Annotation></Annotations>"
    )


def test_export_geojson_round_trip_equals_monuseg_rasterisation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two 64-px "images" stitched into one slide: export with offsets, prepare back, compare."""
    rng = np.random.default_rng(3)
    xml_dir = tmp_path / "xml"
    xml_dir.mkdir()
    polys = {}
    for k, stem in enumerate(["imgA", "imgB"]):
        ps = []
        for _ in range(12):
            c = rng.uniform(4, 60, 2)
            ang = np.sort(rng.uniform(0, 2 * np.pi, 7))
            p = c + np.stack([6 * np.cos(ang), 6 * np.sin(ang)], 1)
            ps.append(np.round(p) if k == 0 else np.round(p, 3))  # integer vertices: boundary ties
        polys[stem] = ps
        text = _aperio_xml(ps)
        if k:
            (xml_dir / f"{stem}.xml.gz").write_bytes(gzip.compress(text.encode()))
        else:
            (xml_dir / f"{stem}.xml").write_text(text)
    placement = {
        "images": {"imgA": {"x": 10, "y": 20, "w": 64, "h": 64}, "imgB": {"x": 90, "y": 20, "w": 64, "h": 64}}
    }
    (tmp_path / "place.json").write_text(json.dumps(placement))
    ann = tmp_path / "ann"
    ann.mkdir()
    assert (
        main(
            [
                "data",
                "export-geojson",
                str(xml_dir),
                str(ann / "slide.geojson"),
                "--placement",
                str(tmp_path / "place.json"),
                "--region-class",
                "Region",
            ]
        )
        == 0
    )
    assert "wrote 26 features" in capsys.readouterr().out
    gj = json.loads((ann / "slide.geojson").read_text())
    assert gj["type"] == "FeatureCollection" and len(gj["features"]) == 26
    first = gj["features"][1]
    assert first["properties"]["classification"]["name"] == "Nucleus"
    assert first["geometry"]["coordinates"][0][0] == [
        polys["imgA"][0][0][0] + 10.5,
        polys["imgA"][0][0][1] + 20.5,
    ]
    assert gj["features"][0]["geometry"]["coordinates"][0][:3] == [[10, 20], [74, 20], [74, 84]]
    slide = np.zeros((120, 170, 3), np.uint8)
    (tmp_path / "slides").mkdir()
    (tmp_path / "slides" / "slide.tif").write_bytes(b"")  # opened by the ArraySlide below

    def opener(path: Path, mpp: float | None = None) -> ArraySlide:
        return ArraySlide(slide, mpp=0.25, path=str(path))

    out = tmp_path / "ds"
    info = prepare_qupath(
        ann,
        out,
        slides=[tmp_path / "slides"],
        open_slide=opener,
        tile_px=64,
        grid="region",
        region_classes=("Region",),
        val_fraction=0,
        test_fraction=0,
        instances=True,
        progress=False,
    )
    assert sorted(info.ids("all")) == ["slide_x10_y20", "slide_x90_y20"]
    for stem, tid in (("imgA", "slide_x10_y20"), ("imgB", "slide_x90_y20")):
        ref_inst = rasterise_polygons(polys[stem], (64, 64))
        lab = read_mask(out / "labels" / f"{tid}.png")
        np.testing.assert_array_equal(lab, (ref_inst > 0).astype(np.uint8))
        inst = read_mask(out / "instances" / f"{tid}.png").astype(np.int64)
        pairs = set(zip(inst.ravel().tolist(), ref_inst.ravel().tolist(), strict=True))
        assert (
            len(pairs) == len({a for a, _ in pairs}) == len({b for _, b in pairs})
        )  # equal up to relabelling


def test_export_geojson_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "xml"
    d.mkdir()
    for s in ("a", "b"):
        (d / f"{s}.xml").write_text(_aperio_xml([np.array([[0, 0], [4, 0], [4, 4]])]))
    assert main(["data", "export-geojson", str(d), str(tmp_path / "one.geojson")]) == 2
    assert "--placement" in capsys.readouterr().err
    assert (
        main(
            [
                "data",
                "export-geojson",
                str(d),
                str(tmp_path / "per"),
                "--offset",
                "5",
                "7",
                "--scale",
                "2",
                "--no-half-pixel",
                "--object-type",
                "detection",
            ]
        )
        == 0
    )
    gj = json.loads((tmp_path / "per" / "a.geojson").read_text())
    f = gj["features"][0]
    assert f["properties"]["objectType"] == "detection"
    assert f["geometry"]["coordinates"][0] == [[5, 7], [13, 7], [13, 15], [5, 7]]
    assert main(["data", "export-geojson", str(d / "a.xml"), str(tmp_path / "x.geojson"), "--region"]) == 2
    assert "--image-size" in capsys.readouterr().err
