"""benchmarks/peers/nnunet.py: export to nnU-Net's raw format, prediction copy (no nnunetv2 needed)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldiffusion.core.errors import DatasetFormatError, InputError
from tests.benchmarks._scripts import load_script

nn = load_script("peers/nnunet")


def _dataset(root: Path, ignore_in: str | None = "a") -> Path:
    """Five 8x6 RGB cases: train a, b; val c; test d, e. Label of `ignore_in` holds one 255 pixel."""
    splits = {"train": ["a", "b"], "val": ["c"], "test": ["d", "e"]}
    rng = np.random.default_rng(0)
    for sub in ("images", "labels"):
        (root / sub).mkdir(parents=True)
    for i, case in enumerate(["a", "b", "c", "d", "e"]):
        Image.fromarray(rng.integers(0, 256, (8, 6, 3), dtype=np.uint8)).save(root / "images" / f"{case}.png")
        lab = np.zeros((8, 6), np.uint8)
        lab[2:5, 1:4] = 1
        lab[0, i] = 1
        if case == ignore_in:
            lab[7, 5] = 255
        Image.fromarray(lab).save(root / "labels" / f"{case}.png")
    meta = {"name": "tiny-set", "task": "semantic", "ignore_index": 255, "splits": splits,
            "classes": [{"id": 0, "name": "background", "color": [0, 0, 0]},
                        {"id": 1, "name": "nucleus", "color": [255, 0, 0]}]}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def test_export_layout_labels_and_split(tmp_path):
    data = _dataset(tmp_path / "data")
    rec = nn.export_dataset(data, tmp_path / "raw", 777)
    out = tmp_path / "raw" / "Dataset777_tinyset"
    assert rec["folder"] == out.name
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == ["a_0000.png", "b_0000.png", "c_0000.png"]
    assert sorted(p.name for p in (out / "labelsTr").iterdir()) == ["a.png", "b.png", "c.png"]
    assert sorted(p.name for p in (out / "imagesTs").iterdir()) == ["d_0000.png", "e_0000.png"]
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "R", "1": "G", "2": "B"} and meta["file_ending"] == ".png"
    assert meta["labels"] == {"background": 0, "nucleus": 1, "ignore": 2} and meta["numTraining"] == 3
    # 255 -> 2 (nnU-Net's ignore label); other ids unchanged
    src = np.asarray(Image.open(data / "labels" / "a.png"))
    lab = np.asarray(Image.open(out / "labelsTr" / "a.png"))
    assert lab.dtype == np.uint8 and lab[7, 5] == 2
    assert np.array_equal(lab[src != 255], src[src != 255])
    img = np.asarray(Image.open(out / "imagesTr" / "c_0000.png"))
    assert img.shape == (8, 6, 3) and np.array_equal(img, np.asarray(Image.open(data / "images" / "c.png")))
    assert nn.splits_final(rec) == [{"train": ["a", "b"], "val": ["c"]}]
    assert not [p for p in (tmp_path / "raw").iterdir() if p.name.startswith(".")]  # no staging left


def test_no_ignore_label_without_255_and_reexport_replaces(tmp_path):
    data = _dataset(tmp_path / "data", ignore_in=None)
    nn.export_dataset(data, tmp_path / "raw", 5)
    out = tmp_path / "raw" / "Dataset005_tinyset"
    (out / "imagesTr" / "stale_0000.png").write_bytes(b"x")
    rec = nn.export_dataset(data, tmp_path / "raw", 5)
    assert rec["ignore_label"] is None
    assert json.loads((out / "dataset.json").read_text())["labels"] == {"background": 0, "nucleus": 1}
    assert not (out / "imagesTr" / "stale_0000.png").exists()


def test_refuses_foreign_folder_and_unknown_label(tmp_path):
    data = _dataset(tmp_path / "data")
    (tmp_path / "raw" / "Dataset777_tinyset").mkdir(parents=True)
    with pytest.raises(InputError, match="not written by"):
        nn.export_dataset(data, tmp_path / "raw", 777)
    Image.fromarray(np.full((8, 6), 7, np.uint8)).save(data / "labels" / "b.png")
    with pytest.raises(DatasetFormatError, match=r"b\.png: label values \[7\]"):
        nn.export_dataset(data, tmp_path / "raw2", 777)
    assert not (tmp_path / "raw2" / "Dataset777_tinyset").exists()


def test_convert_predictions(tmp_path):
    src, dst = tmp_path / "nn", tmp_path / "ours"
    src.mkdir()
    Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8)).save(src / "d.png")
    nn.convert_predictions(src, dst, ["d"], 2)
    assert np.array_equal(np.asarray(Image.open(dst / "d.png")), [[0, 1], [1, 0]])
    with pytest.raises(InputError, match="no prediction"):
        nn.convert_predictions(src, dst, ["e"], 2)
    Image.fromarray(np.array([[0, 2]], np.uint8)).save(src / "f.png")
    with pytest.raises(InputError, match="class id 2"):
        nn.convert_predictions(src, dst, ["f"], 2)
