"""Schedules: closed forms, pinned values from METHODS.md, float64, component schedules."""

from __future__ import annotations

import math

import pytest
import torch

from ldiffusion.core.errors import ConfigError, InputError
from ldiffusion.diffusion.schedules import (
    ComponentSchedule,
    Schedule,
    cosine_alphas_cumprod,
    cosine_betas,
    gammas_from_frequencies,
    linear_betas,
    reduce_labels_majority,
    scaled_linear_betas,
    vp_betas,
)


@pytest.mark.parametrize("kind", ["linear", "scaled_linear", "cosine", "vp"])
def test_float64_and_consistent(kind):
    s = Schedule.from_config(kind, 1000 if kind != "vp" else 4)
    for a in (s.betas, s.alphas, s.alphas_cumprod):
        assert a.dtype == torch.float64 and a.shape == (s.T,)
    assert torch.allclose(s.alphas, 1 - s.betas, atol=0, rtol=0)
    assert torch.allclose(s.alphas_cumprod, torch.cumprod(s.alphas, 0), rtol=1e-12, atol=1e-15)
    assert bool((s.alphas_cumprod[1:] < s.alphas_cumprod[:-1]).all())


def test_linear_product():
    b = linear_betas(1000, 1e-4, 0.02)
    s = Schedule.from_betas(b)
    prod = 1.0
    for beta in b.tolist():
        prod *= 1 - beta
    assert float(s.alphas_cumprod[-1]) == pytest.approx(prod, rel=1e-10)
    assert float(b[0]) == pytest.approx(1e-4) and float(b[-1]) == pytest.approx(0.02)


def test_cosine_values():
    ab = cosine_alphas_cumprod(1000)
    assert ab.dtype == torch.float64
    assert float(ab[0]) == 1.0
    assert float(ab[499]) == pytest.approx(0.4954, abs=5e-5)
    assert float(ab[999]) == pytest.approx(2.43e-6, rel=5e-3)
    assert bool((ab[1:] < ab[:-1]).all())
    b = cosine_betas(1000)
    assert float(b[0]) == 0.0 and bool(((b >= 0) & (b < 1)).all())
    assert torch.allclose(torch.cumprod(1 - b, 0), ab, rtol=1e-10)


def test_scaled_linear_sd_values():
    b = scaled_linear_betas(1000)
    assert float(b[0]) == pytest.approx(0.00085) and float(b[-1]) == pytest.approx(0.012)
    assert torch.allclose(
        b.sqrt(), torch.linspace(math.sqrt(0.00085), math.sqrt(0.012), 1000, dtype=torch.float64)
    )
    ab = torch.cumprod(1 - b, 0)
    # METHODS.md's ᾱ_t for SD is the product over j = 1..t (1-based), i.e. array index t-1 here
    # (diffusers' alphas_cumprod[300] is 0.5905; [299] is 0.5922).
    for t, want in [(300, 0.592), (400, 0.426), (500, 0.278), (600, 0.162)]:
        assert round(float(ab[t - 1]), 3) == want


def test_scaled_linear_rescaled_for_short_t():
    b = scaled_linear_betas(100)
    assert float(b[0]) == pytest.approx(0.0085) and float(b[-1]) == pytest.approx(0.12)


def test_vp_table():
    # METHODS.md Part 3 §3
    assert torch.allclose(vp_betas(2), torch.tensor([0.92132, 0.99945], dtype=torch.float64), atol=1e-4)
    assert torch.allclose(
        vp_betas(4), torch.tensor([0.47826, 0.84921, 0.95642, 0.98740], dtype=torch.float64), atol=1e-4
    )
    ab4 = Schedule.from_config("vp", 4).alphas_cumprod
    assert torch.allclose(
        ab4, torch.tensor([0.52175, 0.078676, 3.4289e-3, 4.319e-5], dtype=torch.float64), rtol=1e-3
    )
    ab2 = Schedule.from_config("vp", 2).alphas_cumprod
    assert torch.allclose(ab2, torch.tensor([0.078676, 4.319e-5], dtype=torch.float64), rtol=1e-3)
    # eps = 0 gives the paper's closed form β_k = 1 - exp(-β_min/T - ½(β_max-β_min)(2k-1)/T²)
    T = 4
    k = torch.arange(1, T + 1, dtype=torch.float64)
    paper = 1 - torch.exp(-0.1 / T - 0.5 * 19.9 * (2 * k - 1) / T**2)
    assert torch.allclose(vp_betas(T, eps=0.0), paper, atol=1e-12)


