"""`eval.postprocess`: connected components per class, min_size, connectivity, watershed split."""

from __future__ import annotations

import numpy as np
import pytest

from ldiffusion.core.errors import InputError
from ldiffusion.eval.postprocess import instances_from_semantic


def test_components_per_class_with_classes() -> None:
    m = np.array([[1, 1, 0, 2],
                  [0, 0, 0, 2],
                  [1, 0, 255, 0],
                  [1, 0, 2, 2]])
    inst, cls = instances_from_semantic(m, min_size=0, return_classes=True)
    assert inst.dtype == np.int32
    # class 1: two components (top-left, left column), class 2: two components; 255 is never an object
    assert inst.tolist() == [[1, 1, 0, 3], [0, 0, 0, 3], [2, 0, 0, 0], [2, 0, 4, 4]]
    assert cls.tolist() == [0, 1, 1, 2, 2]
    only2 = instances_from_semantic(m, foreground_classes=[2], min_size=0)
    assert only2.max() == 2 and (only2[m == 1] == 0).all()


def test_min_size_and_connectivity() -> None:
    m = np.array([[1, 0, 0, 0],
                  [0, 1, 0, 0],
                  [0, 0, 0, 0],
                  [0, 0, 1, 1]])
    assert instances_from_semantic(m, min_size=0).max() == 3  # 4-connectivity: diagonal pixels apart
    assert instances_from_semantic(m, min_size=0, connectivity=2).max() == 2
    kept = instances_from_semantic(m, min_size=2)
    assert kept.tolist() == [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 1]]
    with pytest.raises(InputError):
        instances_from_semantic(m.astype(float))


def test_watershed_splits_touching_discs() -> None:
    yy, xx = np.mgrid[:40, :60]
    m = (((yy - 20) ** 2 + (xx - 20) ** 2 <= 100) | ((yy - 20) ** 2 + (xx - 36) ** 2 <= 100)).astype(np.uint8)
    assert instances_from_semantic(m).max() == 1
    inst = instances_from_semantic(m, watershed=True, min_distance=5)
    assert inst.max() == 2
    assert ((inst > 0) == (m > 0)).all()  # every foreground pixel is kept
    assert inst[20, 20] != inst[20, 36]
