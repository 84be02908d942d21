"""DiffusionProcess: closed-form round trips, DDIM with an oracle, DDPM posterior, noise family, timesteps."""

from __future__ import annotations

import math

import pytest
import torch

from ldiffusion.core.errors import ConfigError, InputError
from ldiffusion.diffusion import (
    ComponentSchedule,
    DiffusionProcess,
    Gaussian,
    Laplace,
    Schedule,
    make_noise,
)
from ldiffusion.diffusion.noise import NOISES

SCHEDULES = {
    "linear": lambda: Schedule.from_config("linear", 1000),
    "scaled_linear": lambda: Schedule.from_config("scaled_linear", 1000),
    "cosine": lambda: Schedule.from_config("cosine", 1000),
    "vp4": lambda: Schedule.from_config("vp", 4),
}


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _kurt(x: torch.Tensor) -> float:
    x = x.double() - x.double().mean()
    return float((x**4).mean() / (x**2).mean() ** 2 - 3)


def _oracle(proc: DiffusionProcess, x0: torch.Tensor):
    """eps_fn returning the true eps for a known x0: eps = (x - sqrt(ab) x0)/sqrt(1-ab)."""

    def eps_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ab = proc.alphas_cumprod[t].to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
        s = (1 - ab).sqrt()
        return torch.where(s > 0, (x - ab.sqrt() * x0) / torch.where(s > 0, s, 1.0), 0.0)

    return eps_fn


