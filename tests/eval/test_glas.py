"""`eval.glas`: GlaS object F1 / Dice / Hausdorff on tiny hand-computed examples."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ldiffusion.eval.glas import GlandAccumulator, hausdorff, object_dice, object_f1, object_hausdorff

# truth            pred
# 1 1 0 0          3 3 3 0     G1 (4 px) inside S3 (5 px): IoU 4/5, Dice 8/9, Hausdorff 1
# 1 1 0 0          3 3 0 0
# 0 0 0 0          0 0 0 0
# 0 0 2 2          4 0 0 0     G2 (2 px) and S4 (1 px) overlap nothing; H(G2, S4) = 3 < H(G2, S3) = √13
T = np.array([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 2, 2]])
P = np.array([[3, 3, 3, 0], [3, 3, 0, 0], [0, 0, 0, 0], [4, 0, 0, 0]])


def test_hausdorff_pixels() -> None:
    assert hausdorff(T == 1, P == 3) == 1.0
    assert hausdorff(T == 2, P == 3) == pytest.approx(math.sqrt(13))  # (0,0) -> nearest G2 pixel (3,2)
    assert hausdorff(T == 2, P == 4) == 3.0
    assert hausdorff(T == 1, P == 4) == pytest.approx(math.sqrt(10))  # (0,1) -> (3,0)


def test_object_f1() -> None:
    r = object_f1(T, P)
    assert (r["tp"], r["fp"], r["fn"]) == (1, 1, 1)
    assert r["f1"] == pytest.approx(1 / 2) and r["precision"] == 0.5 and r["recall"] == 0.5
    assert object_f1(T, P, criterion="coverage")["f1"] == pytest.approx(1 / 2)


def test_object_f1_iou_vs_coverage() -> None:
    # the pred covers 3/4 of the gland (challenge rule: TP) but IoU = 3/7 (issue rule: not a TP)
    t = np.array([[1, 1, 1, 1, 0, 0, 0]])
    p = np.array([[0, 2, 2, 2, 2, 2, 2]])
    assert object_f1(t, p)["f1"] == 0.0
    assert object_f1(t, p, criterion="coverage")["f1"] == 1.0


def test_object_dice() -> None:
    # G side: 4/6 * 8/9 + 2/6 * 0 = 16/27; S side: 5/6 * 8/9 + 1/6 * 0 = 20/27; mean -> 2/3
    assert object_dice(T, P) == pytest.approx(2 / 3)
    assert object_dice(T, T) == 1.0


def test_object_hausdorff() -> None:
    # G side: 4/6 * 1 + 2/6 * 3 = 5/3 ; S side: 5/6 * 1 + 1/6 * 3 (S4 -> nearest G2) = 4/3 ; mean 3/2
    assert object_hausdorff(T, P) == pytest.approx(3 / 2)
    assert object_hausdorff(T, T) == 0.0


def test_empty_rules() -> None:
    z = np.zeros((3, 4), int)
    assert math.isnan(object_dice(z, z)) and math.isnan(object_hausdorff(z, z))
    assert math.isnan(object_f1(z, z)["f1"])
    one = z.copy()
    one[1, 1] = 1
    assert object_dice(one, z) == 0.0 and object_dice(z, one) == 0.0
    assert object_hausdorff(one, z) == pytest.approx(5.0)  # image diagonal of 3x4
    assert object_f1(one, z)["f1"] == 0.0


def test_gland_accumulator() -> None:
    acc = GlandAccumulator()
    g = np.zeros((4, 4), int)
    g[:2, :2] = 1
    acc.update(T, P)  # F1 1/2, Dice 2/3, H 3/2
    acc.update(g, g * 7)  # perfect: 1, 1, 0
    acc.update(np.zeros((2, 2), int), np.zeros((2, 2), int))  # no objects: skipped
    r = acc.result()
    assert r["n"] == 2 and r["n_images"] == 3
    assert r["f1"] == pytest.approx(3 / 4) and r["dice"] == pytest.approx(5 / 6)
    assert r["hausdorff"] == pytest.approx(3 / 4)
    assert (r["tp"], r["fp"], r["fn"]) == (2, 1, 1) and r["f1_aggregated"] == pytest.approx(2 / 3)
    # weights over all objects: G (4*8/9 + 4) / 10 = 34/45, S (5*8/9 + 4) / 10 = 38/45 -> 4/5
    assert r["dice_aggregated"] == pytest.approx(4 / 5)
    # G (4*1 + 2*3 + 4*0) / 10 = 1, S (5*1 + 1*3 + 0) / 10 = 4/5 -> 9/10
    assert r["hausdorff_aggregated"] == pytest.approx(9 / 10)
