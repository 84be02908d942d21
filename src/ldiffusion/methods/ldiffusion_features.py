"""L-Diffusion's feature-map sequence: encode -> noise to τ_1 -> T reverse steps -> decode each -> grey stack.

METHODS.md Part 1 §2-§3 (steps 0-6 of the data flow). For images x (B, 3, H, W) in [0, 1]:

1. z0 = s · E(2x - 1).mean (frozen autoencoder, latent scale s);
2. x_{τ_1} = √ᾱ_{τ_1}·z0 + √(1-ᾱ_{τ_1})·ε, ε from the process's noise family (Laplace by default);
3. ``feature_mode="chain"`` (default): T successive generalised-DDIM steps τ_k -> τ_{k+1} with the U-Net's ε̂
   and same-family ξ (η = 1: re-spaced DDPM); ``"independent"``: z0 noised to each τ_k with the *same* ε,
   then one step τ_k -> τ_{k+1} (what the authors' HEAD code does, with noise);
4. r_k = D(x_{τ_{k+1}} / s) (``decode_target="latent"``) or D(x̂0 / s) (``"x0"``), in [-1, 1], mapped
   to [0, 1];
5. grey g_k = 0.2989 R + 0.5870 G + 0.1140 B (BT.601, the weights of the authors' code);
   ``channels="rgb"`` keeps the 3 decoded colour maps instead, ``"grey+rgb"`` both (grey first);
6. F = stack(g_1..g_T): (B, T, H, W) (T·3 or T·4 channels with colour, step-major).

Per-location schedules (``component_schedule="per_class_iterative"``): with ``component_map`` (B, h, w)
class ids and ``component_table`` (N+1, T_train) ᾱ per class (row N: the base schedule, used for ids
outside [0, N)), every latent location is noised and denoised with its own class's ᾱ: the forward noising
x_{τ_1} = √ᾱ_(n,τ_1)·z0 + √(1-ᾱ_(n,τ_1))·ε and each generalised-DDIM step use ᾱ_(n,τ) element-wise (the
U-Net still receives the shared step index τ, as in training).

Timesteps (1-based, paper notation): τ_k = round(t_start·(T-k+1)/T), k = 1..T, τ_{T+1} = 0 (clean, ᾱ := 1).
The process indexes ᾱ from 0, so τ is passed as τ - 1 (τ_{T+1} = 0 -> index -1).

Randomness: every sample b draws its noise (ε and every ξ) from its own generator ``generators[b]``, so a
tile's features depend only on its own seed, never on the other tiles of the batch.

Gradients (``grad=True``, stage 1 with L_CRT): ``backprop="full"`` keeps the whole graph (T U-Net and T
decoder passes); ``"checkpoint"`` recomputes each U-Net and decoder pass in the backward (same gradients, less
memory); ``"last_k"`` runs the first T - k steps without a graph, so only the last k U-Net calls and the
last k decoded maps carry gradients (a documented truncation). The encoder never needs gradients.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint as _checkpoint

from ldiffusion.core.errors import ConfigError, InputError
from ldiffusion.core.rng import derive_seed, make_generator
from ldiffusion.diffusion.process import DiffusionProcess

__all__ = [
    "BT601",
    "decoded_maps",
    "feature_cache_path",
    "feature_stack",
    "feature_timesteps",
    "generators_for",
    "to_grey",
]

#: ITU-R BT.601 luma weights, as used by the authors' code (PIL "L" conversion).
BT601 = (0.2989, 0.5870, 0.1140)

FeatureMode = Literal["chain", "independent"]
DecodeTarget = Literal["latent", "x0"]
Backprop = Literal["full", "checkpoint", "last_k"]
FeatureChannels = Literal["grey", "rgb", "grey+rgb"]


def feature_cache_path(cache_dir: str | Path, case_id: str, key: str) -> Path:
    """Return the cache file `cache_dir/<case_id>_<key>.pt` of a tile's feature stack.

    Refuses an id that is not one file-name component, so a crafted id ("../x", "/abs") can never
    read or write outside `cache_dir`.

    Raises:
        InputError: naming the cache folder, the id and why it is not valid.
    """
    try:  # the data contract's id check, when this version of data/format.py has one
        from ldiffusion.data.format import id_problem
    except ImportError:  # pragma: no cover - older data/format.py
        id_problem = None
    why = id_problem(case_id) if id_problem is not None else None
    if why is None:
        if not isinstance(case_id, str) or not case_id or case_id in (".", ".."):
            why = "is empty, '.' or '..'"
        elif any(c in case_id for c in ("/", "\\", "\0")) or os.path.isabs(case_id):
            why = "contains a path separator or NUL, or is absolute"
    if why is not None:
        raise InputError(
            f"feature cache {cache_dir}: id {case_id!r} is not valid ({why}); ids must be one file name"
        )
    return Path(cache_dir) / f"{case_id}_{key}.pt"


def to_grey(images: Tensor) -> Tensor:
    """Return BT.601 grey maps (B, 1, H, W) of RGB images (B, 3, H, W) (any range; the formula is linear).

    Example:
        >>> to_grey(torch.ones(1, 3, 2, 2)).flatten().tolist()[0]
        0.9999000430107117
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise InputError(f"to_grey: expected (B, 3, H, W), got {tuple(images.shape)}")
    w = images.new_tensor(BT601).view(1, 3, 1, 1)
    return (images * w).sum(1, keepdim=True)


