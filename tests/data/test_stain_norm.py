"""Reinhard stain normalisation: identity on its own statistics, moves statistics onto the reference,
ignores glass, reads its reference from an image or a data set's train split, and reaches `predict` and
`slide predict`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ldiffusion.core.errors import InputError
from ldiffusion.data.format import write_png
from ldiffusion.data.stain_norm import lab_stats, reference_stats, reinhard, train_split_stats


def he_like(seed: int, shift: tuple[int, int, int] = (0, 0, 0), size: int = 64) -> np.ndarray:
    """An (size, size, 3) uint8 pink-purple texture; `shift` moves its RGB like another stain batch."""
    rng = np.random.default_rng(seed)
    base = np.array([200, 120, 180], dtype=np.float64) + np.array(shift, dtype=np.float64)
    img = base + rng.normal(0.0, 25.0, (size, size, 1)) * np.array([0.5, 1.0, 0.6])
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def test_own_statistics_leave_the_image_unchanged():
    img = he_like(0)
    s = lab_stats([img])
    assert np.abs(reinhard(img, s, s).astype(int) - img).max() <= 1


def test_statistics_move_onto_the_reference():
    ref, other = he_like(1), he_like(2, shift=(-70, -40, -40))
    target, source = lab_stats([ref]), lab_stats([other])
    assert max(abs(a - b) for a, b in zip(source.mean, target.mean, strict=True)) > 5  # really shifted
    got = lab_stats([reinhard(other, source, target)])
    assert max(abs(a - b) for a, b in zip(got.mean, target.mean, strict=True)) < 1.0
    assert max(abs(a - b) / b for a, b in zip(got.std, target.std, strict=True)) < 0.1


def test_glass_does_not_count():
    img = he_like(3)
    half_glass = img.copy()
    half_glass[:, 32:] = 242  # grey-white: saturation 0
    full, half = lab_stats([img[:, :32]]), lab_stats([half_glass])
    assert half.pixels == 64 * 32
    assert np.allclose(full.mean, half.mean) and np.allclose(full.std, half.std)


def test_reference_from_an_image_and_from_a_train_split(synth_root, tmp_path):
    info = json.loads((synth_root / "dataset.json").read_text())
    train_ids = info["splits"]["train"]
    from ldiffusion.data.format import read_image

    pooled = lab_stats([read_image(synth_root / "images" / f"{i}.png") for i in train_ids])
    got = reference_stats(synth_root)
    assert got.pixels == pooled.pixels
    assert np.allclose(got.mean, pooled.mean) and np.allclose(got.std, pooled.std)
    one = tmp_path / "ref.png"
    write_png(one, he_like(4))
    assert np.allclose(reference_stats(one).mean, lab_stats([he_like(4)]).mean)


def test_bad_references_name_the_path(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        reference_stats(tmp_path / "missing.png")
    with pytest.raises(InputError, match=r"dataset\.json"):
        reference_stats(tmp_path)
    old_run = tmp_path / "old_run"
    old_run.mkdir()
    (old_run / "config.json").write_text(json.dumps({"method": "unet"}))
    with pytest.raises(InputError, match="stain_reference"):
        reference_stats(old_run)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(InputError, match="not an image file"):
        reference_stats(tmp_path / "notes.txt")
    with pytest.raises(InputError, match="uint8"):
        lab_stats([np.zeros((4, 4), np.uint8)])


@pytest.mark.e2e
def test_predict_feeds_the_normalised_image_and_refuses_a_bad_reference(synth_root, tmp_path, capsys):
    from ldiffusion.cli import main

    run = tmp_path / "run"
    assert main(["train", "--method", "unet", "--data", str(synth_root), "--out", str(run), "--preset",
                 "tiny", "--set", "steps=2", "--set", "val_every=2", "--set", "base=4", "--no-progress",
                 "--device", "cpu"]) == 0
    img = tmp_path / "shifted.png"
    write_png(img, he_like(5, shift=(-60, -40, -30), size=96))
    ref = tmp_path / "ref.png"
    write_png(ref, he_like(6, size=96))
    plain, normed = tmp_path / "plain", tmp_path / "normed"
    assert main(["predict", str(run), str(img), "--out", str(plain), "--save-prob", "--no-progress"]) == 0
    assert main(["predict", str(run), str(img), "--out", str(normed), "--save-prob", "--no-progress",
                 "--stain-normalize", str(ref)]) == 0
    assert not np.array_equal(np.load(plain / "shifted_prob.npy"), np.load(normed / "shifted_prob.npy"))
    # the same prediction as feeding the normalised image itself
    fixed = tmp_path / "fixed"
    fixed.mkdir()
    from ldiffusion.data.format import read_image

    shifted = read_image(img)
    write_png(fixed / "shifted.png", reinhard(shifted, lab_stats([shifted]), reference_stats(ref)))
    direct = tmp_path / "direct"
    assert main(["predict", str(run), str(fixed / "shifted.png"), "--out", str(direct), "--save-prob",
                 "--no-progress"]) == 0
    assert np.array_equal(np.load(direct / "shifted_prob.npy"), np.load(normed / "shifted_prob.npy"))
    capsys.readouterr()
    assert main(["predict", str(run), str(img), "--out", str(tmp_path / "p"), "--no-progress",
                 "--stain-normalize", str(tmp_path / "nope.png")]) == 2
    err = capsys.readouterr().err
    assert "nope.png" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "p").exists()
    # the run folder stores its training colours: REF = the run is REF = its data set
    stored = json.loads((run / "config.json").read_text())["stain_reference"]
    assert stored == reference_stats(synth_root).to_json() == train_split_stats(synth_root).to_json()
    assert reference_stats(run) == reference_stats(synth_root)  # the same numbers, not just close
    by_run, by_data = tmp_path / "by_run", tmp_path / "by_data"
    for ref_path, dest in ((run, by_run), (synth_root, by_data)):
        assert main(["predict", str(run), str(img), "--out", str(dest), "--save-prob", "--no-progress",
                     "--stain-normalize", str(ref_path)]) == 0
    assert np.array_equal(np.load(by_run / "shifted_prob.npy"), np.load(by_data / "shifted_prob.npy"))
    # benchmarks/cross_source.py passes the reference on and records it per row
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "cross_source.py"
    spec = importlib.util.spec_from_file_location("cross_source", script)
    cross_source = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cross_source)
    out = tmp_path / "cross.json"
    assert cross_source.main(["--run", f"tiny-norm={run}", "--data", str(synth_root), "--splits", "val",
                              "--work", str(tmp_path / "work"), "--stain-normalize", str(ref),
                              "--out", str(out)]) == 0
    row = json.loads(out.read_text())["rows"][0]
    assert row["stain_normalize"] == str(ref) and 0.0 <= row["nucleus_dice"] <= 1.0


class RecordingModel:
    """Returns class 1 everywhere and keeps every batch of tiles it was given (B, 3, H, W) in [0, 1]."""

    num_classes = 2

    def __init__(self) -> None:
        self.seen: list[torch.Tensor] = []

    def predict_proba(self, images, *, generator=None):
        self.seen.append(images.clone())
        b, _, h, w = images.shape
        return torch.tensor([0.2, 0.8]).view(1, 2, 1, 1).expand(b, 2, h, w).clone()


def test_slide_tiles_share_one_transform_recorded_in_done_json(tmp_path):
    pytest.importorskip("tifffile")
    from ldiffusion.infer.slide import ArraySlide
    from ldiffusion.infer.slide_predict import predict_slide

    image = np.concatenate([he_like(7, shift=(-60, -40, -30), size=128),
                            he_like(8, shift=(-50, -30, -20), size=128)], axis=1)  # (128, 256, 3)
    target = lab_stats([he_like(9)])
    model = RecordingModel()
    res = predict_slide(model, ArraySlide(image, mpp=0.5, path="s"), tmp_path / "out", tile_px=128,
                        overlap_px=0, batch_size=1, progress=False, tissue=False, formats="ome-tiff",
                        stain_target=target)
    source = lab_stats([image])  # the whole slide fits in the thumbnail
    tiles = [(t[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8) for t in model.seen]
    assert len(tiles) == 2
    assert np.array_equal(tiles[0], reinhard(image[:, :128], source, target))
    assert np.array_equal(tiles[1], reinhard(image[:, 128:], source, target))
    done = json.loads((tmp_path / "out" / res.id / "done.json").read_text())
    assert done["params"]["stain_normalize"] == {"target": target.to_json(), "source": source.to_json()}
