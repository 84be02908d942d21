"""Generic image/mask folder converter on generated PNG/JPEG/BMP files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldiffusion.core.errors import ConfigError, DatasetFormatError, InputError
from ldiffusion.data.converters import CONVERTERS
from ldiffusion.data.converters.folder import parse_mapping
from ldiffusion.data.format import read_dataset_info, read_mask

RED, GREEN = (255, 0, 0), (0, 255, 0)
IMG_EXT = (".png", ".jpg", ".bmp")
MASK_EXT = (".png", ".bmp")


def _colour_folder(root: Path, n: int = 20) -> dict[str, np.ndarray]:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(1)
    expected = {}
    for k in range(n):
        ids = np.zeros((12, 10), dtype=np.uint8)
        ids[2:6, 1:4] = 1
        ids[7:, 5 + k % 3:] = 2
        rgb = np.zeros((12, 10, 3), dtype=np.uint8)
        rgb[ids == 1], rgb[ids == 2] = RED, GREEN
        stem = f"case{k:02d}"
        Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(
            root / "images" / f"{stem}{IMG_EXT[k % 3]}")
        Image.fromarray(rgb).save(root / "masks" / f"{stem}{MASK_EXT[k % 2]}")
        expected[stem] = ids
    return expected


def test_colour_map(tmp_path: Path) -> None:
    expected = _colour_folder(tmp_path / "src")
    info = CONVERTERS.get("folder")(tmp_path / "src", tmp_path / "out", progress=False,
                                    mapping="0,0,0=0;255,0,0=1;0,255,0=2", names="bg,tumour,stroma")
    assert info.class_names == ["bg", "tumour", "stroma"] and info.classes[1].color == RED
    disk = read_dataset_info(tmp_path / "out")
    assert (len(disk.splits["train"]), len(disk.splits["val"]), len(disk.splits["test"])) == (14, 3, 3)
    for stem, ids in expected.items():
        np.testing.assert_array_equal(read_mask(tmp_path / "out/labels" / f"{stem}.png"), ids)
    check = pytest.importorskip("ldiffusion.data.check")
    assert check.validate(tmp_path / "out") == []


def test_value_map_and_unmapped(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "images").mkdir(parents=True)
    (src / "masks").mkdir()
    m = np.zeros((8, 8), dtype=np.uint8)
    m[:4] = 255
    m[0, 0] = 7
    for k in range(4):
        Image.fromarray(np.full((8, 8, 3), 50 * k, dtype=np.uint8)).save(src / "images" / f"t{k}.png")
        Image.fromarray(m).save(src / "masks" / f"t{k}.png")
    with pytest.raises(DatasetFormatError, match=r"t0\.png.*\[7\]"):
        CONVERTERS.get("folder")(src, tmp_path / "o1", progress=False, mapping="0=0,255=1")
    info = CONVERTERS.get("folder")(src, tmp_path / "o2", progress=False, mapping="0=0,255=1",
                                    unmapped="ignore", val=1, test=1)
    assert info.class_names == ["background", "class_1"]
    label = read_mask(tmp_path / "o2/labels/t2.png")
    assert label[0, 0] == 255 and label[1, 0] == 1 and label[5, 5] == 0


def test_unknown_colour_names_file(tmp_path: Path) -> None:
    _colour_folder(tmp_path / "src", n=4)
    with pytest.raises(DatasetFormatError, match=r"case00\.png.*unknown colour RGB\(0, 255, 0\)"):
        CONVERTERS.get("folder")(tmp_path / "src", tmp_path / "out", progress=False,
                                 mapping="0,0,0=0;255,0,0=1")


def test_parse_mapping() -> None:
    assert parse_mapping("0=0,255=1") == ("value", {0: 0, 255: 1})
    assert parse_mapping("255,0,0=1;0,255,0=2") == ("colour", {(255, 0, 0): 1, (0, 255, 0): 2})
    assert parse_mapping("") == ("identity", {})
    with pytest.raises(ConfigError, match="r,g,b"):
        parse_mapping("255,0=1")
    with pytest.raises(ConfigError, match="twice"):
        parse_mapping("0=0,0=1")


def test_missing_src_and_non_empty_out(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="nowhere"):
        CONVERTERS.get("folder")(tmp_path / "nowhere", tmp_path / "out", progress=False)
    _colour_folder(tmp_path / "src", n=4)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("x")
    with pytest.raises(InputError, match="not empty"):
        CONVERTERS.get("folder")(tmp_path / "src", tmp_path / "busy", progress=False, mapping="0,0,0=0")
