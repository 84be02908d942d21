"""Noise schedules as pure functions returning float64 tensors, plus component-wise schedules.

Indexing convention (whole package): a schedule of length T holds β_t, α_t = 1-β_t and
ᾱ_t = Π_{j<=t} α_j for t = 0..T-1; "t = -1" means the clean signal (ᾱ_{-1} := 1).

- ``linear_betas``: DDPM linear β.
- ``scaled_linear_betas``: Stable Diffusion 1.5 (β = linspace(sqrt β_start, sqrt β_end)², L-Diffusion base).
- ``cosine_alphas_cumprod``: LDSeg / Nichol & Dhariwal, ᾱ_t = f(t)/f(0), t = 0..T-1, so ᾱ_0 = 1 exactly
  (β_0 = 0) and ᾱ_999 = 2.43e-6 for T = 1000; β is never clipped.
- ``vp_betas``: cDAL's discretised VP SDE on the grid s_k = ε + (1-ε)k/T; entry t holds cDAL's β_{t+1}.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ldiffusion.core.errors import ConfigError, InputError

__all__ = [
    "SCHEDULE_KINDS",
    "ComponentSchedule",
    "Schedule",
    "cosine_alphas_cumprod",
    "cosine_betas",
    "gammas_from_frequencies",
    "linear_betas",
    "reduce_labels_majority",
    "scaled_linear_betas",
    "vp_betas",
]

SCHEDULE_KINDS = ("linear", "scaled_linear", "cosine", "vp")


def _check_steps(T: int) -> int:
    if int(T) != T or T < 1:
        raise ConfigError(f"schedule T={T} is not valid; need an integer >= 1")
    return int(T)


def linear_betas(T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """Return DDPM linear betas, linspace(beta_start, beta_end, T), float64 (T,)."""
    T = _check_steps(T)
    return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)


def scaled_linear_betas(T: int, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    """Return Stable Diffusion ``scaled_linear`` betas, float64 (T,).

    β = linspace(sqrt(β_start), sqrt(β_end), T)². For T != 1000 both end points are first
    multiplied by 1000/T (METHODS.md Part 1 §3), so a shorter chain reaches a similar ᾱ_{T-1}.
    METHODS.md quotes ᾱ_t as the product over j = 1..t (1-based), i.e. array index t-1 here:
    ᾱ_500 = 0.278 is ``cumprod(1 - β)[499]`` (index 500 holds 0.276).

    Example:
        >>> ab = torch.cumprod(1 - scaled_linear_betas(1000), 0)
        >>> round(float(ab[499]), 3)
        0.278
    """
    T = _check_steps(T)
    k = 1000.0 / T
    b0, b1 = beta_start * k, beta_end * k
    return torch.linspace(math.sqrt(b0), math.sqrt(b1), T, dtype=torch.float64) ** 2


def cosine_alphas_cumprod(T: int, s: float = 0.008) -> torch.Tensor:
    """Return the cosine ᾱ_t = f(t)/f(0), f(t) = cos²(((t/T+s)/(1+s))·π/2), t = 0..T-1, float64 (T,).

    LDSeg convention: ᾱ_0 = 1, ᾱ_499 ≈ 0.4954, ᾱ_999 ≈ 2.43e-6 for T = 1000.
    """
    T = _check_steps(T)
    t = torch.arange(T, dtype=torch.float64)
    f = torch.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
    f0 = math.cos(s / (1 + s) * math.pi / 2) ** 2
    return f / f0


def cosine_betas(T: int, s: float = 0.008) -> torch.Tensor:
    """Return cosine β_t = 1 - ᾱ_t/ᾱ_{t-1} (ᾱ_{-1} = 1), float64 (T,); β_0 = 0, never clipped."""
    ab = cosine_alphas_cumprod(T, s)
    prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
    return 1.0 - ab / prev


def vp_betas(T: int, beta_min: float = 0.1, beta_max: float = 20.0, eps: float = 1e-3) -> torch.Tensor:
    """Return cDAL's discretised VP betas β_1..β_T as float64 (T,).

    Grid s_k = ε + (1-ε)k/T, k = 0..T; ᾱ(s) = exp(-½(β_max-β_min)s² - β_min·s);
    β_k = 1 - ᾱ(s_k)/ᾱ(s_{k-1}). T = 2 gives (0.92132, 0.99945).
    """
    T = _check_steps(T)
    k = torch.arange(T + 1, dtype=torch.float64)
    s = eps + (1.0 - eps) * k / T
    log_ab = -0.5 * (beta_max - beta_min) * s**2 - beta_min * s
    return 1.0 - torch.exp(log_ab[1:] - log_ab[:-1])


@dataclass(frozen=True, eq=False)
class Schedule:
    """A discrete schedule: float64 betas, alphas, alphas_cumprod, each (T,), index t = 0..T-1.

    Build with ``Schedule.from_betas`` or ``Schedule.from_config``.
    """

    betas: torch.Tensor
    alphas: torch.Tensor
    alphas_cumprod: torch.Tensor
    kind: str = "custom"
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def T(self) -> int:  # noqa: N802 (paper notation)
        """Return the number of timesteps."""
        return int(self.betas.shape[0])

    @classmethod
    def from_betas(cls, betas: torch.Tensor, kind: str = "custom", **params: Any) -> Schedule:
        """Build from betas (T,); ᾱ is the cumulative product of 1-β in float64."""
        betas = torch.as_tensor(betas, dtype=torch.float64).flatten()
        if betas.numel() == 0 or bool(((betas < 0) | (betas > 1)).any()):
            raise ConfigError(f"schedule {kind!r}: betas must be non-empty and in [0, 1]")
        alphas = 1.0 - betas
        return cls(betas, alphas, torch.cumprod(alphas, 0), kind, dict(params))

    @classmethod
    def from_config(cls, kind: str, T: int, **kw: Any) -> Schedule:
        """Build a schedule by name.

        Args:
            kind: ``linear`` (beta_start, beta_end), ``scaled_linear`` (beta_start, beta_end),
                ``cosine`` (s) or ``vp`` (beta_min, beta_max, eps).
            T: number of timesteps.
            **kw: the keyword arguments of the matching function.

        Raises:
            ConfigError: unknown kind or keyword.
        """
        fns = {"linear": linear_betas, "scaled_linear": scaled_linear_betas, "vp": vp_betas}
        try:
            if kind == "cosine":
                ab = cosine_alphas_cumprod(T, **kw)
                betas = cosine_betas(T, **kw)
                alphas = 1.0 - betas
                return cls(betas, alphas, ab, kind, dict(kw))
            if kind not in fns:
                raise ConfigError(
                    f"schedule kind={kind!r} is not valid; choose one of {list(SCHEDULE_KINDS)}"
                )
            return cls.from_betas(fns[kind](T, **kw), kind, **kw)
        except TypeError as e:
            raise ConfigError(f"schedule kind={kind!r}: bad arguments {sorted(kw)}: {e}") from e


def gammas_from_frequencies(frequencies: Sequence[float], low: float = 0.8, high: float = 1.2) -> list[float]:
    """Spread γ linearly over [low, high] by frequency rank: most frequent class low, rarest high.

    Ties keep class order. One class gets γ = 1 (the shared schedule).
    """
    n = len(frequencies)
    if n == 1:
        return [1.0]
    order = sorted(range(n), key=lambda c: (-float(frequencies[c]), c))  # most frequent first
    levels = torch.linspace(low, high, n, dtype=torch.float64).tolist()
    gammas = [0.0] * n
    for rank, c in enumerate(order):
        gammas[c] = levels[rank]
    return gammas


class ComponentSchedule:
    """N component-wise scaled-linear schedules (L-Diffusion ``component_schedule=per_class``).

    Component n uses β from β_start to β_end·γ_n (scaled-linear, 1000/T rescaling as in
    ``scaled_linear_betas``). The shared base schedule (γ = 1) serves locations whose component id is
    outside [0, N) (ignore / unlabelled). At test time the component map must come from a prediction
    or be absent (base schedule): never feed ground-truth masks at inference.

    Args:
        num_components: N (classes including background).
        T: timesteps.
        beta_start, beta_end: base scaled-linear end points.
        gammas: explicit list of N multipliers; overrides `frequencies`.
        frequencies: training-pixel frequency per class; γ spread over [0.8, 1.2] by rank. Default:
            class order (class 0 treated as most frequent).
    """

    def __init__(
        self,
        num_components: int,
        T: int,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        gammas: Sequence[float] | None = None,
        frequencies: Sequence[float] | None = None,
    ) -> None:
        if num_components < 1:
            raise ConfigError(f"num_components={num_components} is not valid; need >= 1")
        if gammas is None:
            freqs = (
                frequencies
                if frequencies is not None
                else [float(num_components - c) for c in range(num_components)]
            )
            if len(freqs) != num_components:
                raise ConfigError(
                    f"frequencies has {len(freqs)} entries, expected num_components={num_components}"
                )
            gammas = gammas_from_frequencies(freqs)
        if len(gammas) != num_components:
            raise ConfigError(f"component_gamma has {len(gammas)} entries, expected {num_components}")
        self.gammas = [float(g) for g in gammas]
        self.num_components = num_components
        self.base = Schedule.from_betas(scaled_linear_betas(T, beta_start, beta_end), "scaled_linear")
        self.schedules = [
            Schedule.from_betas(scaled_linear_betas(T, beta_start, beta_end * g), "scaled_linear", gamma=g)
            for g in self.gammas
        ]
        # (N+1, T): row N is the base schedule (for ids outside [0, N))
        self.table = torch.stack([s.alphas_cumprod for s in self.schedules] + [self.base.alphas_cumprod])

    @property
    def T(self) -> int:  # noqa: N802
        """Return the number of timesteps."""
        return self.base.T

    def alphas_cumprod_map(self, t: torch.Tensor, component_map: torch.Tensor) -> torch.Tensor:
        """Return per-location ᾱ for a component map.

        Args:
            t: timesteps (B,) int64 in [0, T).
            component_map: (B, h, w) integer component ids; ids outside [0, N) use the base schedule.

        Returns:
            float64 (B, 1, h, w) on `component_map`'s device; pass as ``alphas_cumprod=`` to
            ``DiffusionProcess.add_noise``.
        """
        if component_map.ndim != 3:
            raise InputError(f"component_map: expected (B, h, w), got {tuple(component_map.shape)}")
        t = torch.as_tensor(t, dtype=torch.long).reshape(-1)
        if t.shape[0] != component_map.shape[0]:
            raise InputError(f"t has {t.shape[0]} entries, component_map batch is {component_map.shape[0]}")
        cm = component_map.long().cpu()
        ids = torch.where(
            (cm >= 0) & (cm < self.num_components), cm, torch.full_like(cm, self.num_components)
        )
        tt = t.cpu().view(-1, 1, 1).expand_as(ids)
        out = self.table[ids, tt]
        return out.unsqueeze(1).to(component_map.device)


def reduce_labels_majority(
    label: torch.Tensor, factor: int, num_classes: int, ignore_index: int = 255
) -> torch.Tensor:
    """Reduce a label map to latent resolution by majority vote over each factor×factor cell.

    Ignored pixels do not vote; a cell with no valid pixel gets `ignore_index`. Ties go to the
    lowest class id.

    Args:
        label: (B, H, W) int64 class ids in [0, num_classes) or `ignore_index`.
        factor: down-sampling factor f; H and W must be divisible by f.
        num_classes: number of classes N.
        ignore_index: label value that does not vote.

    Returns:
        (B, H/f, W/f) int64.
    """
    if label.ndim != 3:
        raise InputError(f"label: expected (B, H, W), got {tuple(label.shape)}")
    B, H, W = label.shape
    if factor < 1 or H % factor or W % factor:
        raise InputError(
            f"label: expected H, W divisible by factor={factor}, got (B, H, W)={tuple(label.shape)}"
        )
    h, w = H // factor, W // factor
    lab = label.long()
    valid = (lab >= 0) & (lab < num_classes)
    oh = torch.nn.functional.one_hot(torch.where(valid, lab, 0), num_classes) * valid.unsqueeze(-1)
    counts = oh.view(B, h, factor, w, factor, num_classes).sum(dim=(2, 4))  # (B, h, w, N)
    best = counts.argmax(-1)
    return torch.where(counts.sum(-1) > 0, best, torch.full_like(best, ignore_index))