def decoded_maps(images01: Tensor, channels: FeatureChannels = "grey") -> Tensor:
    """Return the maps one decoded step adds to the stack: (B, 1 | 3 | 4, H, W) of images (B, 3, H, W).

    Args:
        images01: decoded images in [0, 1].
        channels: "grey" (BT.601, the paper), "rgb" (the 3 colour maps) or "grey+rgb" (grey first).

    Raises:
        ConfigError: unknown `channels`.
    """
    if channels == "grey":
        return to_grey(images01)
    if channels == "rgb":
        return images01
    if channels == "grey+rgb":
        return torch.cat([to_grey(images01), images01], dim=1)
    raise ConfigError(
        f"feature_channels={channels!r} is not valid; choose one of ['grey', 'rgb', 'grey+rgb']"
    )


def abar_map(table: Tensor, component_map: Tensor, t: int) -> Tensor:
    """Return per-location ᾱ (B, 1, h, w) float64 of step index t (-1 = clean, ᾱ = 1).

    Args:
        table: (N+1, T) float64 ᾱ per class; row N is the base schedule.
        component_map: (B, h, w) integer class ids; ids outside [0, N) use row N.
        t: 0-based step index in [-1, T).
    """
    n = table.shape[0] - 1
    cm = component_map.long()
    ids = torch.where((cm >= 0) & (cm < n), cm, torch.full_like(cm, n))
    if t < 0:
        return torch.ones(ids.shape, dtype=torch.float64, device=ids.device).unsqueeze(1)
    return table.to(ids.device)[:, t][ids].unsqueeze(1)


def _ddim_step_map(
    x: Tensor,
    eps_hat: Tensor,
    ab_t: Tensor,
    ab_p: Tensor,
    eta: float,
    draw: Callable[[torch.Generator], Tensor],
    generators: Sequence[torch.Generator],
) -> tuple[Tensor, Tensor]:
    """Generalised DDIM step with per-location ᾱ (float64 (B, 1, h, w)): return (x_{t'}, x̂0).

    Same formula as `DiffusionProcess.ddim_step` with ᾱ_t, ᾱ_{t'} element-wise; ξ per sample from its
    own generator (drawn only when eta > 0, in the same order as the shared path).
    """
    one_m = 1.0 - ab_t
    safe = torch.where(one_m > 0, one_m, torch.ones_like(one_m))
    var = ((1.0 - ab_p) / safe * (1.0 - ab_t / ab_p)).clamp(min=0)
    sigma = float(eta) * torch.where(one_m > 0, var, torch.zeros_like(var)).sqrt()
    dt = x.dtype
    x0_hat = (x - one_m.clamp(min=0).sqrt().to(dt) * eps_hat) / ab_t.sqrt().to(dt)
    out = ab_p.sqrt().to(dt) * x0_hat + (1.0 - ab_p - sigma**2).clamp(min=0).sqrt().to(dt) * eps_hat
    if eta > 0:
        out = out + sigma.to(dt) * _per_sample(draw, generators)
    return out, x0_hat


