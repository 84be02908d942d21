"""BCSS converter on generated images/ + masks/ pairs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldiffusion.core.errors import DatasetFormatError
from ldiffusion.data.converters import CONVERTERS
from ldiffusion.data.converters.bcss import class_map
from ldiffusion.data.format import read_dataset_info, read_mask
from ldiffusion.data.splits import check_disjoint

SLIDES = ("TCGA-A1-A0SK-DX1", "TCGA-A2-A0CM-DX1", "TCGA-AR-A1AR-DX1", "TCGA-BH-A18V-DX1")


def _make(root: Path) -> dict[str, np.ndarray]:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    masks = {}
    for s, slide in enumerate(SLIDES):
        for r in range(2):
            stem = f"{slide}_xmin{1000 * r}_ymin{500 * s}_MPP-0.2500"
            m = np.arange(24 * 16).reshape(16, 24) % 22  # every code 0..21
            m = np.roll(m, s + r, axis=1).astype(np.uint8)
            image = rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)
            Image.fromarray(image).save(root / "images" / f"{stem}.png")
            Image.fromarray(m).save(root / "masks" / f"{stem}.png")
            masks[stem] = m
    return masks


@pytest.mark.parametrize("classes", ["full", "main"])
def test_convert(tmp_path: Path, classes: str) -> None:
    masks = _make(tmp_path / "src")
    info = CONVERTERS.get("bcss")(tmp_path / "src", tmp_path / "out", progress=False, classes=classes,
                                  val=1, test=1)
    assert info.classes[0].name == "background (unused)"
    assert info.num_classes == (22 if classes == "full" else 6)
    disk = read_dataset_info(tmp_path / "out")
    assert sum(len(v) for v in disk.splits.values()) == 8 and all(len(v) == 2 for v in
                                                                   (disk.splits["val"], disk.splits["test"]))
    check_disjoint(disk.splits, disk.groups)
    assert set(disk.groups.values()) == set(SLIDES)
    for stem, m in masks.items():
        label = read_mask(tmp_path / "out/labels" / f"{stem}.png")
        if classes == "full":
            expected = np.where(m == 0, 255, m)
        else:
            lut = np.array([255, 1, 2, 3, 4, 5, 5, 255, 5, 5, 3, 3, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5])
            expected = lut[m]
        np.testing.assert_array_equal(label, expected)
        assert 0 not in label  # class 0 is declared but never used
    check = pytest.importorskip("ldiffusion.data.check")
    assert check.validate(tmp_path / "out") == []


def test_class_map_main() -> None:
    _, lut = class_map("main")
    assert lut[3] == lut[10] == lut[11] == 3 and lut[4] == 4 and lut[7] == 255 and lut[21] == 5


def test_bad_code_names_file(tmp_path: Path) -> None:
    _make(tmp_path / "src")
    bad = sorted((tmp_path / "src/masks").iterdir())[3]
    m = np.asarray(Image.open(bad)).copy()
    m[0, 0] = 40
    Image.fromarray(m).save(bad)
    with pytest.raises(DatasetFormatError, match=rf"{bad.name}.*mask value 40"):
        CONVERTERS.get("bcss")(tmp_path / "src", tmp_path / "out", progress=False)
