"""cDAL VP posterior: METHODS.md Part 3 §3 tables, k = 1 exactness, Markov pairs."""

from __future__ import annotations

import math

import pytest
import torch

from ldiffusion.core.errors import InputError
from ldiffusion.diffusion import DiffusionProcess, Schedule, VPPosterior


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize(
    ("T", "table"),
    [
        (4, {2: (0.66578, 0.20158, 0.44082), 3: (0.26919, 0.19300, 0.88420), 4: (0.05782, 0.11185, 0.98406)}),
        (2, {2: (0.28035, 0.02159, 0.92086)}),
    ],
)
def test_posterior_table(T, table):
    p = VPPosterior(T)
    for k, (c1, c2, var) in table.items():
        assert float(p.posterior_mean_coef1[k]) == pytest.approx(c1, abs=1e-4)
        assert float(p.posterior_mean_coef2[k]) == pytest.approx(c2, abs=1e-4)
        assert float(p.posterior_variance[k]) == pytest.approx(var, abs=1e-4)
    assert float(p.posterior_mean_coef1[1]) == pytest.approx(1.0, abs=1e-12)
    assert float(p.posterior_mean_coef2[1]) == 0.0 and float(p.posterior_variance[1]) == 0.0
    assert p.alphas_cumprod.dtype == torch.float64 and float(p.alphas_cumprod[0]) == 1.0


def test_matches_diffusion_process():
    # step k of VPPosterior is index t = k-1 of DiffusionProcess on the same schedule
    p = VPPosterior(4)
    d = DiffusionProcess(Schedule.from_config("vp", 4))
    torch.testing.assert_close(p.posterior_mean_coef1[1:], d.posterior_mean_coef1, atol=1e-12, rtol=0)
    torch.testing.assert_close(p.posterior_mean_coef2[1:], d.posterior_mean_coef2, atol=1e-12, rtol=0)
    torch.testing.assert_close(p.posterior_variance[1:], d.posterior_variance, atol=1e-12, rtol=0)


def test_k1_returns_x0_hat_exactly():
    p = VPPosterior(4)
    x0_hat = torch.randn(3, 1, 8, 8, generator=_gen(1))
    xk = torch.randn(3, 1, 8, 8, generator=_gen(2))
    out = p.posterior_sample(x0_hat, xk, torch.tensor([1, 1, 1]), generator=_gen(3))
    assert torch.equal(out, x0_hat)


def test_posterior_sample_moments():
    p = VPPosterior(4)
    n = 10**6
    x0_hat = torch.full((n,), 0.5, dtype=torch.float64)
    xk = torch.full((n,), -1.0, dtype=torch.float64)
    out = p.posterior_sample(x0_hat, xk, 3, generator=_gen(4))
    mean = 0.26919 * 0.5 + 0.19300 * -1.0
    assert float(out.mean()) == pytest.approx(mean, abs=5e-3)
    assert float(out.var()) == pytest.approx(0.88420, rel=0.01)


def test_q_sample_pair_is_markov():
    # x_k from the pair has the marginal of q(x_k|x0), and x_k - √(1-β_k) x_{k-1} has variance β_k
    p = VPPosterior(4)
    n = 10**6
    x0 = torch.full((n,), 0.8, dtype=torch.float64)
    for k in (1, 3):
        x_prev, x_k = p.q_sample_pair(x0, k, generator=_gen(5 + k))
        ab, ab_prev, b = (float(v) for v in (p.alphas_cumprod[k], p.alphas_cumprod[k - 1], p.betas[k]))
        assert float(x_k.mean()) == pytest.approx(math.sqrt(ab) * 0.8, abs=5e-3)
        assert float(x_k.var()) == pytest.approx(1 - ab, rel=0.01)
        if k > 1:
            assert float(x_prev.var()) == pytest.approx(1 - ab_prev, rel=0.01)
        else:
            assert torch.equal(x_prev, x0)
        resid = x_k - math.sqrt(1 - b) * x_prev
        assert float(resid.var()) == pytest.approx(b, rel=0.01)
        assert abs(float(torch.corrcoef(torch.stack([resid, x_prev]))[0, 1])) < 5e-3  # fresh noise


def test_determinism_and_errors():
    p = VPPosterior(2)
    x0 = torch.randn(2, 1, 4, 4, generator=_gen(0))
    a = p.q_sample_pair(x0, torch.tensor([1, 2]), generator=_gen(1))
    b = p.q_sample_pair(x0, torch.tensor([1, 2]), generator=_gen(1))
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    with pytest.raises(InputError, match=r"values in \[1, 2\]"):
        p.q_sample_pair(x0, 3)
    with pytest.raises(InputError):
        p.posterior_sample(x0, x0, 0)
