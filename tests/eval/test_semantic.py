"""`eval.semantic`: hand-counted 2x2 / 4x4 matrices, absent-class rules, ignore, sklearn cross-check."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ldiffusion.core.errors import InputError
from ldiffusion.eval.semantic import ConfusionMatrix, PerImageMean, confusion_matrix, semantic_scores

# truth (2, 2)     pred (2, 2)
# [[0, 1],         [[0, 1],
#  [1, 1]]          [0, 1]]        -> C = [[1, 0], [1, 2]]
T2 = np.array([[0, 1], [1, 1]])
P2 = np.array([[0, 1], [0, 1]])

# 4x4, three classes                           C (rows truth) = [[5, 1, 0],
T4 = np.array([[0, 0, 1, 1],                   #                  [0, 5, 1],
               [0, 0, 1, 1],                   #                  [1, 0, 3]]
               [2, 2, 1, 1],
               [2, 2, 0, 0]])
P4 = np.array([[0, 0, 1, 1],
               [0, 1, 1, 1],
               [2, 2, 2, 1],
               [0, 2, 0, 0]])


def _pc(res: dict, key: str) -> list:
    return [p[key] for p in res["per_class"]]


def test_confusion_matrix_2x2() -> None:
    cm = confusion_matrix(T2, P2, 2)
    assert cm.dtype == np.int64
    assert cm.tolist() == [[1, 0], [1, 2]]


def test_scores_2x2() -> None:
    r = semantic_scores(confusion_matrix(T2, P2, 2))
    # class 0: TP 1, row 1, col 2 -> Dice 2/3, IoU 1/2, PA 1; class 1: TP 2, row 3, col 2 -> 4/5, 2/3, 2/3
    assert _pc(r, "dice") == pytest.approx([2 / 3, 4 / 5])
    assert _pc(r, "iou") == pytest.approx([1 / 2, 2 / 3])
    assert _pc(r, "pixel_accuracy") == pytest.approx([1, 2 / 3])
    assert _pc(r, "support") == [1, 3]
    assert r["dice"] == pytest.approx(11 / 15)  # (2/3 + 4/5) / 2
    assert r["miou"] == pytest.approx(7 / 12)  # (1/2 + 2/3) / 2
    assert r["mpa"] == pytest.approx(5 / 6)  # (1 + 2/3) / 2
    assert r["fwiou"] == pytest.approx(5 / 8)  # 1/4 * 1/2 + 3/4 * 2/3
    assert r["accuracy"] == pytest.approx(3 / 4)
    assert "all classes" in r["convention"]


def test_scores_4x4_all_and_foreground() -> None:
    cm = confusion_matrix(T4, P4, 3)
    assert cm.tolist() == [[5, 1, 0], [0, 5, 1], [1, 0, 3]]
    r = semantic_scores(cm, class_names=["bg", "a", "b"])
    assert _pc(r, "dice") == pytest.approx([5 / 6, 5 / 6, 3 / 4])  # 10/12, 10/12, 6/8
    assert _pc(r, "iou") == pytest.approx([5 / 7, 5 / 7, 3 / 5])  # 5/(12-5), 5/(12-5), 3/(8-3)
    assert r["dice"] == pytest.approx(29 / 36)
    assert r["miou"] == pytest.approx(71 / 105)
    assert r["mpa"] == pytest.approx(29 / 36)
    assert r["fwiou"] == pytest.approx(24 / 35)  # 6/16 * 5/7 * 2 + 4/16 * 3/5
    assert [p["name"] for p in r["per_class"]] == ["bg", "a", "b"]
    f = semantic_scores(cm, foreground_only=True)
    assert f["dice"] == pytest.approx(19 / 24)  # (5/6 + 3/4) / 2
    assert f["miou"] == pytest.approx(23 / 35)  # (5/7 + 3/5) / 2
    assert f["mpa"] == pytest.approx(19 / 24)
    assert f["fwiou"] == pytest.approx(117 / 175)  # 6/10 * 5/7 + 4/10 * 3/5 (renormalised)
    assert f["accuracy"] == pytest.approx(8 / 10)
    assert f["foreground_only"] and "foreground classes only" in f["convention"]
    assert _pc(f, "scored") == [False, True, True]
    # background's own numbers are still listed, just not averaged
    assert f["per_class"][0]["dice"] == pytest.approx(5 / 6)


def test_class_absent_from_both_is_skipped_never_one() -> None:
    r = semantic_scores(confusion_matrix(T2, P2, 3))  # class 2 appears nowhere
    assert r["per_class"][2]["dice"] is None and r["per_class"][2]["iou"] is None
    assert r["per_class"][2]["pixel_accuracy"] is None and r["per_class"][2]["support"] == 0
    assert r["dice"] == pytest.approx(11 / 15) and r["miou"] == pytest.approx(7 / 12)
    assert r["n_classes_scored"] == 2


def test_class_predicted_but_absent_from_truth_counts_zero() -> None:
    t = np.array([[0, 0], [1, 1]])
    p = np.array([[0, 2], [1, 1]])
    r = semantic_scores(confusion_matrix(t, p, 3))
    # class 0: TP1 row2 col1 -> 2/3, 1/2, PA 1/2; class 1: 1, 1, 1; class 2: row0 col1 -> 0, 0, PA None
    assert _pc(r, "dice") == pytest.approx([2 / 3, 1, 0])
    assert _pc(r, "iou") == pytest.approx([1 / 2, 1, 0])
    assert r["per_class"][2]["pixel_accuracy"] is None
    assert r["dice"] == pytest.approx(5 / 9)  # (2/3 + 1 + 0) / 3
    assert r["miou"] == pytest.approx(1 / 2)  # (1/2 + 1 + 0) / 3
    assert r["mpa"] == pytest.approx(3 / 4)  # (1/2 + 1) / 2: no recall for class 2
    assert r["fwiou"] == pytest.approx(3 / 4)  # 1/2 * 1/2 + 1/2 * 1


def test_ignore_index() -> None:
    t = np.array([[0, 255], [1, 1]])
    p = np.array([[0, 7], [1, 0]])  # the 7 sits on an ignored pixel: not an error, not counted
    cm = confusion_matrix(t, p, 2)
    assert cm.tolist() == [[1, 0], [1, 1]]
    r = semantic_scores(cm)
    assert _pc(r, "dice") == pytest.approx([2 / 3, 2 / 3]) and r["n_pixels"] == 3
    # another ignore value, and none at all
    cm9 = confusion_matrix(np.array([[0, 9]]), np.array([[1, 1]]), 2, ignore_index=9)
    assert cm9.tolist() == [[0, 1], [0, 0]]
    with pytest.raises(InputError, match="255"):
        confusion_matrix(t, p, 2, ignore_index=None)


def test_no_class_present() -> None:
    r = semantic_scores(np.zeros((2, 2), dtype=np.int64))
    assert r["dice"] is None and r["miou"] is None and r["fwiou"] is None and r["mpa"] is None


def test_errors_name_values() -> None:
    with pytest.raises(InputError, match=r"prediction has values \[3, 5\]"):
        confusion_matrix(T2, np.array([[3, 5], [0, 1]]), 2)
    with pytest.raises(InputError, match="truth has values"):
        confusion_matrix(np.array([[4, 0]]), np.array([[0, 0]]), 2)
    with pytest.raises(InputError, match="shape"):
        confusion_matrix(T2, np.zeros((3, 2), int), 2)
    with pytest.raises(InputError, match="integer"):
        confusion_matrix(T2, P2.astype(float), 2)


def test_streaming_accumulator_equals_concatenation() -> None:
    rng = np.random.default_rng(1)
    acc = ConfusionMatrix(4)
    ts, ps = [], []
    for _ in range(5):
        t = rng.integers(0, 4, (8, 9))
        t[rng.random(t.shape) < 0.1] = 255
        p = rng.integers(0, 4, (8, 9))
        acc.update(t, p)
        ts.append(t)
        ps.append(p)
    np.testing.assert_array_equal(acc.matrix, confusion_matrix(np.concatenate(ts), np.concatenate(ps), 4))
    assert acc.n_images == 5


def test_matches_sklearn_on_random_maps() -> None:
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    k = 5
    t = rng.integers(0, k, (64, 48))
    p = np.where(rng.random(t.shape) < 0.6, t, rng.integers(0, k, t.shape))
    t[rng.random(t.shape) < 0.05] = 255
    cm = confusion_matrix(t, p, k)
    keep = t != 255
    ref = metrics.confusion_matrix(t[keep], p[keep], labels=list(range(k)))
    np.testing.assert_array_equal(cm, ref)
    r = semantic_scores(cm)
    f1 = metrics.f1_score(t[keep], p[keep], labels=list(range(k)), average=None)
    jac = metrics.jaccard_score(t[keep], p[keep], labels=list(range(k)), average=None)
    rec = metrics.recall_score(t[keep], p[keep], labels=list(range(k)), average=None)
    np.testing.assert_allclose(_pc(r, "dice"), f1)
    np.testing.assert_allclose(_pc(r, "iou"), jac)
    np.testing.assert_allclose(_pc(r, "pixel_accuracy"), rec)
    assert r["dice"] == pytest.approx(f1.mean()) and r["miou"] == pytest.approx(jac.mean())
    w = np.bincount(t[keep], minlength=k) / keep.sum()
    assert r["fwiou"] == pytest.approx(float((w * jac).sum()))
    assert r["accuracy"] == pytest.approx(metrics.accuracy_score(t[keep], p[keep]))
    fg = semantic_scores(cm, foreground_only=True)
    assert fg["miou"] == pytest.approx(jac[1:].mean())
    wf = np.bincount(t[keep], minlength=k)[1:]
    assert fg["fwiou"] == pytest.approx(float((wf / wf.sum() * jac[1:]).sum()))


def test_per_image_mean() -> None:
    acc = PerImageMean(2)
    acc.update(confusion_matrix(T2, P2, 2))  # Dice 2/3, 4/5 -> image 11/15
    acc.update(confusion_matrix(np.zeros((2, 2), int), np.zeros((2, 2), int), 2))  # class 1 NaN -> image 1
    r = acc.result(["bg", "fg"])
    assert r["dice"] == pytest.approx((11 / 15 + 1) / 2) and r["n"] == 2 and r["n_images"] == 2
    assert r["per_class"][1]["dice"] == pytest.approx(4 / 5) and r["per_class"][1]["n"] == 1
    assert r["per_class"][0]["dice"] == pytest.approx((2 / 3 + 1) / 2) and r["per_class"][0]["n"] == 2
    assert r["iou"] == pytest.approx(((1 / 2 + 2 / 3) / 2 + 1) / 2)
    assert r["dice_std"] == pytest.approx(abs(1 - 11 / 15) / 2)
    assert "per-image mean" in r["convention"]
    fg = PerImageMean(2, foreground_only=True)
    fg.update(confusion_matrix(T2, P2, 2))
    fg.update(confusion_matrix(np.zeros((2, 2), int), np.zeros((2, 2), int), 2))  # nothing scored: NaN
    rf = fg.result()
    assert rf["dice"] == pytest.approx(4 / 5) and rf["n"] == 1 and rf["n_images"] == 2
    empty = PerImageMean(2).result()
    assert empty["dice"] is None and not math.isnan(empty["n"])
