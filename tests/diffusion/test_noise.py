"""Noise families: moments over 10^6 draws with fixed seeds, quantiles, determinism, devices."""

from __future__ import annotations

import math

import pytest
import scipy.stats
import torch

from ldiffusion.core.errors import ConfigError, InputError
from ldiffusion.diffusion.noise import NOISES, Cauchy, Gaussian, Laplace, StudentT, make_noise

N = 10**6


def _moments(x: torch.Tensor) -> tuple[float, float, float]:
    """Return (mean, variance, excess kurtosis) in float64."""
    x = x.double()
    m = x.mean()
    c = x - m
    v = (c * c).mean()
    k = (c**4).mean() / v**2 - 3.0
    return float(m), float(v), float(k)


def _draw(dist, seed: int = 1234, n: int = N, dtype=torch.float32) -> torch.Tensor:
    return dist.sample((n,), generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize(
    ("dist", "var", "kurt", "kurt_tol"),
    [
        (Gaussian(), 1.0, 0.0, 0.05),
        (Laplace(), 1.0, 3.0, 0.15),
        (Laplace("unit_scale"), 2.0, 3.0, 0.15),
        # t(nu=5): excess kurtosis 6/(nu-4) = 6, but the 8th moment is infinite, so the sample
        # kurtosis has infinite variance and is biased low at 10^6 draws (typ. 4.5-6.5): generous +-1.5.
        # The tail test below checks the shape more sharply.
        (StudentT(5.0), 1.0, 6.0, 1.5),
    ],
    ids=["gaussian", "laplace_unit_variance", "laplace_unit_scale", "student_t5"],
)
def test_moments(dist, var, kurt, kurt_tol):
    x = _draw(dist)
    assert x.shape == (N,) and x.dtype == torch.float32
    m, v, k = _moments(x)
    # mean: std error sqrt(var/N) = 1e-3 (x1.41 for var 2); 5 sigma
    assert abs(m) < 5 * math.sqrt(var / N)
    # variance: relative std error sqrt((kurt+2)/N) <= 3e-3; 1.5 % tolerance
    assert v == pytest.approx(var, rel=0.015)
    assert dist.variance == pytest.approx(var)
    assert k == pytest.approx(kurt, abs=kurt_tol)


def test_laplace_scale_and_tails():
    x = _draw(Laplace(), seed=7).double()
    b = 1 / math.sqrt(2)
    # E|x| = b; P(|x| > 3b) = exp(-3)
    assert float(x.abs().mean()) == pytest.approx(b, rel=0.01)
    assert float((x.abs() > 3 * b).double().mean()) == pytest.approx(math.exp(-3), rel=0.03)


@pytest.mark.parametrize("nu", [3.0, 5.0, 2.5])
def test_student_t_tail_probability_matches_scipy(nu):
    x = _draw(StudentT(nu), seed=11).double()
    rescale = math.sqrt((nu - 2) / nu)
    for q in (1.0, 2.0, 4.0):
        # P(|T| > q) of the unscaled t, closed form from scipy
        p = 2 * scipy.stats.t.sf(q, nu)
        emp = float((x.abs() > q * rescale).double().mean())
        se = math.sqrt(p * (1 - p) / N)
        assert abs(emp - p) < 5 * se


def test_student_t_rejects_nu_le_2():
    with pytest.raises(ConfigError, match=r"nu=2\.0"):
        StudentT(2)
    with pytest.raises(ConfigError, match=r"nu=1\.5"):
        make_noise("student_t", nu=1.5)


def test_cauchy_median_and_iqr():
    d = Cauchy()
    assert d.variance is None
    x = _draw(d, seed=3).double()
    q25, q50, q75 = (float(torch.kthvalue(x, int(p * N)).values) for p in (0.25, 0.5, 0.75))
    # quantile std error for Cauchy at p: sqrt(p(1-p)/N)/f(x_p); <= 3.1e-3 at the quartiles
    assert q50 == pytest.approx(0.0, abs=0.01)
    assert q25 == pytest.approx(-1.0, abs=0.015)
    assert q75 == pytest.approx(1.0, abs=0.015)
    assert (q75 - q25) == pytest.approx(2.0, abs=0.02)


def test_cauchy_clip():
    x = _draw(Cauchy(clip=5.0), n=10**5)
    assert float(x.abs().max()) <= 5.0
    assert float((x.abs() == 5.0).float().mean()) > 0.1  # P(|x|>5) = 0.126
    with pytest.raises(ConfigError):
        Cauchy(clip=0)


@pytest.mark.parametrize("name", NOISES.names())
def test_determinism_and_seeds(name):
    d = make_noise(name)
    a = d.sample((4, 3, 8, 8), generator=torch.Generator().manual_seed(0))
    b = d.sample((4, 3, 8, 8), generator=torch.Generator().manual_seed(0))
    c = d.sample((4, 3, 8, 8), generator=torch.Generator().manual_seed(1))
    assert a.shape == (4, 3, 8, 8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # samples within a batch get different noise
    assert not torch.equal(a[0], a[1])
    # the generator advances: two consecutive draws differ
    g = torch.Generator().manual_seed(0)
    assert not torch.equal(d.sample((16,), g), d.sample((16,), g))


@pytest.mark.parametrize("name", NOISES.names())
def test_dtype(name):
    d = make_noise(name)
    g = torch.Generator().manual_seed(0)
    assert d.sample((5,), g, dtype=torch.float64).dtype == torch.float64
    assert d.sample((5,), g, dtype=torch.bfloat16).dtype == torch.bfloat16
    assert torch.isfinite(d.sample((10**5,), g)).all()


def test_make_noise_errors():
    with pytest.raises(
        ConfigError, match=r"noise='laplcae'.*\['cauchy', 'gaussian', 'laplace', 'student_t'\]"
    ):
        make_noise("laplcae")
    with pytest.raises(ConfigError, match="convention"):
        make_noise("laplace", convention="unit")
    with pytest.raises(ConfigError, match="bad arguments"):
        make_noise("gaussian", nu=3)
    assert isinstance(make_noise("laplace", convention="unit_scale"), Laplace)


def test_names():
    assert [make_noise(n).name for n in NOISES.names()] == NOISES.names()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", NOISES.names())
def test_cuda(name, caplog):
    d = make_noise(name)
    a = d.sample((1000,), torch.Generator("cuda").manual_seed(0), device="cuda")
    b = d.sample((1000,), torch.Generator("cuda").manual_seed(0), device="cuda")
    assert a.device.type == "cuda" and torch.equal(a, b)
    # CPU generator, CUDA target: drawn on CPU then moved, equal to the CPU draw; warned once
    with caplog.at_level("WARNING"):
        c = d.sample((1000,), torch.Generator().manual_seed(0), device="cuda")
        d.sample((10,), torch.Generator().manual_seed(0), device="cuda")
    assert c.device.type == "cuda"
    assert torch.equal(c.cpu(), d.sample((1000,), torch.Generator().manual_seed(0)))
    assert sum("drawing on cpu" in r.message for r in caplog.records) == 1
    with pytest.raises(InputError, match="generator is on cuda"):
        d.sample((3,), torch.Generator("cuda").manual_seed(0), device="cpu")
    x = d.sample((10**6,), torch.Generator("cuda").manual_seed(0), device="cuda")
    if d.variance is not None:
        assert float(x.double().var()) == pytest.approx(d.variance, rel=0.02)