@pytest.mark.parametrize("sched", list(SCHEDULES))
@pytest.mark.parametrize("noise", NOISES.names())
def test_add_noise_predict_x0_roundtrip(sched, noise):
    proc = DiffusionProcess(SCHEDULES[sched](), make_noise(noise))
    T = proc.T
    x0 = torch.randn(T, 2, 4, 4, generator=_gen(1), dtype=torch.float64)
    t = torch.arange(T)
    xt, eps = proc.q_sample(x0, t, _gen(2))
    assert xt.dtype == torch.float64
    torch.testing.assert_close(proc.predict_x0(xt, eps, t), x0, atol=1e-5, rtol=0)
    if sched != "cosine":  # eps is not identifiable where ᾱ = 1 (cosine t = 0)
        torch.testing.assert_close(proc.predict_eps(xt, x0, t), eps, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sched", ["scaled_linear"])
def test_roundtrip_float32(sched):
    # float32 only where 1/sqrt(ᾱ_T-1) is moderate (SD: 14.6); linear (157x) and cosine (642x) need float64
    proc = DiffusionProcess(SCHEDULES[sched](), Laplace())
    x0 = torch.randn(1000, 4, 8, 8, generator=_gen(1))
    t = torch.arange(1000)
    xt, eps = proc.q_sample(x0, t, _gen(2))
    assert xt.dtype == torch.float32
    torch.testing.assert_close(proc.predict_x0(xt, eps, t), x0, atol=1e-5, rtol=0)


def test_add_noise_moments():
    # x_t | x0 has mean sqrt(ab) x0 and variance 1 - ab for any unit-variance family
    proc = DiffusionProcess(SCHEDULES["scaled_linear"](), Laplace())
    x0 = torch.full((10**6,), 0.7, dtype=torch.float64)
    xt, _ = proc.q_sample(x0, 400, _gen(3))
    ab = float(proc.alphas_cumprod[400])
    assert float(xt.mean()) == pytest.approx(math.sqrt(ab) * 0.7, abs=5e-3)
    assert float(xt.var()) == pytest.approx(1 - ab, rel=0.01)


@pytest.mark.parametrize("sched", list(SCHEDULES))
def test_ddim_oracle_returns_x0(sched):
    proc = DiffusionProcess(SCHEDULES[sched](), Laplace())
    x0 = torch.randn(3, 2, 4, 4, generator=_gen(4), dtype=torch.float64)
    eps_fn = _oracle(proc, x0)
    starts = [1, 2, proc.T - 1] + ([10, 500, 731] if proc.T == 1000 else [])
    for t_start in starts:
        for k in sorted({2, 3, 7, 11, t_start + 1} & set(range(2, t_start + 2))):
            noise = proc.noise.sample(x0.shape, _gen(t_start), dtype=torch.float64)
            xs = proc.add_noise(x0, noise, torch.full((3,), t_start))
            out = proc.sample_loop(eps_fn, xs, k, eta=0.0, t_start=t_start)
            torch.testing.assert_close(out, x0, atol=1e-5, rtol=0, msg=f"t_start={t_start} k={k}")


def test_ddim_eta0_deterministic_and_eta1_seeded():
    proc = DiffusionProcess(SCHEDULES["scaled_linear"](), Laplace())
    eps_fn = lambda x, t: 0.1 * x  # noqa: E731 (any callable)
    a = proc.sample_loop(eps_fn, (2, 4, 8, 8), 5, eta=0.0, generator=_gen(0))
    b = proc.sample_loop(eps_fn, (2, 4, 8, 8), 5, eta=0.0, generator=_gen(0))
    assert torch.equal(a, b)
    xT = proc.noise.sample((2, 4, 8, 8), _gen(5))
    c = proc.sample_loop(eps_fn, xT, 5, eta=1.0, generator=_gen(1))
    d = proc.sample_loop(eps_fn, xT, 5, eta=1.0, generator=_gen(1))
    e = proc.sample_loop(eps_fn, xT, 5, eta=1.0, generator=_gen(2))
    assert torch.equal(c, d) and not torch.equal(c, e)


@pytest.mark.parametrize("sched", list(SCHEDULES))
def test_eta1_sigma_equals_ddpm_posterior_std(sched):
    proc = DiffusionProcess(SCHEDULES[sched]())
    t = torch.arange(proc.T)
    sigma = proc.ddim_sigma(t, t - 1, eta=1.0)
    torch.testing.assert_close(sigma, proc.posterior_variance.sqrt(), atol=1e-12, rtol=1e-10)
    assert float(sigma[0]) == 0.0
    assert float(proc.ddim_sigma(500 if proc.T > 500 else 2, 0, eta=0.0)) == 0.0


@pytest.mark.parametrize("noise", ["gaussian", "laplace"])
def test_ddim_eta1_consecutive_equals_ddpm_step(noise):
    proc = DiffusionProcess(SCHEDULES["scaled_linear"](), make_noise(noise))
    xt = torch.randn(4, 3, 5, 5, generator=_gen(6), dtype=torch.float64)
    eps = torch.randn(4, 3, 5, 5, generator=_gen(7), dtype=torch.float64)
    t = torch.tensor([1, 10, 500, 999])
    a = proc.ddim_step(eps, t, t - 1, xt, eta=1.0, generator=_gen(8))
    b = proc.ddpm_step(eps, t, xt, generator=_gen(8))
    torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("sched", list(SCHEDULES))
def test_posterior_matches_gaussian_conditioning(sched):
    # 1-D Gaussian toy, exact: given x0, (x_{t-1}, x_t) is jointly Gaussian with
    # means (√ᾱ_{t-1}x0, √ᾱ_t x0), var(x_{t-1}) = 1-ᾱ_{t-1}, var(x_t) = 1-ᾱ_t, cov = √α_t(1-ᾱ_{t-1});
    # condition on x_t by the Gaussian formulas and compare with c1, c2, β̃.
    proc = DiffusionProcess(SCHEDULES[sched]())
    ab = proc.alphas_cumprod
    ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
    a = proc.alphas
    x0, xt = 0.8, -0.3
    ok = (1 - ab) > 0
    cov = a.sqrt() * (1 - ab_prev)
    var_t = (1 - ab).clamp(min=1e-300)
    mean = ab_prev.sqrt() * x0 + cov / var_t * (xt - ab.sqrt() * x0)
    var = (1 - ab_prev) - cov**2 / var_t
    T = proc.T
    m, v = proc.posterior_mean_variance(
        torch.full((T, 1), x0, dtype=torch.float64),
        torch.full((T, 1), xt, dtype=torch.float64),
        torch.arange(T),
    )
    torch.testing.assert_close(m[ok, 0], mean[ok], atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(v[ok, 0], var[ok].clamp(min=0), atol=1e-10, rtol=1e-9)
    if not bool(ok.all()):  # cosine t=0: point mass at x0
        assert float(m[0, 0]) == x0 and float(v[0, 0]) == 0.0


def test_posterior_monte_carlo_toy():
    # x0 ~ N(m, s²) known; simulate x_{t-1} ~ q(·|x0) then x_t ~ q(x_t|x_{t-1}); regress x_{t-1} on (x0, x_t):
    # the coefficients and residual variance must equal c1, c2, β̃.
    proc = DiffusionProcess(Schedule.from_config("scaled_linear", 1000))
    g = _gen(9)
    n = 10**6
    for t in (1, 300, 900):
        x0 = 0.5 + 0.8 * torch.randn(n, generator=g, dtype=torch.float64)
        ab_prev = float(proc.alphas_cumprod[t - 1])
        beta = float(proc.betas[t])
        x_prev = math.sqrt(ab_prev) * x0 + math.sqrt(1 - ab_prev) * torch.randn(
            n, generator=g, dtype=torch.float64
        )
        x_t = math.sqrt(1 - beta) * x_prev + math.sqrt(beta) * torch.randn(
            n, generator=g, dtype=torch.float64
        )
        A = torch.stack([x0, x_t], 1)
        coef = torch.linalg.lstsq(A, x_prev.unsqueeze(1)).solution.squeeze(1)
        resid = float((x_prev - A @ coef).var())
        _, var = proc.posterior_mean_variance(
            torch.zeros(1, 1, dtype=torch.float64), torch.zeros(1, 1, dtype=torch.float64), t
        )
        assert float(coef[0]) == pytest.approx(float(proc.posterior_mean_coef1[t]), abs=5e-3)
        assert float(coef[1]) == pytest.approx(float(proc.posterior_mean_coef2[t]), abs=5e-3)
        assert resid == pytest.approx(float(var), rel=0.01)


@pytest.mark.parametrize(("noise", "kurt"), [("laplace", 3.0), ("gaussian", 0.0)])
def test_ddpm_step_uses_process_noise_family(noise, kurt):
    proc = DiffusionProcess(Schedule.from_config("scaled_linear", 1000), make_noise(noise))
    n = 10**6
    xt = torch.zeros(n, 1, dtype=torch.float64)
    eps = torch.zeros(n, 1, dtype=torch.float64)  # x̂0 = 0, posterior mean 0: output = σ ξ
    out = proc.ddpm_step(eps, 500, xt, generator=_gen(10))
    sigma = float(proc.posterior_variance[500].sqrt())
    xi = out / sigma
    assert float(xi.var()) == pytest.approx(1.0, rel=0.01)
    assert _kurt(xi) == pytest.approx(kurt, abs=0.15)
    # DDIM with eta = 1 injects the same family
    out = proc.ddim_step(eps, 500, 250, xt, eta=1.0, generator=_gen(11))
    assert _kurt(out) == pytest.approx(kurt, abs=0.15)
    # no noise at t = 0
    x = torch.randn(8, 1, generator=_gen(12), dtype=torch.float64)
    e = torch.randn(8, 1, generator=_gen(13), dtype=torch.float64)
    torch.testing.assert_close(proc.ddpm_step(e, 0, x, _gen(1)), proc.ddpm_step(e, 0, x, _gen(2)))
    torch.testing.assert_close(proc.ddpm_step(e, 0, x, _gen(1)), proc.predict_x0(x, e, 0))


def test_timesteps():
    proc = DiffusionProcess(Schedule.from_config("scaled_linear", 1000))
    assert proc.timesteps(2).tolist() == [999, 0]
    assert proc.timesteps(5, t_start=500).tolist() == [500, 375, 250, 125, 0]
    assert proc.timesteps(3).tolist() == [999, 500, 0]  # round half to even: 499.5 -> 500
    ts = proc.timesteps(15)
    assert ts.dtype == torch.int64 and ts[0] == 999 and ts[-1] == 0 and bool((ts[1:] < ts[:-1]).all())
    assert proc.timesteps(1000).tolist() == list(range(999, -1, -1))
    for bad in (1, 0, -3):
        with pytest.raises(ConfigError, match=f"k={bad} is not valid; need k >= 2"):
            proc.timesteps(bad)
    with pytest.raises(ConfigError, match="t_start=1000"):
        proc.timesteps(2, t_start=1000)
    with pytest.raises(ConfigError, match="steps would repeat"):
        proc.timesteps(12, t_start=10)


def test_sample_loop_calls_eps_fn_k_times():
    proc = DiffusionProcess(Schedule.from_config("cosine", 1000))
    seen = []

    def eps_fn(x, t):
        seen.append(int(t[0]))
        assert t.shape == (x.shape[0],) and t.dtype == torch.int64
        return torch.zeros_like(x)

    proc.sample_loop(eps_fn, (2, 1, 4, 4), 4, eta=1.0, generator=_gen(0))
    assert seen == [999, 666, 333, 0]


def test_component_schedule_add_noise():
    cs = ComponentSchedule(3, 1000)
    proc = DiffusionProcess(cs.base, Laplace())
    cmap = torch.tensor([[[0, 1], [2, 255]]])
    x0 = torch.randn(1, 4, 2, 2, generator=_gen(0), dtype=torch.float64)
    noise = proc.noise.sample(x0.shape, _gen(1), dtype=torch.float64)
    t = torch.tensor([600])
    ab = cs.alphas_cumprod_map(t, cmap)
    xt = proc.add_noise(x0, noise, alphas_cumprod=ab)
    for (i, j), sched in {
        (0, 0): cs.schedules[0],
        (0, 1): cs.schedules[1],
        (1, 0): cs.schedules[2],
        (1, 1): cs.base,
    }.items():
        p = DiffusionProcess(sched)
        torch.testing.assert_close(xt[..., i, j], p.add_noise(x0, noise, t)[..., i, j])
    torch.testing.assert_close(proc.predict_x0(xt, noise, alphas_cumprod=ab), x0, atol=1e-10, rtol=0)


def test_input_errors():
    proc = DiffusionProcess(Schedule.from_config("linear", 10), Gaussian())
    x = torch.zeros(2, 3)
    with pytest.raises(InputError, match=r"values in \[0, 9\]"):
        proc.add_noise(x, x, torch.tensor([0, 10]))
    with pytest.raises(InputError, match="noise shape"):
        proc.add_noise(x, torch.zeros(2, 4), 0)
    with pytest.raises(InputError, match="t_prev must be < t"):
        proc.ddim_step(x, 3, 3, x)
    with pytest.raises(InputError, match="either t or alphas_cumprod"):
        proc.predict_x0(x, x)
