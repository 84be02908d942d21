"""CoNSeP tiles converter on the real files of ../shared/data/consep_tiles."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ldiffusion.data.converters import CONVERTERS
from ldiffusion.data.converters.consep import source_image
from ldiffusion.data.format import read_dataset_info, read_mask
from ldiffusion.data.splits import check_disjoint

pytestmark = pytest.mark.data


@pytest.fixture(scope="module")
def converted(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("consep")
    CONVERTERS.get("consep-tiles")(shared_data / "consep_tiles", out, seed=0, progress=False)
    return out


def test_counts_classes_groups(converted: Path) -> None:
    info = read_dataset_info(converted)
    assert info.task == "semantic" and info.num_classes == 5
    assert info.class_names == ["background", "other", "inflammatory", "epithelial", "spindle-shaped"]
    assert len(info.ids("all")) == 656
    assert len(info.splits["test"]) == 224
    assert len(info.splits["val"]) == 4 * 16 and len(info.splits["train"]) == 23 * 16
    assert set(info.groups) == set(info.ids("all"))
    check_disjoint(info.splits, info.groups)  # no source image in two splits
    owners: dict[str, set[str]] = {}
    for split, ids in info.splits.items():
        for i in ids:
            owners.setdefault(info.groups[i], set()).add(split)
    assert len(owners) == 41 and all(len(s) == 1 for s in owners.values())
    assert not (converted / "instances").exists()


def test_merged_labels(converted: Path, shared_data: Path) -> None:
    seen: set[int] = set()
    merge = np.array([0, 1, 2, 3, 3, 4, 4, 4])
    for stem in ("train_1_folder00", "train_5_folder12", "test_3_folder21"):
        split = "Train" if stem.startswith("train") else "Test"
        raw = read_mask(shared_data / "consep_tiles" / split / "Labels" / f"{stem}.png")
        label = read_mask(converted / "labels" / f"{stem}.png")
        np.testing.assert_array_equal(label, merge[raw])
    for p in sorted((converted / "labels").iterdir())[::8]:
        seen |= set(np.unique(read_mask(p)).tolist())
    assert seen <= {0, 1, 2, 3, 4} and {0, 4} <= seen


def test_source_image() -> None:
    assert source_image("train_12_folder03") == "train_12"
    assert source_image("test_1_folder33") == "test_1"


def test_validate(converted: Path) -> None:
    check = pytest.importorskip("ldiffusion.data.check")
    assert check.validate(converted) == []
