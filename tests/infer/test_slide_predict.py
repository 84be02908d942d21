"""Whole-slide prediction on a synthetic 4096 x 4096, 3-level pyramidal TIFF written with tifffile.

The slide encodes each pixel's position in its colour (R = x // 64, G = y // 64), so trivial fake
models can check seams (constant output), exact tile placement (a model that decodes the position)
and byte-identical resume (a model that fails after a few batches).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

tifffile = pytest.importorskip("tifffile")
pytest.importorskip("tiffslide")
pytest.importorskip("zarr")
shapely = pytest.importorskip("shapely")

from ldiffusion.core.errors import CheckpointError, InputError  # noqa: E402
from ldiffusion.infer.slide import ArraySlide  # noqa: E402
from ldiffusion.infer.slide_predict import (  # noqa: E402
    TileSegmenter,
    parse_formats,
    parse_shard,
    predict_slide,
    read_manifest,
    run_manifest,
)

SIZE, CELL, MPP = 4096, 64, 0.25
FAST = {"tile_px": 512, "overlap_px": 64, "batch_size": 8, "progress": False, "tissue": False}


def position_image(h: int, w: int) -> np.ndarray:
    x, y = np.arange(w), np.arange(h)
    img = np.empty((h, w, 3), np.uint8)
    img[..., 0] = (x // CELL % 256)[None, :]
    img[..., 1] = (y // CELL % 256)[:, None]
    img[..., 2] = 128
    return img


def grid_truth(h: int, w: int) -> np.ndarray:
    return ((np.arange(w)[None, :] // CELL + np.arange(h)[:, None] // CELL) % 2).astype(np.uint8)


@pytest.fixture(scope="module")
def slide_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("slide") / "synthetic.tif"
    img = position_image(SIZE, SIZE)
    opts = {"tile": (256, 256), "photometric": "rgb", "compression": "zlib", "resolutionunit": "CENTIMETER"}
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        tif.write(img, subifds=2, resolution=(1e4 / MPP, 1e4 / MPP), **opts)
        for m in (2, 4):
            tif.write(img[::m, ::m], subfiletype=1, resolution=(1e4 / MPP / m, 1e4 / MPP / m), **opts)
    return path


class ConstantModel:
    num_classes = 2

    def predict_proba(self, images, *, generator=None):
        b, _, h, w = images.shape
        return torch.tensor([0.3, 0.7]).view(1, 2, 1, 1).expand(b, 2, h, w).clone()


class PositionModel:
    """Decodes the cell position from the colour: class = (x cell + y cell) % 2, one-hot."""

    num_classes = 2
    class_names = ("background", "odd")

    def __init__(self, fail_after: int | None = None, noise: bool = False):
        self.calls, self.fail_after, self.noise = 0, fail_after, noise

    def predict_proba(self, images, *, generator=None):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise RuntimeError("simulated crash")
        self.calls += 1
        cells = torch.round(images[:, 0] * 255) + torch.round(images[:, 1] * 255)
        odd = (cells % 2).float()
        if self.noise:  # stochastic part drawn from the per-batch generator
            odd = 0.8 * odd + 0.1 + 0.1 * torch.rand(odd.shape, generator=generator)
        return torch.stack([1 - odd, odd], 1)


def read_levels(path):
    with tifffile.TiffFile(path) as tf:
        assert tf.is_ome
        return [lv.asarray() for lv in tf.series[0].levels], tf.ome_metadata


def test_fakes_follow_protocol():
    assert isinstance(ConstantModel(), TileSegmenter) and isinstance(PositionModel(), TileSegmenter)


def test_constant_model_gives_constant_pyramid(slide_path, tmp_path):
    res = predict_slide(ConstantModel(), slide_path, tmp_path, formats="ome-tiff,png", **FAST)
    out = tmp_path / "synthetic"
    levels, ome = read_levels(out / "labels.ome.tif")
    assert [lv.shape for lv in levels] == [(4096, 4096), (2048, 2048), (1024, 1024)]  # slide size and levels
    assert all((lv == 1).all() for lv in levels)  # no seams
    assert 'PhysicalSizeX="0.25"' in ome
    stats = json.loads((out / "stats.json").read_text())
    assert stats["classes"][1]["pixels"] == SIZE * SIZE
    assert stats["classes"][1]["area_mm2"] == pytest.approx(SIZE * SIZE * MPP**2 / 1e6)
    assert (out / "overlay.png").is_file() and not (out / ".work").exists()
    assert res.n_tiles == 81 and not res.skipped  # 9 x 9 tiles
    again = predict_slide(ConstantModel(), slide_path, tmp_path, formats="ome-tiff,png", **FAST)
    assert again.skipped  # finished slides are skipped
    with pytest.raises(InputError, match="overwrite"):
        predict_slide(
            ConstantModel(), slide_path, tmp_path, formats="ome-tiff,png", **{**FAST, "batch_size": 4}
        )


class HalfScaleConstantModel(ConstantModel):
    """A constant model trained at half resolution: records the tile sizes it is given."""

    cfg = type("Cfg", (), {"input_scale": 0.5})()
    size_divisor = 32

    def __init__(self):
        self.sizes = set()

    def predict_proba(self, images, *, generator=None):
        self.sizes.add(tuple(images.shape[-2:]))
        return super().predict_proba(images, generator=generator)


def test_a_model_at_half_resolution_sees_half_size_tiles_and_writes_a_full_size_map(slide_path, tmp_path):
    model = HalfScaleConstantModel()
    predict_slide(model, slide_path, tmp_path, formats="ome-tiff", **FAST)
    assert model.sizes == {(256, 256)}  # 512 px tiles resized by 0.5
    levels, _ = read_levels(tmp_path / "synthetic" / "labels.ome.tif")
    assert levels[0].shape == (4096, 4096) and (levels[0] == 1).all()


def test_position_model_reproduces_grid_and_geojson(slide_path, tmp_path):
    predict_slide(PositionModel(), slide_path, tmp_path, formats="ome-tiff,geojson", **FAST)
    out = tmp_path / "synthetic"
    levels, _ = read_levels(out / "labels.ome.tif")
    truth = grid_truth(SIZE, SIZE)
    np.testing.assert_array_equal(levels[0], truth)
    np.testing.assert_array_equal(levels[2], truth[::4, ::4])
    fc = json.loads((out / "annotations.geojson").read_text())
    feats = fc["features"]
    assert len(feats) == (SIZE // CELL) ** 2 // 2
    assert {f["properties"]["classification"]["name"] for f in feats} == {"odd"}
    # round trip on a corner of the slide: the polygons rasterise back to the map
    from shapely.geometry import shape

    polys = [shape(f["geometry"]) for f in feats]
    assert all(p.is_valid for p in polys)
    yy, xx = np.mgrid[0:256, 0:256] + 0.5
    back = np.zeros((256, 256), np.uint8)
    for p in polys:
        if p.bounds[0] < 256 and p.bounds[1] < 256:
            back[shapely.contains_xy(p, xx, yy)] = 1
    np.testing.assert_array_equal(back, truth[:256, :256])


def test_kill_and_resume_is_byte_identical(slide_path, tmp_path):
    kw = {**FAST, "formats": "ome-tiff,geojson,png", "seed": 3}
    predict_slide(PositionModel(noise=True), slide_path, tmp_path / "ref", **kw)
    with pytest.raises(RuntimeError, match="simulated crash"):
        predict_slide(PositionModel(fail_after=5, noise=True), slide_path, tmp_path / "run", **kw)
    state = json.loads((tmp_path / "run" / "synthetic" / ".work" / "state.json").read_text())
    assert state["batches_done"] == 5 and 0 < state["rows_done"] < SIZE
    with pytest.raises(CheckpointError, match="seed"):
        predict_slide(
            PositionModel(noise=True), slide_path, tmp_path / "run", **{**kw, "seed": 4, "resume": True}
        )
    # the failed resume above did not touch the state: resume for real
    model = PositionModel(noise=True)
    predict_slide(model, slide_path, tmp_path / "run", **{**kw, "resume": True})
    assert model.calls == 11 - 5  # 81 tiles = 11 batches; only the unfinished batches ran
    for name in ("labels.ome.tif", "annotations.geojson", "overlay.png", "stats.json", "done.json"):
        assert (tmp_path / "run" / "synthetic" / name).read_bytes() == (
            tmp_path / "ref" / "synthetic" / name
        ).read_bytes(), name


def test_tissue_bounds_offset_and_target_mpp(tmp_path):
    img = np.full((700, 900, 3), 240, np.uint8)
    img[100:400, 200:600] = position_image(300, 400)
    img[100:400, 200:600, 2] = 200  # saturated: tissue
    slide = ArraySlide(img, mpp=0.5, downsamples=[1, 2, 4], bounds_offset=(100, 40), path="bounded.svs")
    res = predict_slide(
        PositionModel(),
        slide,
        tmp_path,
        tile_px=128,
        overlap_px=16,
        batch_size=4,
        progress=False,
        formats="ome-tiff,geojson",
    )
    assert 0 < res.n_tiles < res.stats["tiles_total"]  # background tiles skipped
    levels, _ = read_levels(tmp_path / "bounded" / "labels.ome.tif")
    assert [lv.shape for lv in levels] == [(700, 900), (350, 450), (175, 225)]
    fc = json.loads((tmp_path / "bounded" / "annotations.geojson").read_text())
    xs = [p[0] for f in fc["features"] for p in f["geometry"]["coordinates"][0]]
    ys = [p[1] for f in fc["features"] for p in f["geometry"]["coordinates"][0]]
    # QuPath frame: level-0 minus the bounds offset
    assert min(xs) >= 200 - 100 and min(ys) >= 100 - 40
    # predicting at 1 um/px on a 0.5 um/px slide halves the map; GeoJSON stays in level-0 px
    res2 = predict_slide(
        ConstantModel(),
        slide,
        tmp_path / "half",
        target_mpp=1.0,
        tile_px=128,
        overlap_px=16,
        batch_size=4,
        progress=False,
        formats="ome-tiff,geojson",
        coords="level0",
    )
    levels2, ome2 = read_levels(tmp_path / "half" / "bounded" / "labels.ome.tif")
    assert levels2[0].shape == (350, 450) and 'PhysicalSizeX="1.0"' in ome2
    assert res2.stats["classes"][1]["area_px_level0"] == levels2[0].astype(bool).sum() * 4
    fc2 = json.loads((tmp_path / "half" / "bounded" / "annotations.geojson").read_text())
    xs2 = [p[0] for f in fc2["features"] for p in f["geometry"]["coordinates"][0]]
    assert max(xs2) <= 900 and max(xs2) > 450


def test_no_tissue_gives_empty_map(tmp_path):
    slide = ArraySlide(np.full((300, 300, 3), 245, np.uint8), path="empty.tif")
    res = predict_slide(ConstantModel(), slide, tmp_path, tile_px=128, overlap_px=16, progress=False)
    assert res.n_tiles == 0
    levels, _ = read_levels(tmp_path / "empty" / "labels.ome.tif")
    assert (levels[0] == 0).all()
    assert json.loads((tmp_path / "empty" / "annotations.geojson").read_text())["features"] == []


def test_manifest_and_shards(tmp_path):
    for i in range(3):
        img = np.full((200, 200, 3), 240, np.uint8)
        img[50:150, 50:150] = (200, 80, 160)
        tifffile.imwrite(tmp_path / f"s{i}.tif", img, photometric="rgb")
    (tmp_path / "slides.csv").write_text("path,mpp\ns0.tif,0.5\ns1.tif,\ns2.tif,0.25\n")
    jobs = read_manifest(tmp_path / "slides.csv")
    assert [j.mpp for j in jobs] == [0.5, None, 0.25]
    res = run_manifest(
        ConstantModel(),
        tmp_path / "slides.csv",
        tmp_path / "out",
        shard=(1, 2),
        tile_px=64,
        overlap_px=8,
        progress=False,
        formats="ome-tiff",
    )
    assert [r.id for r in res] == ["s1"]
    assert not (tmp_path / "out" / "s0").exists()
    assert parse_shard("3/4") == (3, 4)
    with pytest.raises(InputError, match="i/N"):
        parse_shard("4")
    with pytest.raises(InputError, match="0 <= i < N"):
        parse_shard("4/4")
    with pytest.raises(InputError, match="did you mean 'geojson'"):
        parse_formats("geojsn")


def test_cli_slide_predict(tmp_path, monkeypatch):
    from ldiffusion.cli import main

    img = np.full((256, 256, 3), 240, np.uint8)
    img[64:192, 64:192] = (200, 80, 160)
    tifffile.imwrite(tmp_path / "cli.tif", img, photometric="rgb")
    import ldiffusion.methods as methods

    seen = []
    monkeypatch.setattr(methods, "load_segmenter",
                        lambda run, device, overrides=(): seen.append(list(overrides)) or ConstantModel())
    rc = main(
        [
            "slide",
            "predict",
            str(tmp_path / "run"),
            str(tmp_path / "cli.tif"),
            "--out",
            str(tmp_path / "o"),
            "--mpp",
            "0.5",
            "--tile",
            "64",
            "--overlap",
            "8",
            "--batch-size",
            "2",
            "--no-progress",
            "--device",
            "cpu",
            "--set",
            "min_object_px=500",
        ]
    )
    assert rc == 0
    assert seen == [["min_object_px=500"]]  # --set reaches the model, as in `predict`
    assert (tmp_path / "o" / "cli" / "done.json").is_file()
    assert main(["slide", "predict", str(tmp_path / "run"), "--out", str(tmp_path / "o")]) == 2


def test_real_segmenter_interface(tmp_path):
    from ldiffusion.methods import create_method

    seg = create_method("unet", preset="tiny", num_classes=3, class_names=["bg", "nuc", "other"]).eval()
    img = np.full((200, 260, 3), 240, np.uint8)
    img[40:160, 40:220] = (200, 80, 160)
    res = predict_slide(
        seg,
        ArraySlide(img, mpp=0.5, path="real.tif"),
        tmp_path,
        tile_px=60,
        overlap_px=12,
        batch_size=4,
        progress=False,
        formats="ome-tiff,geojson,png",
    )
    assert res.n_tiles > 0
    levels, _ = read_levels(tmp_path / "real" / "labels.ome.tif")
    assert levels[0].shape == (200, 260) and levels[0].max() < 3
    fc = json.loads((tmp_path / "real" / "annotations.geojson").read_text())
    assert {f["properties"]["classification"]["name"] for f in fc["features"]} <= {"nuc", "other"}


_KILLED_CHILD = """
import sys, time
sys.path.insert(0, {repo!r})
from tests.infer.test_slide_predict import FAST, PositionModel
from ldiffusion.infer.slide_predict import predict_slide

