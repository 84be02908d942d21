"""PanNuke converter on generated folds in both release layouts (3 folds x 4 images of 32x32)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ldiffusion.core.errors import ConfigError, DatasetFormatError
from ldiffusion.data.converters import CONVERTERS, convert
from ldiffusion.data.converters.pannuke import masks_to_label
from ldiffusion.data.format import read_dataset_info, read_image, read_mask


def _fold(rng: np.random.Generator, n_img: int = 4, size: int = 32) -> tuple[np.ndarray, ...]:
    images = rng.integers(0, 256, (n_img, size, size, 3)).astype(np.float64)
    masks = np.zeros((n_img, size, size, 6), dtype=np.float64)
    for k in range(n_img):
        masks[k, 2:6, 2:6, 0] = 7          # neoplastic nucleus id 7
        masks[k, 10:14, 10:14, 0] = 9      # neoplastic id 9
        masks[k, 20:24, 2:6, 1] = 7        # inflammatory, id 7 again (ids repeat across channels)
        masks[k, 26:30, 26:30, 4] = 3      # epithelial
        masks[k, ..., 5] = (masks[k, ..., :5].sum(-1) == 0)
    types = np.array(["Breast", "Colon", "Breast", "Lung"][:n_img])
    return images, masks, types


def _write(root: Path, layout: str, seed: int = 0) -> dict[int, tuple[np.ndarray, ...]]:
    rng = np.random.default_rng(seed)
    data = {}
    for n in (1, 2, 3):
        images, masks, types = _fold(rng)
        if layout == "release":
            img_dir = root / f"Fold {n}" / "images" / f"fold{n}"
            mask_dir = root / f"Fold {n}" / "masks" / f"fold{n}"
        else:
            img_dir = mask_dir = root / f"fold{n}"
        img_dir.mkdir(parents=True, exist_ok=True)
        mask_dir.mkdir(parents=True, exist_ok=True)
        np.save(img_dir / "images.npy", images)
        np.save(img_dir / "types.npy", types)
        np.save(mask_dir / "masks.npy", masks)
        data[n] = (images, masks, types)
    return data


@pytest.mark.parametrize("layout", ["release", "flat"])
def test_convert_layouts(tmp_path: Path, layout: str) -> None:
    data = _write(tmp_path / "src", layout)
    info = CONVERTERS.get("pannuke")(tmp_path / "src", tmp_path / "out", progress=False)
    assert info.task == "instance" and info.num_classes == 6
    assert info.class_names == ["background", "neoplastic", "inflammatory", "connective", "dead",
                                "epithelial"]
    disk = read_dataset_info(tmp_path / "out")
    assert disk.splits["train"] == [f"fold1_{k:04d}" for k in range(4)]
    assert disk.splits["val"][0] == "fold2_0000" and disk.splits["test"][-1] == "fold3_0003"
    label = read_mask(tmp_path / "out/labels/fold2_0001.png")
    inst = read_mask(tmp_path / "out/instances/fold2_0001.png")
    assert label[3, 3] == 1 and label[11, 11] == 1 and label[21, 3] == 2 and label[27, 27] == 5
    assert label[0, 0] == 0 and label[16, 16] == 0
    # (channel, id) pairs renumbered 1..N, channel-major then by id
    assert (inst[3, 3], inst[11, 11], inst[21, 3], inst[27, 27]) == (1, 2, 3, 4)
    assert int(inst.max()) == 4 and (inst[label == 0] == 0).all()
    np.testing.assert_array_equal(read_image(tmp_path / "out/images/fold2_0001.png"),
                                  data[2][0][1].astype(np.uint8))
    check = pytest.importorskip("ldiffusion.data.check")
    assert check.validate(tmp_path / "out") == []


def test_fold_options_and_errors(tmp_path: Path) -> None:
    _write(tmp_path / "src", "flat")
    info = convert("pannuke", tmp_path / "src", tmp_path / "out", progress=False, train="1,2", val="", test=3)
    assert len(info.splits["train"]) == 8 and "val" not in info.splits and len(info.splits["test"]) == 4
    with pytest.raises(ConfigError, match="two splits"):
        convert("pannuke", tmp_path / "src", tmp_path / "o2", progress=False, train="1", val="1")
    with pytest.raises(DatasetFormatError, match="fold 4 not found"):
        convert("pannuke", tmp_path / "src", tmp_path / "o3", progress=False, test="4")
    with pytest.raises(ConfigError, match="valid options"):
        convert("pannuke", tmp_path / "src", tmp_path / "o4", progress=False, folds="1")


def test_masks_to_label_overlap_later_channel_wins() -> None:
    m = np.zeros((4, 4, 6))
    m[0:2, 0:2, 1] = 5
    m[1:3, 1:3, 2] = 5
    label, inst = masks_to_label(m)
    assert label[1, 1] == 3 and label[0, 0] == 2 and inst[1, 1] == 2 and inst[0, 0] == 1
