"""The contour target: instances -> K + 1 classes -> instances (marker-controlled watershed)."""

from __future__ import annotations

import numpy as np
import pytest

from ldiffusion.core.errors import InputError
from ldiffusion.data.targets import (
    components_per_class,
    contour_target,
    instances_from_contour,
    redraw_markers,
)
from ldiffusion.eval.instance import aji


def _disc(shape, cy, cx, r):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """True when a and b label the same pixel sets (ids may differ)."""
    if not np.array_equal(a > 0, b > 0):
        return False
    pairs = {(int(x), int(y)) for x, y in zip(a[a > 0], b[b > 0], strict=True)}
    return len(pairs) == len({p[0] for p in pairs}) == len({p[1] for p in pairs})


@pytest.mark.parametrize("width", [1, 2, 3])
def test_separated_objects_round_trip_exactly(width):
    shape = (64, 64)
    inst = np.zeros(shape, np.int32)
    for k, (cy, cx, r) in enumerate([(12, 12, 7), (40, 20, 9), (20, 48, 6), (50, 50, 8)], start=1):
        inst[_disc(shape, cy, cx, r)] = k
    label = (inst > 0).astype(np.uint8)
    target = contour_target(label, inst, width, boundary_class=2)
    assert set(np.unique(target)) == {0, 1, 2}
    assert (target[inst == 0] == 0).all()
    out, semantic = instances_from_contour(target, boundary_class=2, min_size=0)
    assert _same_partition(inst, out)
    assert np.array_equal(semantic, label)


def test_two_touching_discs_are_split():
    shape = (48, 64)
    a, b = _disc(shape, 24, 22, 11), _disc(shape, 24, 42, 11)
    inst = np.zeros(shape, np.int32)
    inst[a] = 1
    inst[b & ~a] = 2
    label = (inst > 0).astype(np.uint8)
    # the semantic map alone merges them into one component
    assert components_per_class(label).max() == 1
    target = contour_target(label, inst, 2, boundary_class=2)
    assert (target[24, 32:36] == 2).all()  # 2 px either side of the line where the discs meet
    out, _ = instances_from_contour(target, boundary_class=2, min_size=0)
    assert out.max() == 2
    assert aji(inst, out) > 0.95


def test_multi_class_instances_keep_their_class():
    shape = (40, 40)
    inst = np.zeros(shape, np.int32)
    label = np.zeros(shape, np.uint8)
    for k, (cy, cx, cls) in enumerate([(10, 10, 1), (28, 28, 3), (10, 30, 2)], start=1):
        m = _disc(shape, cy, cx, 6)
        inst[m], label[m] = k, cls
    target = contour_target(label, inst, 1, boundary_class=4)
    out, semantic = instances_from_contour(target, boundary_class=4, min_size=0)
    assert out.max() == 3
    assert np.array_equal(semantic, label)


def test_ignore_pixels_stay_ignored_and_bad_input_is_refused():
    inst = np.zeros((16, 16), np.int32)
    inst[4:12, 4:12] = 1
    label = (inst > 0).astype(np.uint8)
    label[4, 4:12] = 255
    target = contour_target(label, inst, 1, boundary_class=2)
    assert (target[4, 4:12] == 255).all()
    with pytest.raises(InputError, match="differ in size"):
        contour_target(label, inst[:8], 1, 2)
    with pytest.raises(InputError, match="boundary_px"):
        contour_target(label, inst, 0, 2)


def _bridged_glands() -> np.ndarray:
    """(3, 20, 40) probabilities: two glands (interior 0.9) joined by a 2 px, less sure interior bridge."""
    prob = np.zeros((3, 20, 40), dtype=np.float32)
    prob[0] = 1.0
    for x0 in (2, 24):
        prob[:, 2:18, x0:x0 + 14] = np.array([0, 0, 1.0])[:, None, None]
        prob[:, 4:16, x0 + 2:x0 + 12] = np.array([0, 0.9, 0.1])[:, None, None]
    prob[:, 9:11, 14:26] = np.array([0, 0.6, 0.4])[:, None, None]
    return prob


def test_redraw_markers_cuts_an_interior_bridge():
    prob = _bridged_glands()
    plain = redraw_markers(prob)
    assert (plain == prob.argmax(0)).all()  # no setting: the arg-max
    assert instances_from_contour(plain, 2, min_size=1)[0].max() == 1  # merged through the bridge
    thr = redraw_markers(prob, marker_threshold=0.7)
    assert instances_from_contour(thr, 2, min_size=1)[0].max() == 2  # the unsure bridge is no marker
    eroded = redraw_markers(prob, marker_erosion_px=2)
    assert instances_from_contour(eroded, 2, min_size=1)[0].max() == 2  # the thin bridge is eroded away
    for cm in (thr, eroded):
        assert ((cm != 0) == (plain != 0)).all()  # every object pixel stays in an object


def test_redraw_markers_keeps_interior_classes():
    rng = np.random.default_rng(0)
    prob = rng.dirichlet(np.ones(4), size=(16, 16)).transpose(2, 0, 1)  # background, 2 types, boundary
    assert (redraw_markers(prob) == prob.argmax(0)).all()
    cm = redraw_markers(prob, marker_threshold=0.3)
    inside = (cm == 1) | (cm == 2)
    assert inside.any()
    assert (cm[inside] == prob[1:3].argmax(0)[inside] + 1).all()
    assert (prob[1:3].sum(0)[inside] > 0.3).all()


@pytest.mark.parametrize("kwargs", [{"marker_threshold": 0.0}, {"marker_threshold": 1.5},
                                    {"marker_erosion_px": -1}])
def test_redraw_markers_rejects_bad_settings(kwargs):
    with pytest.raises(InputError):
        redraw_markers(_bridged_glands(), **kwargs)



def test_separation_weights_peak_in_the_gap_between_two_objects() -> None:
    from ldiffusion.data.targets import separation_weights

    shape = (40, 60)
    inst = np.zeros(shape, np.int32)
    inst[_disc(shape, 20, 15, 8)] = 1
    inst[_disc(shape, 20, 35, 8)] = 2  # gap of 3 px at row 20 (x = 24..26)
    w = separation_weights(inst, 10.0, 3.0)
    assert w.dtype == np.float32 and w.shape == shape and (w >= 1).all()
    gap = w[20, 25]
    # mid-gap: d1 = d2 = 2 -> 1 + 10 exp(-16 / 18)
    assert gap == pytest.approx(1 + 10 * np.exp(-16 / 18), rel=1e-5)
    assert w[20, 25] > w[5, 25] and w[20, 25] > w[20, 2]  # above and beside the pair: little weight
    assert w[0, 59] == 1.0  # farther than 3 sigma from any object: exactly 1
    single = np.where(inst == 1, 1, 0)
    assert (separation_weights(single, 10.0, 3.0) == 1).all()  # one object: no pair, no extra weight
    assert (separation_weights(inst, 0.0, 3.0) == 1).all()
    with pytest.raises(InputError):
        separation_weights(inst, 1.0, 0.0)