def feature_timesteps(steps: int, t_start: int, num_train_timesteps: int) -> list[int]:
    """Return the T + 1 process indices τ_1 - 1 > ... > τ_T - 1 > τ_{T+1} - 1 = -1.

    Args:
        steps: T, the number of reverse steps (= feature maps).
        t_start: τ_1 in 1-based paper notation (1 <= t_start <= T_train).
        num_train_timesteps: T_train of the schedule.

    Raises:
        ConfigError: invalid range or repeated timesteps (t_start too small for T steps).

    Example:
        >>> feature_timesteps(5, 500, 1000)
        [499, 399, 299, 199, 99, -1]
    """
    if steps < 1:
        raise ConfigError(f"steps={steps} is not valid; need T >= 1 reverse steps")
    if not 1 <= t_start <= num_train_timesteps:
        raise ConfigError(
            f"t_start={t_start} is not valid; need 1 <= t_start <= T_train={num_train_timesteps}"
        )
    taus = [round(t_start * (steps - k + 1) / steps) for k in range(1, steps + 1)] + [0]
    if any(a <= b for a, b in itertools.pairwise(taus)):
        raise ConfigError(
            f"t_start={t_start} with steps={steps} gives repeated timesteps {taus}; "
            f"raise t_start to at least {2 * steps} or lower steps"
        )
    return [t - 1 for t in taus]


def generators_for(seeds: Sequence[int], device: torch.device | str = "cpu") -> list[torch.Generator]:
    """Return one generator per seed (on `device`)."""
    return [make_generator(int(s), device) for s in seeds]


def tile_seeds(base_seed: int, ids: Sequence[str], draw: int = 0) -> list[int]:
    """Return per-tile noise seeds ``derive_seed(base_seed, "features", id, draw)`` (reproducible
    features).
    """
    return [derive_seed(base_seed, "features", i, draw) for i in ids]


def _per_sample(noise_fn: Callable[[torch.Generator], Tensor], gens: Sequence[torch.Generator]) -> Tensor:
    return torch.cat([noise_fn(g) for g in gens])


