"""Class-balance helpers: pixel counts and inverse-frequency weights, hand-computed."""

from __future__ import annotations

import pytest
import torch

from ldiffusion.losses.class_balance import class_pixel_counts, inverse_frequency_weights


def test_pixel_counts_skip_ignored_and_out_of_range():
    # (1, 2, 4): class 0 x2, class 1 x1, class 2 x3, one 255, one 7 (>= K)
    y = torch.tensor([[[0, 0, 2, 255], [1, 2, 2, 7]]])
    assert class_pixel_counts(y, 3).tolist() == [2.0, 1.0, 3.0]
    assert class_pixel_counts(y, 3).dtype == torch.float64


def test_weights_are_the_documented_inverse_frequencies():
    # counts 6, 3, 1 -> f = 0.6, 0.3, 0.1; K' = 3 -> w = 1/(3 f) = 0.5556, 1.1111, 3.3333
    w = inverse_frequency_weights(torch.tensor([6.0, 3.0, 1.0]), max_weight=100.0)
    assert w.tolist() == pytest.approx([1 / 1.8, 1 / 0.9, 1 / 0.3], rel=1e-6)
    f = torch.tensor([0.6, 0.3, 0.1])
    assert float((f * w).sum()) == pytest.approx(1.0)  # pixel-average weight 1
    # equal frequencies give all ones
    assert inverse_frequency_weights(torch.tensor([5, 5, 5, 5]), 10.0).tolist() == [1.0] * 4


def test_weights_clip_and_absent_classes():
    w = inverse_frequency_weights(torch.tensor([6.0, 3.0, 1.0, 0.0]), max_weight=2.0)
    # K' = 3 present classes; class 2 clipped from 3.33 to 2; absent class 3 -> max_weight
    assert w.tolist() == pytest.approx([1 / 1.8, 1 / 0.9, 2.0, 2.0], rel=1e-6)
    assert inverse_frequency_weights(torch.zeros(3), 5.0).tolist() == [1.0, 1.0, 1.0]
