"""The U-Net's per-pixel weighted cross-entropy (`separation_weight`)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ldiffusion.methods.unet import weighted_cross_entropy


def test_weighted_cross_entropy_matches_the_plain_one_at_unit_weights_and_follows_the_weights() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 5, 6, generator=g)
    target = torch.randint(0, 3, (2, 5, 6), generator=g)
    target[0, 0, :3] = 255
    plain = F.cross_entropy(logits, target, ignore_index=255)
    assert weighted_cross_entropy(logits, target, None) == pytest.approx(plain.item())
    sevens = torch.full((2, 5, 6), 7.0)
    assert weighted_cross_entropy(logits, target, sevens) == pytest.approx(plain.item(), rel=1e-5)
    ce = F.cross_entropy(logits, target, ignore_index=255, reduction="none")
    w = torch.ones(2, 5, 6)
    w[1, 2, 3] = 9.0
    w[0, 0, 0] = 100.0  # an ignored pixel: its weight must not count
    labelled = target != 255
    expected = (ce * w * labelled).sum() / (w * labelled).sum()
    assert weighted_cross_entropy(logits, target, w) == pytest.approx(expected.item(), rel=1e-5)
    assert (weighted_cross_entropy(logits, target, w) - plain).abs() > 1e-3