def _maybe_ckpt(fn: Callable[..., Tensor], use: bool, *args: Tensor) -> Tensor:
    """Run ``fn(*args)``, under activation checkpointing when `use` and autograd is recording."""
    if use and torch.is_grad_enabled():
        return _checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def feature_stack(
    ae: nn.Module,
    unet: nn.Module,
    process: DiffusionProcess,
    images: Tensor,
    *,
    steps: int,
    t_start: int,
    eta: float = 1.0,
    generators: Sequence[torch.Generator] | None = None,
    seeds: Sequence[int] | None = None,
    feature_mode: FeatureMode = "chain",
    decode_target: DecodeTarget = "latent",
    grad: bool = False,
    backprop: Backprop = "full",
    last_k: int = 1,
    scaling_factor: float | None = None,
    z0: Tensor | None = None,
    channels: FeatureChannels = "grey",
    component_map: Tensor | None = None,
    component_table: Tensor | None = None,
    on_step: Callable[[int], None] | None = None,
) -> Tensor:
    """Compute the T-step feature stack of images (grey maps by default).

    Args:
        ae: autoencoder with ``encode(x in [-1, 1]).mean``, ``decode(z) in [-1, 1]`` and ``scaling_factor``.
        unet: ε-predictor ``unet(x (B, c, h, w), t (B,) int64) -> ε̂``.
        process: the diffusion process (schedule + noise family).
        images: (B, 3, H, W) float32 in [0, 1]; H, W divisible by the AE factor times the U-Net divisor.
        steps: T.
        t_start: τ_1 (1-based).
        eta: DDIM η (1 = re-spaced DDPM with same-family noise, 0 = deterministic DDIM).
        generators: one generator per sample (or give `seeds`).
        seeds: one seed per sample; generators are built on the images' device.
        feature_mode: "chain" or "independent" (module docstring).
        decode_target: "latent" (decode x_{τ_{k+1}}) or "x0" (decode x̂0 of step k).
        grad: build a graph through the U-Net and the decoder (stage 1 contrastive loss).
        backprop: "full", "checkpoint" or "last_k" (only with ``grad=True``).
        last_k: number of final steps that carry gradients with ``backprop="last_k"``.
        scaling_factor: latent scale s (default ``ae.scaling_factor``).
        z0: precomputed scaled latents (B, c, h, w) (skips the encoder).
        channels: maps per decoded step: "grey" (1), "rgb" (3) or "grey+rgb" (4).
        component_map: (B, h, w) class ids at latent resolution: per-location schedules (module
            docstring); None = the process's shared schedule.
        component_table: (N+1, T_train) float64 ᾱ per class (row N = base); required with
            `component_map`.
        on_step: called with k before step k's U-Net call (k = 0..T-1); selects per-step statistics of
            calibrated normalisation layers (`ldiffusion_norm`).

    Returns:
        (B, T·m, H, W) float32 maps in [0, 1], m = 1, 3 or 4 per step (step-major).

    Raises:
        InputError: bad shapes or generator count.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise InputError(f"feature_stack: expected images (B, 3, H, W) in [0, 1], got {tuple(images.shape)}")
    B = images.shape[0]
    if generators is None:
        if seeds is None:
            raise InputError("feature_stack: give one generator or one seed per sample")
        generators = generators_for(seeds, images.device)
    if len(generators) != B:
        raise InputError(f"feature_stack: {len(generators)} generators for a batch of {B}")
    if backprop not in ("full", "checkpoint", "last_k"):
        raise ConfigError(
            f"crt_backprop={backprop!r} is not valid; choose one of ['full', 'checkpoint', 'last_k']"
        )
    s = float(ae.scaling_factor if scaling_factor is None else scaling_factor)
    ts = feature_timesteps(steps, t_start, process.T)
    if z0 is None:
        with torch.no_grad():
            z0 = ae.encode(images.float() * 2.0 - 1.0).mean * s
    z0 = z0.detach()
    if component_map is not None and (
        component_table is None or tuple(component_map.shape) != (B, *z0.shape[-2:])
    ):
        raise InputError(
            f"feature_stack: component_map needs component_table and shape (B, h, w) = {(B, *z0.shape[-2:])}"
            f" of the latent, got {tuple(component_map.shape)}"
        )
    shape1 = (1, *z0.shape[1:])
    noise = process.noise

    def draw(g: torch.Generator) -> Tensor:
        return noise.sample(shape1, generator=g, device=z0.device, dtype=z0.dtype)

    eps0 = _per_sample(draw, generators)
    use_ckpt = grad and backprop == "checkpoint"
    first_grad_step = 0
    if grad and backprop == "last_k":
        first_grad_step = max(steps - max(int(last_k), 1), 0)

    def eps_fn(x: Tensor, t: Tensor) -> Tensor:
        return unet(x, t)

    def decode(z: Tensor) -> Tensor:
        return ae.decode(z / s)

    def step(x: Tensor, t: int, tp: int, eps_hat: Tensor) -> tuple[Tensor, Tensor]:
        """Return (x_{t_prev}, x̂0), with per-sample ξ."""
        if component_map is not None:
            ab_t = abar_map(component_table, component_map, t)
            ab_p = abar_map(component_table, component_map, tp)
            return _ddim_step_map(x, eps_hat, ab_t, ab_p, eta, draw, generators)
        outs = [
            process.ddim_step(eps_hat[b : b + 1], t, tp, x[b : b + 1], eta=eta, generator=generators[b])
            for b in range(B)
        ]
        x0_hat = process.predict_x0(x, eps_hat, t)
        return torch.cat(outs), x0_hat

    def noised(t: int) -> Tensor:
        if component_map is None:
            return process.add_noise(z0, eps0, t)
        return process.add_noise(z0, eps0, alphas_cumprod=abar_map(component_table, component_map, t))

    maps = []
    x = noised(ts[0])
    for k in range(steps):
        t, tp = ts[k], ts[k + 1]
        with_grad = grad and k >= first_grad_step
        if on_step is not None:
            on_step(k)
        with torch.set_grad_enabled(with_grad):
            if feature_mode == "independent":
                x = noised(t)
            elif feature_mode != "chain":
                raise ConfigError(
                    f"feature_mode={feature_mode!r} is not valid; choose one of ['chain', 'independent']"
                )
            if not with_grad:
                x = x.detach()
            t_batch = torch.full((B,), t, dtype=torch.long, device=z0.device)
            eps_hat = _maybe_ckpt(eps_fn, use_ckpt, x, t_batch)
            x, x0_hat = step(x, t, tp, eps_hat)
            if decode_target == "latent":
                target = x
            elif decode_target == "x0":
                target = x0_hat
            else:
                raise ConfigError(
                    f"decode_target={decode_target!r} is not valid; choose one of ['latent', 'x0']"
                )
            img = _maybe_ckpt(decode, use_ckpt, target)
            maps.append(decoded_maps((img.float().clamp(-1.0, 1.0) + 1.0) / 2.0, channels))
    return torch.cat(maps, dim=1)
