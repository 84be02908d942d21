"""Disk-backed merging: no seams, exact coverage, chunked finalisation, resume state, pyramid."""

from __future__ import annotations

import numpy as np
import pytest

from ldiffusion.core.errors import CheckpointError, InputError
from ldiffusion.infer.merge import TileMerger, build_pyramid, labels_from_blend, pyramid_ratios
from ldiffusion.infer.tiling import tile_grid


def _run(merger, fn):
    for b in merger.pending_batches():
        tiles = merger.batch_tiles(b)
        merger.add_batch(b, np.stack([fn(t) for t in tiles]).astype(np.float32))


def test_constant_probabilities_blend_without_seams(tmp_path):
    tiles = tile_grid(300, 200, 64, 16)
    m = TileMerger(tmp_path / "w", 300, 200, 3, tiles, 5, chunk_px=64, keep_tiles=True)
    const = np.array([0.2, 0.5, 0.3], np.float32)[:, None, None]
    _run(m, lambda t: np.broadcast_to(const, (3, 64, 64)))
    assert m.done
    acc, wsum = m.blend_region(0, 0, 300, 200)
    assert (wsum > 0).all()
    np.testing.assert_allclose(acc / wsum, np.broadcast_to(const, acc.shape), atol=1e-6)
    assert (np.asarray(m.labels[:]) == 1).all()


def test_batch_files_removed_once_final(tmp_path):
    tiles = tile_grid(300, 200, 64, 16)
    m = TileMerger(tmp_path / "w", 300, 200, 2, tiles, 5, chunk_px=64)
    seen = []
    for b in m.pending_batches():
        m.add_batch(b, np.full((len(m.batch_tiles(b)), 2, 64, 64), 0.5, np.float32))
        seen.append(len(list((tmp_path / "w" / "tiles").iterdir())))
    assert max(seen) < len(m.batches)  # only a band of batches is kept on disk
    assert not list((tmp_path / "w" / "tiles").iterdir())


