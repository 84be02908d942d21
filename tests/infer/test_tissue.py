"""Tissue detection finds stained regions and skips glass."""

from __future__ import annotations

import numpy as np

from ldiffusion.infer.slide import ArraySlide
from ldiffusion.infer.tiling import tile_grid
from ldiffusion.infer.tissue import detect_tissue, saturation, select_tiles, tissue_mask_from_rgb


def test_saturation():
    rgb = np.array([[[255, 255, 255], [255, 0, 0], [0, 0, 0]]], np.uint8)
    np.testing.assert_allclose(saturation(rgb), [[0.0, 1.0, 0.0]])


def test_mask_and_tile_selection():
    rng = np.random.default_rng(0)
    img = np.full((1024, 1024, 3), 235, np.uint8)
    img += rng.integers(0, 8, img.shape, dtype=np.uint8)  # noisy glass
    img[300:700, 140:480] = (220, 120, 180)  # pink tissue
    img[300:302, 900:902] = (120, 60, 160)  # a speck: removed as a small object
    s = ArraySlide(img, downsamples=[1, 4])
    t = detect_tissue(s, thumbnail_px=256)
    assert t.mask.shape == (256, 256) and t.downsample == 4
    assert t.mask[76:174, 36:119].mean() > 0.99
    assert t.mask[:, 125:].sum() == 0 and t.mask[:70].sum() == 0
    tiles = tile_grid(1024, 1024, 256, 0)
    kept = select_tiles(tiles, t)
    assert {(k.x, k.y) for k in kept} == {(x, y) for x in (0, 256) for y in (256, 512)}
    assert select_tiles(tiles, None) == tiles


def test_all_tissue_slide_is_all_tissue():
    rng = np.random.default_rng(1)
    img = np.stack(
        [
            rng.integers(150, 255, (128, 128)),
            rng.integers(0, 120, (128, 128)),
            rng.integers(100, 200, (128, 128)),
        ],
        -1,
    ).astype(np.uint8)
    mask, thr = tissue_mask_from_rgb(img)
    assert mask.mean() > 0.99 and thr <= 0.15
