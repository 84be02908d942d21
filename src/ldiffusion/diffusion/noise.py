"""Noise distributions for the forward and reverse diffusion processes.

Every distribution has one interface: ``name``, ``variance`` (``None`` when undefined) and
``sample(shape, generator=None, device=None, dtype=torch.float32)``. All draws are transforms of
``torch.rand`` / ``torch.randn`` called with ``generator=`` (inverse CDF or exact transforms), so a
seeded ``torch.Generator`` fixes the output on a given device.

Scale conventions (METHODS.md Part 1 §3):

- ``Gaussian``: N(0, 1).
- ``Laplace(convention="unit_variance")`` (default): scale b = 1/sqrt(2), variance 2b² = 1, so the
  ᾱ schedule keeps its meaning. ``convention="unit_scale"``: b = 1, variance 2 (what the public
  L-Diffusion code draws).
- ``StudentT(nu)``: Student's t with ``nu > 2`` degrees of freedom, rescaled by sqrt((nu-2)/nu) to unit
  variance. Excess kurtosis 6/(nu-4) for nu > 4 (infinite for nu <= 4).
- ``Cauchy(clip=None)``: location 0, scale γ = 1. It has **no mean and no variance** (``variance`` is
  ``None``), so the ᾱ schedule does not describe a signal-to-noise ratio. ``clip`` clamps draws to
  [-clip, clip] (ablation option ``noise_clip``).

Device rule (diffusers ``randn_tensor``): draws happen on the generator's device. A CPU generator with
a CUDA target draws on the CPU and moves the result (warned once per distribution object); a CUDA
generator with a CPU target is an error.
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, Literal

import torch

from ldiffusion.core.errors import ConfigError, InputError
from ldiffusion.core.registry import Registry

logger = logging.getLogger(__name__)

__all__ = [
    "NOISES",
    "Cauchy",
    "Gaussian",
    "Laplace",
    "NoiseDistribution",
    "StudentT",
    "make_noise",
]


def _draw_dtype(dtype: torch.dtype) -> torch.dtype:
    """Return the dtype used for the raw uniform/normal draws (float64 only when asked for)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class NoiseDistribution(ABC):
    """A zero-centred noise family with a generator-driven ``sample``.

    Subclasses implement ``_sample(shape, generator, device, dtype)`` on the draw device.
    """

    name: str = "noise"

    def __init__(self) -> None:
        self._warned_device = False

    @property
    @abstractmethod
    def variance(self) -> float | None:
        """Return the variance of one draw, or ``None`` when it does not exist (Cauchy)."""

    @abstractmethod
    def _sample(
        self,
        shape: tuple[int, ...],
        generator: torch.Generator | None,
        device: torch.device,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        """Draw on `device` (which equals the generator's device when a generator is given)."""

    def sample(
        self,
        shape: Sequence[int] | torch.Size,
        generator: torch.Generator | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """Draw i.i.d. noise of `shape`.

        Args:
            shape: output shape, e.g. (B, C, h, w).
            generator: explicit `torch.Generator`; `None` uses torch's global RNG (scripts only).
            device: target device; defaults to the generator's device, else CPU.
            dtype: floating output dtype (float32 default).

        Returns:
            Tensor of `shape` on `device` with `dtype`.

        Raises:
            InputError: a CUDA generator with a CPU target device.

        Example:
            >>> g = torch.Generator().manual_seed(0)
            >>> Laplace().sample((2, 3), generator=g).shape
            torch.Size([2, 3])
        """
        shape = tuple(int(s) for s in shape)
        if device is None:
            device = generator.device if generator is not None else torch.device("cpu")
        device = torch.device(device)
        draw_device = device
        if generator is not None:
            gen_device = generator.device
            if gen_device.type != device.type:
                if gen_device.type == "cpu":
                    draw_device = gen_device
                    if not self._warned_device:
                        logger.warning(
                            "%s noise: generator is on cpu but target device is %s; drawing on cpu "
                            "and moving (pass a generator on %s to draw there)",
                            self.name,
                            device,
                            device,
                        )
                        self._warned_device = True
                else:
                    raise InputError(
                        f"{self.name} noise: generator is on {gen_device} but device={device}; "
                        f"create the generator on {device} or on cpu"
                    )
            else:
                draw_device = gen_device
        out = self._sample(shape, generator, draw_device, dtype)
        return out.to(device=device, dtype=dtype)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


NOISES: Registry[type[NoiseDistribution]] = Registry("noise")


@NOISES.register("gaussian")
class Gaussian(NoiseDistribution):
    """Standard normal noise N(0, 1)."""

    name = "gaussian"

    @property
    def variance(self) -> float:
        """Return 1."""
        return 1.0

    def _sample(self, shape, generator, device, dtype):  # type: ignore[no-untyped-def]
        return torch.randn(shape, generator=generator, device=device, dtype=_draw_dtype(dtype))


@NOISES.register("laplace")
class Laplace(NoiseDistribution):
    """Zero-mean Laplace noise, density (1/2b)·exp(-|x|/b), variance 2b².

    Args:
        convention: ``"unit_variance"`` (b = 1/sqrt(2), default) or ``"unit_scale"`` (b = 1).
    """

    name = "laplace"

    def __init__(self, convention: Literal["unit_variance", "unit_scale"] = "unit_variance") -> None:
        super().__init__()
        if convention not in ("unit_variance", "unit_scale"):
            raise ConfigError(
                f"laplace convention={convention!r} is not valid; choose 'unit_variance' or 'unit_scale'"
            )
        self.convention = convention
        self.scale = 1.0 / math.sqrt(2.0) if convention == "unit_variance" else 1.0

    @property
    def variance(self) -> float:
        """Return 2b² (1 for unit_variance, 2 for unit_scale)."""
        return 2.0 * self.scale**2

    def _sample(self, shape, generator, device, dtype):  # type: ignore[no-untyped-def]
        ddt = _draw_dtype(dtype)
        # inverse CDF: v ~ U(-1, 1), x = -b·sign(v)·log(1 - |v|); keep |v| < 1.
        v = torch.rand(shape, generator=generator, device=device, dtype=ddt) * 2.0 - 1.0
        v = v.clamp(min=-1.0 + torch.finfo(ddt).eps)
        return -self.scale * torch.sign(v) * torch.log1p(-v.abs())

    def __repr__(self) -> str:
        return f"Laplace(convention={self.convention!r})"


@NOISES.register("student_t")
class StudentT(NoiseDistribution):
    """Student's t noise with `nu` degrees of freedom, rescaled to unit variance.

    Drawn with Bailey's polar method (exact for real nu, uniforms only, so it obeys `generator`):
    (U, V) uniform in the unit disc, W = U²+V², T = U·sqrt(nu·(W^(-2/nu) - 1)/W).

    Args:
        nu: degrees of freedom, must be > 2 so that the variance nu/(nu-2) exists.

    Raises:
        ConfigError: nu <= 2.
    """

    name = "student_t"

    def __init__(self, nu: float = 3.0) -> None:
        super().__init__()
        nu = float(nu)
        if not nu > 2.0 or not math.isfinite(nu):
            raise ConfigError(
                f"student_t nu={nu} is not valid; need a finite nu > 2 for a unit-variance rescaling"
            )
        self.nu = nu
        self.rescale = math.sqrt((nu - 2.0) / nu)

    @property
    def variance(self) -> float:
        """Return 1 (after rescaling by sqrt((nu-2)/nu))."""
        return 1.0

    def _sample(self, shape, generator, device, dtype):  # type: ignore[no-untyped-def]
        ddt = _draw_dtype(dtype)
        n = math.prod(shape)
        chunks: list[torch.Tensor] = []
        have = 0
        while have < n:
            m = int((n - have) / (math.pi / 4) * 1.05) + 64
            uv = torch.rand((2, m), generator=generator, device=device, dtype=ddt) * 2.0 - 1.0
            u, v = uv[0], uv[1]
            w = u * u + v * v
            keep = (w <= 1.0) & (w > 0.0)
            u, w = u[keep], w[keep]
            t = u * torch.sqrt(self.nu * (w.pow(-2.0 / self.nu) - 1.0) / w)
            chunks.append(t)
            have += t.numel()
        out = torch.cat(chunks)[:n] if chunks else torch.empty(0, device=device, dtype=ddt)
        return (out * self.rescale).reshape(shape)

    def __repr__(self) -> str:
        return f"StudentT(nu={self.nu})"


@NOISES.register("cauchy")
class Cauchy(NoiseDistribution):
    """Standard Cauchy noise (location 0, scale 1): no mean, no variance.

    Quartiles are ±1 (interquartile range 2) and the median is 0.

    Args:
        clip: if given, clamp draws to [-clip, clip].
    """

    name = "cauchy"

    def __init__(self, clip: float | None = None) -> None:
        super().__init__()
        if clip is not None and not clip > 0:
            raise ConfigError(f"cauchy clip={clip} is not valid; need clip > 0 or None")
        self.clip = None if clip is None else float(clip)

    @property
    def variance(self) -> None:
        """Return None: the Cauchy distribution has no variance (also when clipped; see docs)."""
        return None

    def _sample(self, shape, generator, device, dtype):  # type: ignore[no-untyped-def]
        ddt = _draw_dtype(dtype)
        u = torch.rand(shape, generator=generator, device=device, dtype=ddt)
        x = torch.tan(math.pi * (u - 0.5))
        if self.clip is not None:
            x = x.clamp(-self.clip, self.clip)
        return x

    def __repr__(self) -> str:
        return f"Cauchy(clip={self.clip})"


def make_noise(name: str, **kwargs: Any) -> NoiseDistribution:
    """Build a registered noise distribution by name.

    Args:
        name: one of ``NOISES.names()`` (``cauchy``, ``gaussian``, ``laplace``, ``student_t``).
        **kwargs: constructor arguments (``convention``, ``nu``, ``clip``).

    Raises:
        ConfigError: unknown name (lists the valid names) or bad keyword arguments.

    Example:
        >>> make_noise("student_t", nu=5).name
        'student_t'
    """
    cls = NOISES.get(name)
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"noise={name!r}: bad arguments {sorted(kwargs)}: {e}") from e