fast_predict = PositionModel.predict_proba

def slow_predict(self, images, *, generator=None):
    time.sleep(0.5)  # leaves the parent time to kill the process between and during batches
    return fast_predict(self, images, generator=generator)

PositionModel.predict_proba = slow_predict  # same class name: the resume checks the model's identity
predict_slide(PositionModel(noise=True), {slide!r}, {out!r},
              **{{**FAST, "formats": "ome-tiff,geojson,png", "seed": 3}})
"""


def test_sigkill_mid_run_then_resume_is_byte_identical(slide_path, tmp_path):
    """A real `kill -9` of the predicting process (no exception handler runs), then `resume=True`."""
    kw = {**FAST, "formats": "ome-tiff,geojson,png", "seed": 3}
    predict_slide(PositionModel(noise=True), slide_path, tmp_path / "ref", **kw)
    repo = str(Path(__file__).resolve().parents[2])
    code = _KILLED_CHILD.format(repo=repo, slide=str(slide_path), out=str(tmp_path / "run"))
    child = subprocess.Popen([sys.executable, "-c", code], cwd=repo)
    state_file = tmp_path / "run" / "synthetic" / ".work" / "state.json"
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and child.poll() is None:
            if (
                state_file.is_file()
                and json.loads(state_file.read_text() or "{}").get("batches_done", 0) >= 3
            ):
                break
            time.sleep(0.05)
        assert child.poll() is None, "the child finished or failed before it could be killed"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    assert not (tmp_path / "run" / "synthetic" / "done.json").exists()
    done_before = json.loads(state_file.read_text())["batches_done"]
    assert 3 <= done_before < 11

    model = PositionModel(noise=True)
    predict_slide(model, slide_path, tmp_path / "run", **{**kw, "resume": True})
    assert model.calls <= 11 - 3
    for name in ("labels.ome.tif", "annotations.geojson", "overlay.png", "stats.json", "done.json"):
        assert (tmp_path / "run" / "synthetic" / name).read_bytes() == (
            tmp_path / "ref" / "synthetic" / name
        ).read_bytes(), name


def test_uncertainty_pyramid_is_the_normalised_entropy(slide_path, tmp_path):
    predict_slide(ConstantModel(), slide_path, tmp_path, formats="ome-tiff,uncertainty", **FAST)
    out = tmp_path / "synthetic"
    labels, _ = read_levels(out / "labels.ome.tif")
    unc, ome = read_levels(out / "uncertainty.ome.tif")
    assert [lv.shape for lv in unc] == [lv.shape for lv in labels]
    p = np.array([0.3, 0.7])
    expected = round(255 * float(-(p * np.log(p)).sum() / np.log(2)))  # 224
    assert all((lv == expected).all() for lv in unc)
    assert 'PhysicalSizeX="0.25"' in ome
    # a one-hot model is certain everywhere
    predict_slide(PositionModel(), slide_path, tmp_path / "b", formats="uncertainty", **FAST)
    certain, _ = read_levels(tmp_path / "b" / "synthetic" / "uncertainty.ome.tif")
    assert all((lv == 0).all() for lv in certain)


class ContourModel:
    """A contour-target model that reads its probabilities from the image: red = p(object),
    blue = p(interior | object); classes background, gland, boundary."""

    num_classes = 3
    class_names = ("background", "gland", "boundary")

    def __init__(self, **post):
        keys = {"target": "contour", "boundary_px": 2, "marker_threshold": None, "marker_erosion_px": 0,
                "min_object_px": 10, "input_scale": 1.0, **post}
        self.cfg = type("Cfg", (), keys)()

    def predict_proba(self, images, *, generator=None):
        obj, inner = images[:, 0], images[:, 2]
        return torch.stack([1 - obj, obj * inner, obj * (1 - inner)], 1)


def contour_slide():
    """Two glands whose interiors touch through a thin, unsure bridge (p(interior) 0.6 there)."""
    img = np.zeros((200, 300, 3), np.uint8)
    img[40:160, 30:270, 0] = 255  # one object region ...
    img[40:160, 30:270, 2] = 25  # ... mostly boundary-like,
    img[50:150, 40:140, 2] = 230  # two sure interiors
    img[50:150, 160:260, 2] = 230
    img[95:105, 140:160, 2] = 153  # joined by a thin bridge that the arg-max calls interior
    return img


def test_slide_contour_postprocessing_matches_predict(tmp_path):
    from ldiffusion.data.targets import redraw_markers

    img = contour_slide()
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
    probs = ContourModel().predict_proba(x)[0].numpy()
    kw = {"tile_px": 64, "overlap_px": 16, "batch_size": 4, "progress": False, "tissue": False,
          "chunk_px": 64, "formats": "ome-tiff,geojson"}
    counts, areas = {}, {}
    for name, post in {"argmax": {}, "threshold": {"marker_threshold": 0.7},
                       "eroded": {"marker_threshold": 0.7, "marker_erosion_px": 5},
                       "min-size": {"marker_threshold": 0.7, "min_object_px": 20000}}.items():
        model = ContourModel(**post)
        predict_slide(model, ArraySlide(img, mpp=0.5, path="glands.tif"), tmp_path / name, **kw)
        levels, _ = read_levels(tmp_path / name / "glands" / "labels.ome.tif")
        expected = redraw_markers(probs, marker_threshold=model.cfg.marker_threshold,
                                  marker_erosion_px=model.cfg.marker_erosion_px)
        np.testing.assert_array_equal(levels[0], expected)  # chunk borders change nothing
        feats = json.loads((tmp_path / name / "glands" / "annotations.geojson").read_text())["features"]
        counts[name] = len(feats)
        areas[name] = sorted(shapely.geometry.shape(f["geometry"]).area for f in feats)  # level-0 px
    assert counts == {"argmax": 1, "threshold": 2, "eroded": 2, "min-size": 0}
    # markers grown back by boundary_px (+ the erosion): each gland is its 100 px interior + 2 px
    assert areas["threshold"] == areas["eroded"] == [104 * 104, 104 * 104]
