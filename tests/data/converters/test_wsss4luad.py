"""WSSS4LUAD converter on the real files of ../shared/data/wsss4luad."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ldiffusion.data.converters import CONVERTERS
from ldiffusion.data.format import read_dataset_info, read_mask

pytestmark = pytest.mark.data


@pytest.fixture(scope="module")
def converted(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wsss4luad")
    CONVERTERS.get("wsss4luad")(shared_data / "wsss4luad", out, seed=0, progress=False)
    return out


def test_counts_and_classes(converted: Path) -> None:
    info = read_dataset_info(converted)
    assert info.task == "semantic" and info.num_classes == 4
    assert info.class_names[0] == "background"
    assert info.classes[1].color == (0, 64, 128) and info.classes[0].color == (255, 255, 255)
    assert len(info.ids("all")) == 98
    assert (len(info.splits["train"]), len(info.splits["val"]), len(info.splits["test"])) == (25, 6, 67)
    assert all(i.startswith("val_") for i in info.splits["train"] + info.splits["val"])
    assert all(i.startswith("test_") for i in info.splits["test"])
    assert "test_68" in info.splits["test"]


def test_remap(converted: Path, shared_data: Path) -> None:
    seen: set[int] = set()
    for split, prefix in (("2.validation", "val"), ("3.testing", "test")):
        for n in ("00", "01"):
            raw = read_mask(shared_data / "wsss4luad" / split / "mask" / f"{n}.png")
            label = read_mask(converted / "labels" / f"{prefix}_{n}.png")
            np.testing.assert_array_equal(label, np.array([1, 2, 3, 0])[raw])
            bg = read_mask(shared_data / "wsss4luad" / split / "background-mask" / f"{n}.png")
            np.testing.assert_array_equal(label == 0, bg == 1)
            seen |= set(np.unique(label).tolist())
    assert seen <= {0, 1, 2, 3}


def test_validate(converted: Path) -> None:
    check = pytest.importorskip("ldiffusion.data.check")
    assert check.validate(converted) == []
