"""GlaS converter on the real files of ../shared/data/glas."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ldiffusion.data.converters import CONVERTERS
from ldiffusion.data.converters.glas import read_patients
from ldiffusion.data.format import read_dataset_info, read_mask
from ldiffusion.data.splits import check_disjoint

pytestmark = pytest.mark.data


@pytest.fixture(scope="module")
def converted(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("glas")
    CONVERTERS.get("glas")(shared_data / "glas", out, seed=0, progress=False)
    return out


def test_counts_parts_instances(converted: Path) -> None:
    info = read_dataset_info(converted)
    assert info.task == "instance" and info.class_names == ["background", "gland"]
    assert len(info.ids("all")) == 165
    assert len(info.splits["train"]) + len(info.splits["val"]) == 85
    assert len(info.splits["test"]) == 80
    assert len(info.parts["testA"]) == 60 and len(info.parts["testB"]) == 20
    assert info.splits["test"] == info.parts["testA"] + info.parts["testB"]
    assert {p.stem for p in (converted / "instances").iterdir()} == set(info.ids("all"))
    assert len(info.splits["val"]) > 0


def test_val_grouped_by_patient(converted: Path, shared_data: Path) -> None:
    info = read_dataset_info(converted)
    patients = read_patients(shared_data / "glas" / "Grade.csv")
    assert set(info.groups) == set(info.splits["train"]) | set(info.splits["val"])
    check_disjoint(info.splits, info.groups, ["train", "val"])
    val_p = {patients[i] for i in info.splits["val"]}
    assert not val_p & {patients[i] for i in info.splits["train"]}


def test_instances_and_native_bmp(converted: Path, shared_data: Path) -> None:
    for stem, anno in (("train_1", "train_1_anno.bmp"), ("testB_3", "testB_3_anno.png")):
        ref = read_mask(shared_data / "glas" / anno)
        inst = read_mask(converted / "instances" / f"{stem}.png")
        np.testing.assert_array_equal(inst, ref)
        label = read_mask(converted / "labels" / f"{stem}.png")
        np.testing.assert_array_equal(label, (ref > 0).astype(np.uint8))


def test_validate(converted: Path) -> None:
    check = pytest.importorskip("ldiffusion.data.check")
    assert check.validate(converted) == []
