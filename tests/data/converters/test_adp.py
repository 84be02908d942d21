"""ADP converter on the real files of ../shared/data/adp (functional taxonomy)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldiffusion.core.errors import ConfigError, DatasetFormatError
from ldiffusion.data.converters import CONVERTERS
from ldiffusion.data.converters.adp import FUNC, MORPH, case_id
from ldiffusion.data.format import read_dataset_info, read_mask

pytestmark = pytest.mark.data


@pytest.fixture(scope="module")
def converted(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("adp")
    CONVERTERS.get("adp")(shared_data / "adp", out, seed=0, progress=False)
    return out


def test_counts_and_functional_classes(converted: Path) -> None:
    info = read_dataset_info(converted)
    assert info.task == "semantic"
    assert info.class_names == ["Background", "Other", "G.O", "G.N", "G.X", "T"]
    assert len(info.ids("all")) == 50
    assert (len(info.splits["train"]), len(info.splits["val"]), len(info.splits["test"])) == (30, 10, 10)
    present: set[int] = set()
    for i in info.ids("all"):
        label = read_mask(converted / "labels" / f"{i}.png")
        assert label.shape == (224, 224)
        present |= set(np.unique(label).tolist())
    assert present == {0, 1, 2, 3, 5}  # G.X occurs in no patch (README table)
    assert len(MORPH) == 34 and len(FUNC) == 6
    assert all(re.fullmatch(r"[A-Za-z0-9_-]+", i) for i in info.ids("all"))


def test_nearest_resize_of_gt(converted: Path, shared_data: Path) -> None:
    name = sorted((shared_data / "adp/img/01_tuning_patch").iterdir())[0].name
    gt = np.asarray(Image.open(shared_data / "adp/gt/01_tuning_patch/func" / name).convert("RGB"))
    small = np.asarray(Image.fromarray(gt).resize((224, 224), Image.Resampling.NEAREST))
    table = {c: k for k, (_, c) in enumerate(FUNC)}
    expected = np.array([[table[tuple(px)] for px in row] for row in small.tolist()], dtype=np.uint8)
    label = read_mask(converted / "labels" / f"{case_id(Path(name))}.png")
    np.testing.assert_array_equal(label, expected)


def test_unknown_colour_names_file(shared_data: Path, tmp_path: Path) -> None:
    src = tmp_path / "adp"
    name = sorted((shared_data / "adp/img/01_tuning_patch").iterdir())[0].name
    (src / "img/01_tuning_patch").mkdir(parents=True)
    (src / "gt/01_tuning_patch/func").mkdir(parents=True)
    shutil.copy(shared_data / "adp/img/01_tuning_patch" / name, src / "img/01_tuning_patch" / name)
    gt = np.asarray(Image.open(shared_data / "adp/gt/01_tuning_patch/func" / name)).copy()
    gt[0, 0, :3] = (1, 2, 3)
    Image.fromarray(gt).save(src / "gt/01_tuning_patch/func" / name)
    with pytest.raises(DatasetFormatError, match=r"(?s)" + name.replace(".", r"\.") + r".*RGB\(1, 2, 3\)"):
        CONVERTERS.get("adp")(src, tmp_path / "out", progress=False, val=0, test=0)
    with pytest.raises(ConfigError, match="taxonomy"):
        CONVERTERS.get("adp")(src, tmp_path / "out2", progress=False, taxonomy="nope")


def test_validate(converted: Path) -> None:
    check = pytest.importorskip("ldiffusion.data.check")
    assert check.validate(converted) == []