def test_from_config_errors():
    with pytest.raises(ConfigError, match="kind='cosin'"):
        Schedule.from_config("cosin", 10)
    with pytest.raises(ConfigError, match="bad arguments"):
        Schedule.from_config("cosine", 10, beta_start=0.1)
    with pytest.raises(ConfigError, match="T=0"):
        linear_betas(0)


def test_gammas_by_frequency_rank():
    assert gammas_from_frequencies([0.5, 0.1, 0.3]) == pytest.approx([0.8, 1.2, 1.0])
    assert gammas_from_frequencies([1.0]) == [1.0]
    cs = ComponentSchedule(3, 1000)
    assert cs.gammas == pytest.approx([0.8, 1.0, 1.2])  # default: class order
    cs = ComponentSchedule(2, 1000, gammas=[1.0, 2.0])
    assert float(cs.schedules[1].betas[-1]) == pytest.approx(0.024)
    assert torch.allclose(cs.schedules[0].alphas_cumprod, cs.base.alphas_cumprod)
    with pytest.raises(ConfigError, match="3 entries"):
        ComponentSchedule(2, 1000, gammas=[1, 1, 1])


def test_component_alphas_cumprod_map():
    cs = ComponentSchedule(3, 100, frequencies=[0.2, 0.7, 0.1])  # gammas [1.0, 0.8, 1.2]
    cmap = torch.tensor([[[0, 1], [2, 255]], [[2, 2], [1, 0]]])  # (B=2, h=2, w=2)
    t = torch.tensor([10, 99])
    ab = cs.alphas_cumprod_map(t, cmap)
    assert ab.shape == (2, 1, 2, 2) and ab.dtype == torch.float64
    s = cs.schedules
    assert float(ab[0, 0, 0, 0]) == float(s[0].alphas_cumprod[10])
    assert float(ab[0, 0, 0, 1]) == float(s[1].alphas_cumprod[10])
    assert float(ab[0, 0, 1, 0]) == float(s[2].alphas_cumprod[10])
    assert float(ab[0, 0, 1, 1]) == float(cs.base.alphas_cumprod[10])  # ignore -> base
    assert float(ab[1, 0, 0, 0]) == float(s[2].alphas_cumprod[99])
    assert float(ab[1, 0, 1, 0]) == float(s[1].alphas_cumprod[99])
    # a larger gamma noises faster
    assert float(s[2].alphas_cumprod[99]) < float(s[0].alphas_cumprod[99]) < float(s[1].alphas_cumprod[99])
    with pytest.raises(InputError):
        cs.alphas_cumprod_map(t, cmap[0])


def test_reduce_labels_majority():
    # (B=1, H=4, W=4), factor 2 -> (1, 2, 2)
    lab = torch.tensor([[[0, 0, 1, 1], [0, 1, 1, 255], [255, 255, 2, 1], [255, 255, 1, 2]]])
    out = reduce_labels_majority(lab, 2, num_classes=3)
    # cell (0,0): 0,0,0,1 -> 0; (0,1): 1,1,1,ignore -> 1; (1,0): all ignore -> 255; (1,1): 2,1,1,2 tie -> 1
    assert out.tolist() == [[[0, 1], [255, 1]]]
    assert out.dtype == torch.int64
    with pytest.raises(InputError, match="divisible by factor=3"):
        reduce_labels_majority(lab, 3, num_classes=3)
