"""L_CRT: hand-computed InfoNCE values and the per-class pixel sampler."""

from __future__ import annotations

import math

import pytest
import torch

from ldiffusion.losses.contrastive import info_nce_loss, sample_pixel_vectors, standardize_features


def test_info_nce_hand_computed_three_vectors():
    # v0 = (1, 0), v1 = (0.6, 0.8) (class 0), v2 = (0, 1) (class 1); cosines 0.6, 0, 0.8; tau = 0.5.
    v = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    lab = torch.tensor([0, 0, 1])
    # ordered positive pairs (0,1) and (1,0); each denominator = its positive + the one negative v2
    l01 = -math.log(math.exp(0.6 / 0.5) / (math.exp(0.6 / 0.5) + math.exp(0.0 / 0.5)))
    l10 = -math.log(math.exp(0.6 / 0.5) / (math.exp(0.6 / 0.5) + math.exp(0.8 / 0.5)))
    expected = (l01 + l10) / 2
    got = info_nce_loss(v, lab, tau=0.5, sim="cosine")
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # cosine L2-normalises: scaling a vector changes nothing
    assert info_nce_loss(v * torch.tensor([[3.0], [0.5], [7.0]]), lab, tau=0.5).item() == pytest.approx(
        expected, rel=1e-6
    )


def test_info_nce_dot_and_single_class():
    v = torch.tensor([[2.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    lab = torch.tensor([0, 0, 1])
    # dot: s01 = 2, s02 = 0, s12 = 0; tau = 1
    expected = (math.log(1 + math.exp(0 - 2)) + math.log(1 + math.exp(0 - 2))) / 2
    assert info_nce_loss(v, lab, tau=1.0, sim="dot").item() == pytest.approx(expected, rel=1e-6)
    one = info_nce_loss(v.requires_grad_(), torch.tensor([1, 1, 1]))
    assert one.item() == 0.0 and one.requires_grad


def test_info_nce_other_positives_not_in_denominator():
    # three positives of class 0 identical, one negative: each term only sees its own positive
    v = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    lab = torch.tensor([0, 0, 0, 1])
    tau = 0.5
    term = math.log(1 + math.exp((0.0 - 1.0) / tau))
    assert info_nce_loss(v, lab, tau=tau).item() == pytest.approx(term, rel=1e-5)


def _tiles():
    """Two 8x8 tiles with disjoint class sets; features encode (tile index, label)."""
    lab = torch.full((2, 8, 8), 255, dtype=torch.long)
    lab[0, :4] = 1
    lab[0, 4:, :6] = 2
    lab[0, 7, 7] = 3  # a single pixel: below min_pixels=2, never sampled
    lab[1, :, :3] = 0
    lab[1, :, 3:5] = 4
    feats = torch.zeros(2, 3, 8, 8)
    feats[:, 0] = torch.tensor([0.0, 1.0]).view(2, 1, 1)
    feats[:, 1] = lab.float()
    feats[:, 2] = torch.randn(2, 8, 8, generator=torch.Generator().manual_seed(0))
    return feats, lab


@pytest.mark.parametrize("k", [1, 5, 100])
def test_sampler_labels_present_in_tile_and_k_respected(k):
    feats, lab = _tiles()
    vecs, vlab = sample_pixel_vectors(feats, lab, k, generator=torch.Generator().manual_seed(1))
    assert vecs.shape == (vlab.shape[0], 3)
    assert 255 not in vlab.tolist() and 3 not in vlab.tolist()
    for tile in (0, 1):
        present = set(torch.unique(lab[tile]).tolist()) - {255}
        sel = vecs[:, 0] == tile
        got = set(vlab[sel].tolist())
        assert got <= present  # never a label absent from the tile
        assert torch.equal(vecs[sel, 1].long(), vlab[sel])  # each vector carries its own label
        for c in present:
            n_c = int((lab[tile] == c).sum())
            expected = min(k, n_c) if n_c >= 2 else 0
            assert int((vlab[sel] == c).sum()) == expected


def test_sampler_deterministic_without_replacement_and_empty():
    feats, lab = _tiles()
    feats[:, 2] = torch.arange(128, dtype=torch.float32).view(2, 8, 8)  # unique pixel ids
    a = sample_pixel_vectors(feats, lab, 5, generator=torch.Generator().manual_seed(3))
    b = sample_pixel_vectors(feats, lab, 5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert a[0][:, 2].unique().numel() == a[0].shape[0]  # no pixel drawn twice
    v, lv = sample_pixel_vectors(feats, torch.full_like(lab, 255), 5)
    assert v.shape == (0, 3) and lv.shape == (0,)
    with pytest.raises(ValueError, match="nearest"):
        sample_pixel_vectors(feats, lab[:, :4], 5)


def test_standardize_features_per_tile_and_step():
    f = torch.rand(2, 3, 5, 5) * 4 + 7
    z = standardize_features(f)
    torch.testing.assert_close(z.mean(dim=(2, 3)), torch.zeros(2, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.std(dim=(2, 3), unbiased=False), torch.ones(2, 3), atol=1e-4, rtol=0)
