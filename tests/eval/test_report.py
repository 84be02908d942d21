"""`eval.report`: evaluate_folder on a tiny written data set; MoNuSeg test truth against itself."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from ldiffusion.core.errors import InputError
from ldiffusion.data.format import ClassInfo, DatasetInfo, DatasetWriter, write_png
from ldiffusion.eval.report import evaluate_folder, format_table
from ldiffusion.eval.semantic import confusion_matrix, semantic_scores

CLASSES = (ClassInfo(0, "background", (0, 0, 0)), ClassInfo(1, "a", (255, 0, 0)),
           ClassInfo(2, "b", (0, 255, 0)))

# image "x": the 4x4 example of test_semantic (C = [[5, 1, 0], [0, 5, 1], [1, 0, 3]])
LX = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 1, 1], [2, 2, 0, 0]], dtype=np.uint8)
PX = np.array([[0, 0, 1, 1], [0, 1, 1, 1], [2, 2, 2, 1], [0, 2, 0, 0]], dtype=np.uint8)
IX = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 1, 1], [2, 2, 0, 0]], dtype=np.uint16)
# image "y": one ignored pixel, predicted perfectly elsewhere
LY = np.array([[1, 1, 0, 0], [1, 1, 0, 255], [0, 0, 0, 0], [0, 0, 0, 2]], dtype=np.uint8)
IY = np.array([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 2]], dtype=np.uint16)


def make_tiny_dataset(root: Path, name: str = "tiny") -> Path:
    """Write a 3-class data set with instances: test = [x, y], train = [z]."""
    w = DatasetWriter(root)
    img = np.zeros((4, 4, 3), np.uint8)
    w.add("x", img, LX, IX)
    w.add("y", img, LY, IY)
    w.add("z", img, LX, IX)
    w.finish(DatasetInfo(name=name, task="instance", classes=CLASSES,
                         splits={"train": ["z"], "val": [], "test": ["x", "y"]}))
    return root


def write_predictions(pred: Path) -> Path:
    pred.mkdir(parents=True, exist_ok=True)
    write_png(pred / "x.png", PX)
    write_png(pred / "y.png", np.where(LY == 255, 0, LY).astype(np.uint8))
    return pred


def test_evaluate_folder_semantic(tmp_path: Path) -> None:
    root = make_tiny_dataset(tmp_path / "ds")
    pred = write_predictions(tmp_path / "pred")
    r = evaluate_folder(pred, root, progress=False)
    cm = confusion_matrix(LX, PX, 3) + confusion_matrix(LY, np.where(LY == 255, 0, LY), 3)
    ref = semantic_scores(cm)
    assert r["dataset"] == "tiny" and r["split"] == "test" and r["n_images"] == 2
    assert r["confusion_matrix"] == cm.tolist()
    for k in ("dice", "miou", "mpa", "fwiou"):
        assert r["semantic"][k] == pytest.approx(ref[k])
        assert 0 <= r["semantic"][k] <= 1
    assert r["semantic"]["n_pixels"] == 31  # 32 pixels, one ignored
    assert "all classes" in r["convention"]
    assert [p["name"] for p in r["semantic"]["per_class"]] == ["background", "a", "b"]
    # per-image mean: x = 29/36 (Dice of its three classes), y = 1
    assert r["per_image_mean"]["dice"] == pytest.approx((29 / 36 + 1) / 2)
    assert "instance" not in r and "gland" not in r
    json.dumps(r, allow_nan=False)  # strict JSON
    fg = evaluate_folder(pred, root, foreground_only=True, progress=False)
    assert fg["semantic"]["miou"] == pytest.approx(semantic_scores(cm, foreground_only=True)["miou"])
    assert "foreground classes only" in fg["convention"]
    text = format_table(fg)
    assert "DICE" in text and "mIoU" in text and "foreground classes only" in text


def test_evaluate_folder_binary_merges_the_foreground_classes(tmp_path: Path) -> None:
    root = make_tiny_dataset(tmp_path / "ds")
    pred = write_predictions(tmp_path / "pred")
    r = evaluate_folder(pred, root, binary=True, foreground_only=True, progress=False)
    # x: a pixel of class 2 predicted 1 and one of 1 predicted 2 count as right; y has one ignored pixel
    lx, px = (LX != 0).astype(np.uint8), (PX != 0).astype(np.uint8)
    ly = np.where(LY == 255, 255, LY != 0).astype(np.uint8)
    cm = confusion_matrix(lx, px, 2) + confusion_matrix(ly, np.where(LY == 255, 0, LY != 0), 2)
    assert r["confusion_matrix"] == cm.tolist() and len(cm) == 2
    tp, fp, fn = cm[1, 1], cm[0, 1], cm[1, 0]
    assert r["semantic"]["dice"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert [p["name"] for p in r["semantic"]["per_class"]] == ["background", "foreground"]
    assert "merged into one" in r["convention"] and r["semantic"]["n_pixels"] == 31
    # the typed score differs: x's confusions between a and b are errors there
    typed = evaluate_folder(pred, root, foreground_only=True, progress=False)
    assert typed["semantic"]["dice"] < r["semantic"]["dice"]


def test_evaluate_folder_instances(tmp_path: Path) -> None:
    root = make_tiny_dataset(tmp_path / "ds")
    pred = write_predictions(tmp_path / "pred")
    # x: instances from the class map (the class-1 blob becomes one object)
    r = evaluate_folder(pred, root, instances=True, progress=False)
    ins = r["instance"]
    assert ins["n_images"] == 2 and "mpq" in ins and len(ins["per_class"]) == 2
    # y is perfect -> its AJI and PQ are 1; x is not
    assert ins["aji"] < 1 and ins["pq"] < 1
    # with exact instance maps for both images everything is 1
    write_png(pred / "x.png", LX)
    write_png(pred / "x_inst.png", IX)
    write_png(pred / "y_inst.png", IY)
    r = evaluate_folder(pred, root, instances=True, progress=False)
    ins = r["instance"]
    assert ins["aji"] == 1 and ins["pq"] == 1 and ins["mpq"] == 1 and ins["aji_aggregated"] == 1
    assert r["semantic"]["dice"] == 1 and r["semantic"]["miou"] == 1
    assert "AJI" in format_table(r)


def test_evaluate_folder_gland_auto(tmp_path: Path) -> None:
    root = make_tiny_dataset(tmp_path / "ds", name="glas")
    pred = write_predictions(tmp_path / "pred")
    write_png(pred / "x.png", LX)
    r = evaluate_folder(pred, root, progress=False, min_size=0)  # objects from the class maps
    g = r["gland"]
    assert g["f1"] == 1 and g["dice"] == 1 and g["hausdorff"] == 0 and g["n"] == 2
    assert "Hausdorff" in format_table(r)
    r = evaluate_folder(pred, root, progress=False)  # default min_size=10 removes these tiny glands
    assert r["gland"]["f1"] == 0 and r["gland"]["hausdorff"] == pytest.approx(32**0.5)  # diagonal


def test_errors_name_the_file(tmp_path: Path) -> None:
    root = make_tiny_dataset(tmp_path / "ds")
    pred = write_predictions(tmp_path / "pred")
    (pred / "y.png").unlink()
    with pytest.raises(InputError, match=r"missing prediction .*y\.png"):
        evaluate_folder(pred, root, progress=False)
    write_png(pred / "y.png", np.zeros((4, 5), np.uint8))
    with pytest.raises(InputError, match=r"y\.png: size 5x4"):
        evaluate_folder(pred, root, progress=False)
    write_png(pred / "y.png", np.full((4, 4), 3, np.uint8))
    with pytest.raises(InputError, match=r"values \[3\]"):
        evaluate_folder(pred, root, progress=False)
    shutil.rmtree(root / "instances")
    write_png(pred / "y.png", LY)
    with pytest.raises(InputError, match="instances"):
        evaluate_folder(pred, root, instances=True, progress=False)


def _monuseg_truth(shared_data: Path, root: Path) -> Path:
    """Rasterise the 14 MoNuSeg test XMLs into a test-only data set (images are blank)."""
    from ldiffusion.data.converters.monuseg import CLASSES as MCLASSES
    from ldiffusion.data.converters.monuseg import parse_aperio_xml, rasterise_polygons

    ann = shared_data / "monuseg" / "test" / "Annotations"
    if not ann.is_dir():
        pytest.skip(f"{ann} not available")
    xmls = sorted(p for p in ann.iterdir() if p.name.endswith((".xml", ".xml.gz")))
    w = DatasetWriter(root)
    blank = np.zeros((1000, 1000, 3), np.uint8)
    ids = []
    for x in xmls:
        case = x.name.split(".xml")[0]
        inst = rasterise_polygons(parse_aperio_xml(x), (1000, 1000))
        w.add(case, blank, (inst > 0).astype(np.uint8), inst)
        ids.append(case)
    w.finish(DatasetInfo(name="monuseg", task="instance", classes=MCLASSES,
                         splits={"train": [], "val": [], "test": ids}))
    return root


@pytest.mark.data
def test_monuseg_truth_against_itself(shared_data: Path, tmp_path: Path) -> None:
    t0 = time.perf_counter()
    root = _monuseg_truth(shared_data, tmp_path / "monuseg")
    pred = tmp_path / "pred"
    pred.mkdir()
    for p in (root / "labels").iterdir():
        shutil.copy(p, pred / p.name)
        shutil.copy(root / "instances" / p.name, pred / f"{p.stem}_inst.png")
    r = evaluate_folder(pred, root, instances=True, progress=False)
    assert r["n_images"] == 14
    sem, ins = r["semantic"], r["instance"]
    assert sem["dice"] == 1 and sem["miou"] == 1 and sem["fwiou"] == 1 and sem["mpa"] == 1
    assert all(p["dice"] == 1 for p in sem["per_class"])
    assert ins["aji"] == 1 and ins["pq"] == 1 and ins["aji_n"] == 14
    assert ins["fp"] == 0 and ins["fn"] == 0 and ins["tp"] > 5000
    print(f"monuseg self-evaluation took {time.perf_counter() - t0:.1f} s")
