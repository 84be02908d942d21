"""`eval.instance`: AJI / PQ / mPQ worked examples (hand counts), permutation invariance, shifted shapes."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ldiffusion.core.errors import InputError
from ldiffusion.eval.instance import (
    PQAccumulator,
    aji,
    aji_counts,
    instance_classes,
    mpq,
    pairwise_iou,
    pq,
    relabel_contiguous,
)

# 4x4 worked example (truth ids 1..4, prediction ids 6..9):
#   truth            pred
#   1 1 0 2          7 7 0 8     GT1 (4 px) split into pred 7 (3 px) and pred 9 (1 px): one-to-many
#   1 1 0 2          7 9 0 8     GT2 (2 px) and GT3 (2 px) merged into pred 8 (4 px): many-to-one
#   3 3 0 0          8 8 0 0     GT4 (1 px) missed; pred 6 (1 px) false positive
#   0 0 0 4          0 0 6 0
T = np.array([[1, 1, 0, 2], [1, 1, 0, 2], [3, 3, 0, 0], [0, 0, 0, 4]])
P = np.array([[7, 7, 0, 8], [7, 9, 0, 8], [8, 8, 0, 0], [0, 0, 6, 0]])


def test_relabel_contiguous() -> None:
    r = relabel_contiguous(np.array([[0, 50], [7, 50], [65535, 0]], dtype=np.uint16))
    assert r.dtype == np.int32 and r.tolist() == [[0, 2], [1, 2], [3, 0]]
    big = relabel_contiguous(np.array([[0, 2**30], [5, 0]], dtype=np.int64))  # np.unique path
    assert big.tolist() == [[0, 2], [1, 0]]
    assert relabel_contiguous(np.array([[3, 3]])).tolist() == [[1, 1]]
    with pytest.raises(InputError, match="non-negative"):
        relabel_contiguous(np.array([[-1, 0]]))


def test_pairwise_iou_hand() -> None:
    iou = pairwise_iou(T, P)  # rows GT 1..4, columns pred 6, 7, 8, 9 (relabelled in id order)
    expected = np.zeros((4, 4))
    expected[0, 1] = 3 / 4  # GT1 ∩ pred7 = 3, union 4
    expected[0, 3] = 1 / 4  # GT1 ∩ pred9 = 1, union 4
    expected[1, 2] = 2 / 4  # GT2 ∩ pred8 = 2, union 4
    expected[2, 2] = 2 / 4  # GT3 ∩ pred8
    np.testing.assert_allclose(iou, expected)


def test_aji_worked_example_kumar() -> None:
    # GT1 -> pred7 (IoU 3/4): C += 3, U += 4; GT2 -> pred8: C += 2, U += 4; GT3 -> pred8 again: C += 2,
    # U += 4; GT4 overlaps nothing: U += 1; unused preds 9 and 6: U += 1 + 1  -> AJI = 7/15
    assert aji_counts(T, P) == (7, 15)
    assert aji(T, P) == pytest.approx(7 / 15)


def test_aji_one_to_many_and_merge_separately() -> None:
    # one GT (4 px) split into preds of 3 px and 1 px: C = 3, U = 4 + 1 (unused pred) -> 3/5
    assert aji(np.array([[1, 1, 1, 1]]), np.array([[2, 2, 2, 3]])) == pytest.approx(3 / 5)
    # two GTs merged in one pred: each pairs with it, C = 2 + 2, U = 4 + 4 -> 1/2
    assert aji(np.array([[1, 1, 2, 2]]), np.array([[5, 5, 5, 5]])) == pytest.approx(1 / 2)


def test_aji_empty_rules() -> None:
    z = np.zeros((2, 2), int)
    assert math.isnan(aji(z, z))
    assert aji(np.array([[1, 0]]), np.array([[0, 0]])) == 0.0
    assert aji(np.array([[0, 0]]), np.array([[0, 3]])) == 0.0
    assert aji(T, T) == 1.0


def test_pq_worked_example() -> None:
    r = pq(T, P)
    # only GT1-pred7 has IoU > 0.5 (3/4): TP 1; preds 8, 9, 6 FP; GT 2, 3, 4 FN
    assert (r["tp"], r["fp"], r["fn"]) == (1, 3, 3)
    assert r["dq"] == pytest.approx(1 / 4)  # 1 / (1 + 3/2 + 3/2)
    assert r["sq"] == pytest.approx(3 / 4)
    assert r["pq"] == pytest.approx(3 / 16)
    # one-to-many: DQ = 1 / (1 + 1/2), SQ = 3/4 -> PQ = 1/2
    r = pq(np.array([[1, 1, 1, 1]]), np.array([[2, 2, 2, 3]]))
    assert (r["tp"], r["fp"], r["fn"], r["pq"]) == (1, 1, 0, pytest.approx(1 / 2))
    # merge: IoU exactly 1/2 is not > 1/2 -> no TP; DQ = SQ = PQ = 0
    r = pq(np.array([[1, 1, 2, 2]]), np.array([[5, 5, 5, 5]]))
    assert (r["tp"], r["fp"], r["fn"], r["pq"], r["sq"]) == (0, 1, 2, 0.0, 0.0)
    assert pq(T, T)["pq"] == 1.0 and pq(T, T)["sq"] == 1.0


def test_pq_empty_is_nan() -> None:
    z = np.zeros((3, 3), int)
    r = pq(z, z)
    assert math.isnan(r["pq"]) and (r["tp"], r["fp"], r["fn"]) == (0, 0, 0)


def _shuffle_labels(a: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    ids = np.unique(a)
    ids = ids[ids > 0]
    new = rng.permutation(np.arange(1, 3 * ids.size + 1))[: ids.size] * 7
    lut = np.zeros(a.max() + 1, dtype=np.int64)
    lut[ids] = new
    return lut[a]


def _blobs(rng: np.random.Generator, n: int, shape: tuple[int, int] = (64, 64)) -> np.ndarray:
    out = np.zeros(shape, dtype=np.int64)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    for k in range(1, n + 1):
        cy, cx = rng.integers(4, shape[0] - 4, 2)
        r = rng.uniform(2, 7)
        out[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = k
    return out


def test_permutation_invariance() -> None:
    rng = np.random.default_rng(3)
    t, p = _blobs(rng, 15), _blobs(rng, 15)
    p = np.where(rng.random(p.shape) < 0.5, t, p)  # correlated prediction with partial overlaps
    ref_aji, ref_pq = aji(t, p), pq(t, p, 0.3)
    for _ in range(3):
        ts, ps = _shuffle_labels(t, rng), _shuffle_labels(p, rng)
        assert aji(ts, ps) == pytest.approx(ref_aji)
        assert pq(ts, ps, 0.3) == pytest.approx(ref_pq)
        assert sorted(pairwise_iou(ts, ps).ravel()) == pytest.approx(sorted(pairwise_iou(t, p).ravel()))


def test_shifted_squares_exact_iou() -> None:
    # StarDist style: square side 8 shifted by d px -> IoU = (8 - d) / (8 + d) exactly
    for d in range(0, 8):
        t = np.zeros((12, 24), int)
        p = np.zeros((12, 24), int)
        t[2:10, 2:10] = 1
        p[2:10, 2 + d:10 + d] = 1
        iou = (8 - d) / (8 + d)
        assert pairwise_iou(t, p)[0, 0] == pytest.approx(iou)
        assert pq(t, p, iou_threshold=iou / 2)["tp"] == 1
        assert pq(t, p, iou_threshold=min(0.99, 2 * iou) if iou < 0.99 else 0.999)["tp"] == int(iou == 1)
        assert aji(t, p) == pytest.approx(iou)  # one object each: AJI = IoU


def _disc_iou(r: float, d: float) -> float:
    lens = 2 * r * r * math.acos(d / (2 * r)) - d / 2 * math.sqrt(4 * r * r - d * d)
    return lens / (2 * math.pi * r * r - lens)


def test_shifted_discs_analytic_iou() -> None:
    r = 12.0
    shifts = [2, 5, 9, 14, 19]
    yy, xx = np.mgrid[:60, :300]
    t = np.zeros((60, 300), int)
    p = np.zeros((60, 300), int)
    for k, d in enumerate(shifts, start=1):
        cx = 30 + 55 * (k - 1)
        t[(yy - 30) ** 2 + (xx - cx) ** 2 <= r * r] = k
        p[(yy - 30) ** 2 + (xx - cx - d) ** 2 <= r * r] = k
    expected = [_disc_iou(r, d) for d in shifts]
    np.testing.assert_allclose(np.diag(pairwise_iou(t, p)), expected, atol=0.03)
    for thr_scale, n in ((0.5, 5), (2.0, 0)):
        # threshold at half (all match) or double (none match) each pair's IoU, one pair at a time
        for k, e in enumerate(expected, start=1):
            tk, pk = np.where(t == k, t, 0), np.where(p == k, p, 0)
            assert pq(tk, pk, min(thr_scale * e, 0.999))["tp"] == n // 5
    assert pq(t, p)["tp"] == sum(e > 0.5 for e in expected)


def test_instance_classes_majority() -> None:
    inst = np.array([[1, 1, 1, 4], [0, 0, 4, 4]])
    cls = np.array([[2, 2, 1, 0], [0, 0, 255, 3]])
    assert instance_classes(inst, cls).tolist() == [0, 2, 3]


def _mpq_example() -> tuple[np.ndarray, ...]:
    # truth: inst1 (class 1), inst2 (class 2), inst3 (class 1); pred: p1 (class 1, = inst1),
    # p2 (class 1, = inst2 but wrong class), p4 (class 3, overlaps nothing)
    t = np.array([[1, 1, 0, 2], [1, 1, 0, 2], [0, 0, 0, 0], [3, 3, 0, 0]])
    tc = np.array([[1, 1, 0, 2], [1, 1, 0, 2], [0, 0, 0, 0], [1, 1, 0, 0]])
    p = np.array([[1, 1, 0, 2], [1, 1, 0, 2], [0, 0, 0, 0], [0, 0, 0, 4]])
    pc = np.array([[1, 1, 0, 1], [1, 1, 0, 1], [0, 0, 0, 0], [0, 0, 0, 3]])
    return t, tc, p, pc


def test_mpq_pannuke_style() -> None:
    t, tc, p, pc = _mpq_example()
    r = mpq(t, tc, p, pc, num_classes=4)
    # class 1: TP (1, p1), FP p2, FN inst3 -> DQ 1/2, SQ 1 -> PQ 1/2
    # class 2: inst2 unmatched (p2 is class 1) -> TP 0, FN 1 -> PQ 0; class 3: only predicted
    assert [x["pq"] for x in r["per_class"]] == pytest.approx([1 / 2, 0, 0])
    assert [(x["tp"], x["fp"], x["fn"]) for x in r["per_class"]] == [(1, 1, 1), (0, 0, 1), (0, 1, 0)]
    assert r["mpq"] == pytest.approx(1 / 4) and r["n_classes"] == 2  # classes with truth objects
    r2 = mpq(t, tc, p, pc, num_classes=4, classes_present="either")
    assert r2["mpq"] == pytest.approx(1 / 6) and r2["n_classes"] == 3


def test_pq_accumulator() -> None:
    acc = PQAccumulator()
    one = np.array([[0, 1, 1, 0]])
    acc.update(T, P)  # AJI 7/15 (C 7, U 15), TP 1 FP 3 FN 3, IoU sum 3/4
    acc.update(one, one * 4)  # perfect: AJI 1 (C 2, U 2), TP 1, IoU 1
    acc.update(np.zeros((2, 2), int), np.zeros((2, 2), int))  # empty: skipped
    r = acc.result()
    assert r["n_images"] == 3 and r["aji_n"] == 2 and r["pq_n"] == 2
    assert r["aji"] == pytest.approx((7 / 15 + 1) / 2)
    assert r["aji_aggregated"] == pytest.approx(9 / 17)
    assert r["pq"] == pytest.approx((3 / 16 + 1) / 2)
    assert (r["tp"], r["fp"], r["fn"]) == (2, 3, 3)
    assert r["dq_aggregated"] == pytest.approx(2 / 5)  # 2 / (2 + 3/2 + 3/2)
    assert r["sq_aggregated"] == pytest.approx(7 / 8)
    assert r["pq_aggregated"] == pytest.approx(7 / 20)
    assert "aggregated" in r["convention"] and "mpq" not in r


def test_pq_accumulator_multiclass() -> None:
    t, tc, p, pc = _mpq_example()
    acc = PQAccumulator(num_classes=4, class_names=["bg", "a", "b", "c"])
    acc.update(t, p, tc, pc)
    acc.update(t, t, tc, tc)  # perfect image: classes 1, 2 PQ 1 -> mPQ 1
    r = acc.result()
    assert r["mpq"] == pytest.approx((1 / 4 + 1) / 2) and r["mpq_n"] == 2
    # aggregated class 1: TP 3, FP 1, FN 1, IoU 3 -> DQ 3/4, SQ 1; class 2: TP 1, FN 1 -> DQ 2/3
    per = {x["name"]: x for x in r["per_class"]}
    assert per["a"]["pq"] == pytest.approx(3 / 4) and per["b"]["pq"] == pytest.approx(2 / 3)
    assert per["c"]["pq"] == 0.0
    assert r["mpq_aggregated"] == pytest.approx((3 / 4 + 2 / 3) / 2)
