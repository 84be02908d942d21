"""`ldiffusion slide suggest`: uncertainty scores, spaced top-N selection, QuPath GeoJSON output."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from ldiffusion.cli import main
from ldiffusion.core.errors import InputError
from ldiffusion.infer.slide import ArraySlide
from ldiffusion.infer.suggest import (
    normalised_entropy,
    select_spaced,
    suggest_regions,
    tile_scores,
    write_suggestions,
)

shapely = pytest.importorskip("shapely")


@pytest.fixture(autouse=True)
def _restore_logging():
    """`main()` reconfigures the root logger onto the captured stderr; undo it after each test."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


class BrightnessSegmenter:
    """2 classes; p(class 1) = mean brightness of each pixel: grey (0.5) is the most uncertain."""

    num_classes = 2

    def predict_proba(
        self, images: torch.Tensor, *, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        p1 = images.mean(1, keepdim=True).clamp(0.0, 1.0)
        return torch.cat([1 - p1, p1], 1)


class NoisySegmenter(BrightnessSegmenter):
    """A stochastic stub: `predict_with_uncertainty` returns noise drawn from the generator."""

    def predict_with_uncertainty(
        self, images: torch.Tensor, *, generator: torch.Generator | None = None, n_samples: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        b, _, h, w = images.shape
        unc = torch.rand((b, h, w), generator=generator) * float(n_samples or 1) / 10
        return self.predict_proba(images), unc


def _slide(seed: int = 0, size: int = 512) -> np.ndarray:
    """Tissue-like colours whose brightness varies smoothly, plus a white glass margin."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]
    v = 0.5 + 0.45 * np.sin(x / 37.0 + rng.uniform(0, 6)) * np.cos(y / 53.0 + rng.uniform(0, 6))
    img = np.stack([v * 230, v * 120, v * 200], -1).astype(np.uint8)
    img[:, : size // 8] = 255
    return img


def test_normalised_entropy_and_scores() -> None:
    p = torch.tensor([[0.5, 0.5], [1.0, 0.0]]).T.reshape(1, 2, 1, 2)  # (B=1, K=2, H=1, W=2)
    np.testing.assert_allclose(normalised_entropy(p).numpy(), [[[1.0, 0.0]]], atol=1e-6)
    x = torch.full((2, 3, 4, 4), 0.5)
    x[1] = 1.0
    s = tile_scores(BrightnessSegmenter(), x)
    assert s.shape == (2,) and s[0] == pytest.approx(1.0, abs=1e-5) and s[1] == pytest.approx(0.0, abs=1e-5)
    with pytest.raises(InputError, match="samples"):
        tile_scores(BrightnessSegmenter(), x, samples=0)


def test_select_spaced_greedy_nms() -> None:
    centres = np.array([[0, 0], [10, 0], [100, 0], [105, 0], [300, 0]], float)
    scores = np.array([5.0, 4.0, 3.0, 9.0, 1.0])
    assert select_spaced(centres, scores, 10, 50) == [3, 0, 4]  # 2 is within 50 of 3, 1 within 50 of 0
    assert select_spaced(centres, scores, 2, 50) == [3, 0]
    assert select_spaced(centres, scores, 3, 0) == [3, 0, 1]
    assert select_spaced(centres, np.ones(5), 2, 0) == [0, 1]  # ties: earlier index first


def _check_geojson(path: Path, n: int, min_spacing: float) -> list[dict]:
    gj = json.loads(path.read_text())
    assert gj["type"] == "FeatureCollection"
    feats = gj["features"]
    assert len(feats) == n
    geoms = [shapely.geometry.shape(f["geometry"]) for f in feats]
    assert all(g.is_valid and g.geom_type == "Polygon" and g.area > 0 for g in geoms)
    centres = np.array([[g.centroid.x, g.centroid.y] for g in geoms])
    d = np.hypot(*(centres[:, None] - centres[None]).transpose(2, 0, 1))
    assert (d[~np.eye(n, dtype=bool)] >= min_spacing - 1e-9).all()
    props = [f["properties"] for f in feats]
    assert [p["rank"] for p in props] == list(range(1, n + 1))
    assert all(
        p["objectType"] == "annotation" and p["classification"]["name"] == "To annotate" for p in props
    )
    scores = [p["score"] for p in props]
    assert scores == sorted(scores, reverse=True)
    return feats


def test_suggest_regions_on_array_slide(tmp_path: Path) -> None:
    slide = ArraySlide(_slide(), mpp=0.5, path="synthetic.tif")
    res = suggest_regions(BrightnessSegmenter(), slide, n=6, tile_px=32, min_spacing_px=80, progress=False)
    assert len(res.suggestions) == 6 and res.n_tiles > 6
    assert all(s.x >= 64 for s in res.suggestions)  # the glass margin (x < 64) holds no tissue tile
    out = tmp_path / "next.geojson"
    assert write_suggestions(out, res) == 6
    feats = _check_geojson(out, 6, 80)
    first = shapely.geometry.shape(feats[0]["geometry"])
    s0 = res.suggestions[0]
    assert first.bounds == (s0.x, s0.y, s0.x + 32, s0.y + 32)  # level-0 pixels
    # the best tile is the greyest one: its score is the top of all tissue tiles
    assert s0.score >= max(s.score for s in res.suggestions)
    # at a coarser resolution a tile covers twice the level-0 extent
    res2 = suggest_regions(BrightnessSegmenter(), slide, n=3, tile_px=32, target_mpp=1.0, progress=False)
    assert {s.w for s in res2.suggestions} == {64.0}


def test_suggest_samples_use_method_spread_and_seed() -> None:
    slide = ArraySlide(_slide(1), mpp=0.5, path="s.tif")
    kw = dict(n=4, tile_px=32, samples=3, progress=False, batch_size=5)
    a = suggest_regions(NoisySegmenter(), slide, seed=7, **kw)
    b = suggest_regions(NoisySegmenter(), slide, seed=7, **kw)
    c = suggest_regions(NoisySegmenter(), slide, seed=8, **kw)
    assert a.suggestions == b.suggestions
    assert a.suggestions != c.suggestions
    assert all(0.0 <= s.score <= 0.3 for s in a.suggestions)  # spread in [0, 3/10)


def test_suggest_errors() -> None:
    slide = ArraySlide(np.full((128, 128, 3), 255, np.uint8), mpp=0.5)
    with pytest.raises(InputError, match="no tile with tissue"):
        suggest_regions(BrightnessSegmenter(), slide, n=2, tile_px=32, progress=False)
    with pytest.raises(InputError, match="n=0"):
        suggest_regions(BrightnessSegmenter(), slide, n=0, progress=False)
    with pytest.raises(InputError, match="finer"):
        suggest_regions(
            BrightnessSegmenter(), slide, n=2, tile_px=32, target_mpp=0.25, tissue=False, progress=False
        )


def test_cli_suggest_with_tiny_unet_is_deterministic(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tifffile = pytest.importorskip("tifffile")
    pytest.importorskip("tiffslide")
    from ldiffusion.methods import create_method

    run = tmp_path / "run"
    create_method("unet", preset="tiny", num_classes=3).save(run)
    img = _slide(2, size=256)
    slide = tmp_path / "slide.tif"
    with tifffile.TiffWriter(slide, bigtiff=True) as tif:
        opts = {"tile": (256, 256), "photometric": "rgb", "compression": "zlib"}
        tif.write(img, subifds=1, resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER", **opts)
        tif.write(np.ascontiguousarray(img[::2, ::2]), subfiletype=1, **opts)
    args = [
        "slide",
        "suggest",
        str(run),
        str(slide),
        "--n",
        "5",
        "--tile",
        "64",
        "--min-spacing",
        "90",
        "--device",
        "cpu",
        "--seed",
        "3",
        "--no-progress",
        "--min-tissue",
        "0.2",
    ]
    out1, out2 = tmp_path / "a.geojson", tmp_path / "b.geojson"
    assert main([*args, "--out", str(out1)]) == 0
    assert "suggested 5 regions" in capsys.readouterr().out
    assert main([*args, "--out", str(out2)]) == 0
    assert out1.read_bytes() == out2.read_bytes()
    _check_geojson(out1, 5, 90)
    assert main([*args, "--out", str(tmp_path / "c.geojson"), "--coords", "pixels"]) == 2
    assert "--coords" in capsys.readouterr().err