def test_position_probabilities_reproduce_grid(tmp_path):
    H, W, K = 130, 170, 4
    truth = ((np.arange(W)[None, :] // 7 + np.arange(H)[:, None] // 5) % K).astype(np.uint8)
    tiles = tile_grid(W, H, 48, 12)
    m = TileMerger(tmp_path / "w", W, H, K, tiles, 3, chunk_px=32)

    def onehot(t):
        lab = np.zeros((t.h, t.w), np.int64)
        sub = truth[t.y : t.y + t.h, t.x : t.x + t.w]
        lab[: sub.shape[0], : sub.shape[1]] = sub
        return np.eye(K, dtype=np.float32)[lab].transpose(2, 0, 1)

    _run(m, onehot)
    np.testing.assert_array_equal(np.asarray(m.labels[:]), truth)


def test_rows_finalised_in_chunks_and_uncovered_is_background(tmp_path):
    tiles = [t for t in tile_grid(256, 256, 64, 0) if t.y >= 128]  # top half has no tissue
    m = TileMerger(tmp_path / "w", 256, 256, 2, tiles, 2, chunk_px=64)
    assert m.rows_done == 0
    m.add_batch(0, np.zeros((2, 2, 64, 64), np.float32) + np.array([0, 1], np.float32)[:, None, None])
    assert m.rows_done == 128  # rows above the next pending tile (y=128) are final
    _run(m, lambda t: np.stack([np.zeros((64, 64)), np.ones((64, 64))]))
    lab = np.asarray(m.labels[:])
    assert (lab[:128] == 0).all() and (lab[128:] == 1).all()


def test_resume_state_and_parameter_check(tmp_path):
    tiles = tile_grid(100, 100, 32, 8)
    m = TileMerger(tmp_path / "w", 100, 100, 2, tiles, 4, params={"seed": 0})
    m.add_batch(0, np.ones((4, 2, 32, 32), np.float32) / 2)
    m2 = TileMerger(tmp_path / "w", 100, 100, 2, tiles, 4, params={"seed": 0}, resume=True)
    assert m2.batches_done == 1 and m2.pending_batches()[0] == 1
    with pytest.raises(InputError, match="batch 2 given"):
        m2.add_batch(2, np.ones((4, 2, 32, 32), np.float32))
    with pytest.raises(InputError, match="shape"):
        m2.add_batch(1, np.ones((4, 3, 32, 32), np.float32))
    with pytest.raises(CheckpointError, match="seed"):
        TileMerger(tmp_path / "w", 100, 100, 2, tiles, 4, params={"seed": 1}, resume=True)
    m3 = TileMerger(tmp_path / "w", 100, 100, 2, tiles, 4, params={"seed": 1}, resume=False)
    assert m3.batches_done == 0


def test_labels_from_blend_ties_and_uncovered():
    acc = np.array([[[1.0, 0.0, 0.0]], [[1.0, 2.0, 0.0]]], np.float32)
    wsum = np.array([[1.0, 1.0, 0.0]], np.float32)
    np.testing.assert_array_equal(labels_from_blend(acc, wsum), [[0, 1, 0]])


def test_pyramid(tmp_path):
    zarr = pytest.importorskip("zarr")
    lab = (np.arange(100 * 90).reshape(100, 90) % 7).astype(np.uint8)
    z = zarr.create_array(store=str(tmp_path / "l0.zarr"), shape=lab.shape, chunks=(32, 32), dtype="uint8")
    z[:] = lab
    assert pyramid_ratios((1.0, 2.0, 8.0), 90, 100) == [2, 4]
    assert pyramid_ratios((1.0,), 5000, 100) == [2, 2, 2]
    levels = build_pyramid(z, tmp_path, [2, 4], chunk_px=16)
    assert [lv.shape for lv in levels] == [(100, 90), (50, 45), (13, 12)]
    np.testing.assert_array_equal(np.asarray(levels[2][:]), lab[::8, ::8])


def test_crash_between_batch_file_and_state_resumes_identically(tmp_path, monkeypatch):
    tiles = tile_grid(200, 150, 48, 8)
    rng = np.random.default_rng(0)
    probs = {t.index: rng.random((2, 48, 48)).astype(np.float32) for t in tiles}

    ref = TileMerger(tmp_path / "ref", 200, 150, 2, tiles, 3, chunk_px=32)
    _run(ref, lambda t: probs[t.index])

    m = TileMerger(tmp_path / "w", 200, 150, 2, tiles, 3, chunk_px=32)
    calls = {"n": 0}
    real = TileMerger._save_state

    def flaky(self):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt  # killed after a batch file and its chunks were written
        real(self)

    monkeypatch.setattr(TileMerger, "_save_state", flaky)
    with pytest.raises(KeyboardInterrupt):
        _run(m, lambda t: probs[t.index])
    monkeypatch.setattr(TileMerger, "_save_state", real)
    m2 = TileMerger(tmp_path / "w", 200, 150, 2, tiles, 3, chunk_px=32, resume=True)
    assert 0 < m2.batches_done < len(m2.batches)
    _run(m2, lambda t: probs[t.index])
    np.testing.assert_array_equal(np.asarray(m2.labels[:]), np.asarray(ref.labels[:]))


def _redraw_probs(h: int, w: int) -> np.ndarray:
    """(3, h, w) contour probabilities: blobs whose interiors touch through thin bridges."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:h, 0:w]
    interior = np.zeros((h, w), np.float32)
    for cy, cx in rng.integers(10, [h - 10, w - 10], size=(12, 2)):
        interior = np.maximum(interior, np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 120.0))
    obj = (interior > 0.2).astype(np.float32) * 0.9 + 0.05
    p_int = obj * np.clip(interior * 1.3, 0.0, 1.0)
    return np.stack([1.0 - obj, p_int, obj - p_int]).astype(np.float32)


def test_relabelled_chunks_match_the_whole_map_whatever_the_chunk_borders(tmp_path):
    from ldiffusion.data.targets import redraw_markers

    H, W = 150, 190
    probs = _redraw_probs(H, W)
    erode = lambda p: redraw_markers(p, marker_erosion_px=4)  # noqa: E731
    whole = erode(probs)
    tiles = tile_grid(W, H, 48, 12)

    def crop(t):
        out = np.zeros((3, t.h, t.w), np.float32)
        sub = probs[:, t.y : t.y + t.h, t.x : t.x + t.w]
        out[:, : sub.shape[1], : sub.shape[2]] = sub
        return out

    m = TileMerger(tmp_path / "w", W, H, 3, tiles, 3, chunk_px=32, labels_fn=erode, margin_px=4)
    _run(m, crop)
    assert m.done and not list((tmp_path / "w" / "tiles").iterdir())  # batch files still cleaned up
    np.testing.assert_array_equal(np.asarray(m.labels[:]), whole)
    # without the margin the erosion eats into every chunk border: the map is not the whole one
    m0 = TileMerger(tmp_path / "w0", W, H, 3, tiles, 3, chunk_px=32, labels_fn=erode, margin_px=0)
    _run(m0, crop)
    assert (np.asarray(m0.labels[:]) != whole).any()
    with pytest.raises(InputError, match="margin_px"):
        TileMerger(tmp_path / "w1", W, H, 3, tiles, 3, margin_px=-1)
