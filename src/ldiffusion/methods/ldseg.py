"""LDSeg (`"ldseg"`): latent diffusion on a standardised label latent, trained end to end (METHODS Part 2).

Training (one step, [P Alg. 1], METHODS Part 2 §3)::

    z_i = E_img(x);  z0 = E_lab(y)                       # (B, C, H/s, W/s) each, s = latent_stride, C = 1
    t ~ U{0..T-1} per sample;  eps ~ N(0, I) per sample  # `t_per_batch`, `shared_noise` = code variants
                                                         # `grid_t_share`: some t at the sampler's points
    z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps         # cosine schedule, T = 1000
    eps_hat = Den([z_t || z_i], t)
    z_dn = z_t - eps_hat                                 # eq. 12 literal (`zdn_mode="x0"`: exact x0)
                                                         # `prediction="v"`: Den gives v, z_dn = x0 estimate
    p = softmax(Dec(z_dn))
    loss = CE(p, y) + gamma (1 - Dice(p, y)) + lambda mean((eps_hat - eps)^2)   # (v_hat - v)^2 with "v"

All four networks share one Adam optimiser ("model"; the code's four Adams on one loss are the same
thing). Its learning rate decays exponentially per epoch ([P §IV-C] "exponentially decayed"):
lr(step) = lr * lr_decay ** floor(step / steps_per_epoch) (`lr_multiplier`, applied by the loop
before every step). An exponential moving average of the denoiser (`ema`, code-only) is used at
inference; off the paper, `ema_scope="all"` averages the image encoder and the decoder too. The
latent stride s (`latent_stride`) is 16 in the paper; 8 and 4 keep more label detail.
Table V's ablation replaces either encoder by nearest-neighbour down-sampling
(`label_downsampler`, `image_downsampler` = "nearest"). Off the paper, `latent_channels` and
`image_latent_channels` widen the one-channel z0 and z_i, and `decoder_skips` (on in `small`) hands the label
decoder the ResNet image encoder's features finer than the latent: Dec(z_dn, skips).

Inference ([P §V-B], METHODS Part 2 §4): DDIM in the latent on the grid
tau_j = round(j (T-1) / (K-1)), j = 0..K-1 (K = `ddim_steps` >= 2, default 2, i.e. {T-1, 0}), starting
from z_T ~ N(0, I), renormalising z after every step (`renorm`: per sample by default; "batch" is the
code's whole-array statistics, which couples images), then argmax of Dec(z). The last grid point
tau_0 = 0 has abar = 1, so its update is the identity; it is skipped unless `call_at_zero`.

Randomness at inference: image b of a batch gets a base seed drawn (in batch order) from the passed
generator, and run s of that image draws all its noise from its own generator seeded with
`derive_seed(base_b, s)`. So an image's output does not depend on the images after it in the batch,
nor on how the S runs are chunked, and run 0 of an S-run call equals the 1-run call.

Uncertainty ([P §VII], `predict_with_uncertainty`): S runs; the mean map is the mean of the one-hot
masks, and the uncertainty is the per-pixel standard deviation over runs of each foreground one-hot
channel, maximum over foreground classes (`uncertainty="sd"`; exactly 0 for S = 1) or the normalised
entropy of the mean map (`uncertainty="entropy"`).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import logging
import math
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldiffusion.core.config import check_range
from ldiffusion.core.errors import ConfigError, InputError
from ldiffusion.core.rng import derive_seed, make_generator
from ldiffusion.methods.base import (
    STAIN_AUGMENTATION,
    ClassCounting,
    MethodConfig,
    Segmenter,
    fold_ema,
    inference_autocast,
    warmup_ema_decay,
)
from ldiffusion.nets.ldseg import build_ldseg_nets, check_ldseg_input, ldseg_preset, ldseg_size_divisor

logger = logging.getLogger(__name__)

__all__ = [
    "LDSegConfig",
    "LDSegSegmenter",
    "cosine_alpha_bar",
    "ddim_grid",
    "ddim_update",
    "from_v",
    "ldseg_dice",
    "lr_decay_multiplier",
    "renormalize",
    "v_target",
]

IGNORE = 255


# ---------------------------------------------------------------------------------------------- math
def cosine_alpha_bar(t: Tensor, T: int = 1000, s: float = 0.008) -> Tensor:
    """Return the cosine abar(t) = f(t)/f(0), f(t) = cos^2(((t/T + s)/(1 + s)) pi/2), float64.

    Works for non-integer t (the code's unrounded DDIM grid); at integers it equals
    `ldiffusion.diffusion.schedules.cosine_alphas_cumprod(T, s)[t]` (abar_0 = 1, abar_999 = 2.43e-6).

    Args:
        t: steps, any shape, int or float, in [0, T-1].
        T: number of diffusion steps.
        s: cosine offset.
    """
    t64 = t.to(torch.float64)
    f = torch.cos((t64 / T + s) / (1 + s) * math.pi / 2) ** 2
    f0 = math.cos(s / (1 + s) * math.pi / 2) ** 2
    return f / f0


def ddim_grid(T: int, k: int, round_grid: bool = True) -> Tensor:
    """Return the K evenly spaced DDIM grid points in descending order, float64 (K,).

    tau_j = round(j (T-1)/(K-1)) (paper, ``round_grid=True``) or the code's unrounded
    ``linspace(0, T-1, K)``; the first is T-1 and the last 0.

    Raises:
        ConfigError: K < 2 (K = 1 holds only tau = 0 and returns noise) or, with rounding, K > T.

    Example:
        >>> ddim_grid(1000, 2).tolist()
        [999.0, 0.0]
    """
    if k < 2:
        raise ConfigError(f"ddim_steps={k} is not valid; LDSeg needs >= 2 grid points (K=1 holds only "
                          "tau=0 and returns noise)")
    if round_grid and k > T:
        raise ConfigError(f"ddim_steps={k} is not valid; with round_grid it must be <= T={T}")
    j = torch.arange(k, dtype=torch.float64)
    grid = j * (T - 1) / (k - 1)
    if round_grid:
        grid = torch.round(grid)
    return grid.flip(0)


def ddim_update(z: Tensor, eps_hat: Tensor, abar_t: float, abar_prev: float, eta: float = 0.0,
                noise: Tensor | None = None, x0: Tensor | None = None) -> Tensor:
    """One generalised DDIM step (Song et al. eq. 12) from abar_t to abar_prev; x0 is never clipped.

    x0 = (z - sqrt(1 - abar_t) eps_hat) / sqrt(abar_t);
    z' = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - s^2) eps_hat + s n,
    s = eta sqrt((1 - abar_prev)/(1 - abar_t) (1 - abar_t/abar_prev)).
    With abar_t = abar_prev = 1 (tau = 0) the step is the identity.

    Args:
        z: current latent (B, C_z, h, w).
        eps_hat: predicted noise, same shape.
        abar_t: abar at the current point (> 0).
        abar_prev: abar at the next (smaller) point, >= abar_t.
        eta: 0 = DDIM, 1 = DDPM-like.
        noise: N(0, I) draw of z's shape; required when s > 0.
        x0: the clean-latent estimate when the denoiser gives it directly (`prediction="v"`); None
            computes it from eps_hat as above.
    """
    one_m_t = 1.0 - abar_t
    one_m_p = 1.0 - abar_prev
    sigma = 0.0
    if eta > 0 and one_m_t > 0 and one_m_p > 0:
        sigma = eta * math.sqrt(one_m_p / one_m_t * (1.0 - abar_t / abar_prev))
    if x0 is None:
        x0 = (z - math.sqrt(max(one_m_t, 0.0)) * eps_hat) / math.sqrt(abar_t)
    out = math.sqrt(abar_prev) * x0 + math.sqrt(max(one_m_p - sigma**2, 0.0)) * eps_hat
    if sigma > 0:
        if noise is None:
            raise InputError("ddim_update: eta > 0 needs a noise tensor")
        out = out + sigma * noise
    return out


def v_target(z0: Tensor, eps: Tensor, abar: Tensor) -> Tensor:
    """Return the velocity v = sqrt(abar) eps - sqrt(1 - abar) z0 (Salimans & Ho 2022), z0's shape.

    Args:
        z0: clean latents (B, C, h, w).
        eps: the noise of z_t, same shape.
        abar: abar_t broadcastable to z0, e.g. (B, 1, 1, 1).
    """
    return abar.sqrt() * eps - (1 - abar).sqrt() * z0


def from_v(zt: Tensor, v: Tensor, abar: Tensor) -> tuple[Tensor, Tensor]:
    """Return (x0, eps) of z_t = sqrt(abar) x0 + sqrt(1 - abar) eps given its velocity v, each zt's shape.

    x0 = sqrt(abar) z_t - sqrt(1 - abar) v and eps = sqrt(1 - abar) z_t + sqrt(abar) v: no division by
    sqrt(abar), so x0 stays well conditioned at t = T-1 (abar_999 = 2.4e-6), where the eps form
    multiplies the denoiser's error by 1/sqrt(abar) = 642.
    """
    return abar.sqrt() * zt - (1 - abar).sqrt() * v, (1 - abar).sqrt() * zt + abar.sqrt() * v


def lr_decay_multiplier(step: int, steps_per_epoch: int, decay: float, floor: float = 0.0) -> float:
    """Return the exponential per-epoch decay factor max(decay ** floor(step / steps_per_epoch), floor).

    Args:
        step: optimiser steps done before the current one (0 for the first step).
        steps_per_epoch: optimiser steps per pass over the training samples (>= 1).
        decay: factor per epoch in (0, 1]; 1 = constant rate.
        floor: the factor never goes below this (0 = no floor).

    Example:
        >>> lr_decay_multiplier(0, 10, 0.5), lr_decay_multiplier(9, 10, 0.5), lr_decay_multiplier(25, 10, 0.5)
        (1.0, 1.0, 0.25)
        >>> lr_decay_multiplier(25, 10, 0.5, floor=0.3)
        0.3
    """
    return max(float(decay) ** (int(step) // max(int(steps_per_epoch), 1)), float(floor))


def renormalize(z: Tensor, mode: Literal["sample", "batch", "none"], eps: float = 1e-5) -> Tensor:
    """Standardise latents (B, C, h, w): (z - mean) / (std + eps) per sample, over the batch, or not.

    "batch" is the public code's `mean_variance_normalization` over the whole array (couples images).
    """
    if mode == "none":
        return z
    dims = (1, 2, 3) if mode == "sample" else tuple(range(z.ndim))
    mean = z.mean(dim=dims, keepdim=True)
    std = z.std(dim=dims, unbiased=False, keepdim=True)
    return (z - mean) / (std + eps)


def ldseg_dice(probs: Tensor, target: Tensor, mode: Literal["mean_fg", "code_global"] = "mean_fg",
               ignore_index: int = IGNORE, eps: float = 1e-6) -> Tensor:
    """Return the soft Dice of softmax probabilities (the loss uses ``1 - dice``).

    ``mean_fg`` [D]: per class c, 2 sum(p_c y_c) / (sum p_c + sum y_c + eps) summed over batch and
    pixels, averaged over the foreground classes (1..K-1) present in ``target``; 1 when none is
    present (the term then contributes no gradient). ``code_global`` [C:trainer.py]: one sum over
    batch, pixels and all classes incl. background; with softmax it equals the mean probability of
    the true class. Pixels labelled ``ignore_index`` are excluded.

    Args:
        probs: (B, K, H, W) probabilities summing to 1 over K.
        target: (B, H, W) int64 labels.
        mode: "mean_fg" | "code_global".
        ignore_index: unlabelled value.
        eps: denominator smoothing.
    """
    k = probs.shape[1]
    valid = (target != ignore_index).unsqueeze(1).to(probs.dtype)
    safe = torch.where(target == ignore_index, torch.zeros_like(target), target).clamp(0, k - 1)
    onehot = F.one_hot(safe, k).permute(0, 3, 1, 2).to(probs.dtype) * valid
    p = probs * valid
    if mode == "code_global":
        return 2 * (p * onehot).sum() / (p.sum() + onehot.sum() + eps)
    dims = (0, 2, 3)
    inter = (p * onehot).sum(dims)
    denom = p.sum(dims) + onehot.sum(dims)
    dice = 2 * inter / (denom + eps)
    present = onehot.sum(dims) > 0
    present[0] = k == 1
    if not bool(present.any()):
        return probs.sum() * 0.0 + 1.0
    return dice[present].mean()


# ---------------------------------------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True, kw_only=True)
class LDSegConfig(MethodConfig):
    """LDSeg config (METHODS Part 2 §5, §7, §8).

    Attributes:
        arch: network widths, `nets.ldseg.ldseg_preset` name ("tiny" | "small" | "paper").
        dropout: dropout of the encoders and the decoder (None = the arch preset's value).
        T: diffusion steps (cosine schedule, s = 0.008).
        gamma: weight of (1 - Dice).
        lam: weight of the latent MSE of the denoiser on its target (eps, or v with ``prediction="v"``).
        zdn_mode: "literal" z_dn = z_t - eps_hat (paper eq. 12 and code) | "x0" exact x0 estimate,
            renormalised per sample (ablation). Applies to ``prediction="eps"`` only.
        prediction: what the denoiser outputs and the latent MSE regresses: "eps" (paper) or "v", the
            velocity sqrt(abar) eps - sqrt(1 - abar) z0 (Salimans & Ho 2022). Not in the paper. With "v"
            the decoder gets z_dn = the x0 estimate sqrt(abar) z_t - sqrt(1 - abar) v_hat, standardised per
            sample as at inference, and the sampler takes x0 from v_hat directly: at t = T-1 it is then the
            denoiser's own estimate of z0 from the image, where the eps form reads z0 from the
            difference z_T - eps_hat, a residual of size sqrt(abar_999) = 0.0016 that the run's noise
            decides (issue 20: two runs of `small` disagree on more than half of the pixels).
        shared_noise: one eps map per batch (code) instead of per sample (paper).
        t_per_batch: one t per batch ([P] text) instead of per sample (code).
        dice_mode: "mean_fg" soft Dice over foreground classes [D] | "code_global" (code).
        label_input: "onehot" [D] | "index" (code: class id as one float channel).
        latent_affine: learnable element-wise affine after the label LayerNorm (code); breaks mu=0,
            sigma=1.
        decoder_bn: BatchNorm on the decoder logits (code).
        image_norm: "minmax" per-image min-max of the input (code) | "none".
        renorm: latent renormalisation at inference: "sample" [D] | "batch" (code) | "none".
        ddim_steps: K grid points (>= 2, <= T); 2 = {T-1, 0}.
        eta: DDIM eta (0 = deterministic given z_T).
        round_grid: round the grid to integers (paper) or keep the code's float points.
        call_at_zero: also run the (identity) denoiser call at tau = 0, as the code does (timing parity).
        ema: EMA decay of the denoiser, used at inference (None = off).
        ema_scope: what the EMA averages: "denoiser" (code) or "all", the image encoder, denoiser and
            decoder, with their BatchNorm statistics and timm's warm-up min(ema, (1 + n) / (10 + n)) at
            the n-th fold, as the U-Net's `ema`. Not in the paper or code: the code averages the denoiser
            only, and LDSeg's validation score swings by a factor of two between checks (issue 20).
        uncertainty: "sd" (max over foreground classes of the per-pixel SD of one-hot masks) | "entropy".
        uncertainty_samples: runs R of `predict_with_uncertainty` when `n_samples` is not given.
        mean_map: what `predict_proba` averages over its `n_samples` runs: "onehot" masks (paper) or
            "softmax" probabilities.
        sample_chunk: at most this many (image, run) pairs go through the decoder at once.
        latent_stride: label-latent stride s (4, 8 or 16): the latent is (H/s, W/s) and inputs must be
            multiples of 4 s. 16 = paper; a 1-channel latent at 1/16 holds one value per 16 x 16 block.
        lr_decay: learning-rate factor per epoch (lr * lr_decay ** epoch; 1 = constant, the code).
        lr_decay_floor: the decayed factor never goes below this (0 = none, the paper). The decay counts
            epochs, so a step budget far beyond the preset's epochs on a small data set would otherwise
            drive the rate to ~0 (MoNuSeg, 6 steps per epoch: x0.95 per epoch leaves 2e-4 of it at step 1000).
        label_downsampler: "encoder" (learned label encoder, paper) | "nearest" (Table V: the label map
            down-sampled by nearest neighbour and standardised per sample).
        image_downsampler: "encoder" (learned image encoder, paper) | "nearest" (Table V: the grey image
            down-sampled by nearest neighbour and standardised per sample) | "resnet18" / "resnet34"
            (not in the paper: a ResNet U-Net truncated at the latent scale, `ResNetImageEncoder`;
            inputs then need H, W divisible by 32 as well).
        class_weights: "none" (paper: plain CE) or "inverse_freq" (the CE term weighs each pixel by
            w_c = 1 / (K' f_c) of its class, from the running training pixel counts, clipped to
            ``class_weight_max``; a departure, issue 20). The Dice term is unchanged (it already
            averages over the foreground classes present).
        class_weight_max: upper clip of the class weights (>= 1).
        latent_channels: C_z, channels of the label latent z0 (1 = paper). Not in the paper: one scalar
            per s x s block has to order K classes along one axis, so a denoising error moves a pixel
            to a neighbouring class id; C_z > 1 gives each class room of its own (issue 20).
        image_latent_channels: C_i, channels of the image condition z_i (1 = paper). Not in the paper:
            with C_i = 1 the denoiser sees the image only through one scalar per block.
        grid_t_share: share p of the training draws of t taken from the sampler's own points instead of
            U{0..T-1} (0 = paper). Each draw is, with probability p, a point of the DDIM grid above 0
            (chosen uniformly among them; with K = 2 always T-1), else uniform. Not in the paper: at
            K = 2 inference runs the denoiser at t = T-1 only, where z_t is almost pure noise and the
            image condition alone carries the label, while uniform t puts about a fifth of the draws
            where abar_t < 0.1; most steps then train the label encoder and decoder as an
            autoencoder through z_t (issue 20).
        decoder_skips: the label decoder also receives the ResNet image encoder's features at the
            strides finer than the latent (1/2 and 1/4 at stride 8), concatenated before its blocks of
            that resolution. Not in the paper, whose decoder sees the denoised latent only: a one-channel
            latent at 1/s cannot carry nucleus outlines (issue 20). Needs ``image_downsampler`` "resnet18"
            or "resnet34". The class of a region can still come from the latent, but the decoder may also
            learn to read it from the image features; the spread of the runs (`predict_with_uncertainty`)
            shows how much the latent still decides.
        decoder_widths: the label decoder's 4 block widths, coarse to fine (None = the arch preset's,
            (32, 64, 64, 32), the code's; `small` sets (32, 64, 32, 16)). Not in the paper when set: at
            stride 8 the last two blocks run at 1/2 and 1/1 of the input, where 64 and 32 channels cost
            about half of a `small` training step on a CPU (a library U-Net decodes with 32 and 16 there).
    """

    arch: Literal["tiny", "small", "paper"] = "tiny"
    dropout: float | None = None
    T: int = 1000
    gamma: float = 2.0
    lam: float = 1.0
    zdn_mode: Literal["literal", "x0"] = "literal"
    prediction: Literal["eps", "v"] = "eps"
    shared_noise: bool = False
    t_per_batch: bool = False
    dice_mode: Literal["mean_fg", "code_global"] = "mean_fg"
    label_input: Literal["onehot", "index"] = "onehot"
    latent_affine: bool = False
    decoder_bn: bool = True
    image_norm: Literal["minmax", "none"] = "minmax"
    renorm: Literal["sample", "batch", "none"] = "sample"
    ddim_steps: int = 2
    eta: float = 0.0
    round_grid: bool = True
    call_at_zero: bool = False
    ema: float | None = None
    ema_scope: Literal["denoiser", "all"] = "denoiser"
    uncertainty: Literal["sd", "entropy"] = "sd"
    uncertainty_samples: int = 4
    mean_map: Literal["onehot", "softmax"] = "onehot"
    sample_chunk: int = 16
    latent_stride: Literal[4, 8, 16] = 16
    lr_decay: float = 1.0
    lr_decay_floor: float = 0.0
    label_downsampler: Literal["encoder", "nearest"] = "encoder"
    image_downsampler: Literal["encoder", "nearest", "resnet18", "resnet34"] = "encoder"
    class_weights: Literal["none", "inverse_freq"] = "none"
    class_weight_max: float = 100.0
    latent_channels: int = 1
    image_latent_channels: int = 1
    grid_t_share: float = 0.0
    decoder_skips: bool = False
    decoder_widths: tuple[int, int, int, int] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.dropout is not None:
            check_range("dropout", self.dropout, 0.0, 1.0)
        check_range("T", self.T, 2)
        check_range("gamma", self.gamma, 0.0)
        check_range("lam", self.lam, 0.0)
        check_range("ddim_steps", self.ddim_steps, 2, self.T)
        check_range("eta", self.eta, 0.0, 1.0)
        if self.ema is not None:
            check_range("ema", self.ema, 0.0, 1.0, lo_open=True)
            if self.ema >= 1.0:
                raise ConfigError(f"ema={self.ema} should be < 1 (or null to turn the EMA off)")
        check_range("uncertainty_samples", self.uncertainty_samples, 1)
        check_range("sample_chunk", self.sample_chunk, 1)
        check_range("lr_decay", self.lr_decay, 0.0, 1.0, lo_open=True)
        check_range("lr_decay_floor", self.lr_decay_floor, 0.0, 1.0)
        check_range("class_weight_max", self.class_weight_max, 1.0)
        check_range("latent_channels", self.latent_channels, 1)
        check_range("image_latent_channels", self.image_latent_channels, 1)
        check_range("grid_t_share", self.grid_t_share, 0.0, 1.0)
        for i, w in enumerate(self.decoder_widths or ()):
            check_range(f"decoder_widths[{i}]", w, 1)
        if self.decoder_skips and not self.image_downsampler.startswith("resnet"):
            raise ConfigError(f"decoder_skips=true needs image_downsampler 'resnet18' or 'resnet34', got "
                              f"{self.image_downsampler!r}")
        div = ldseg_size_divisor(self.latent_stride)
        if self.crop_px % div:
            raise ConfigError(f"crop_px={self.crop_px} should be divisible by {div} for LDSeg with "
                              f"latent_stride={self.latent_stride} "
                              f"({self.latent_stride}x down-sampling to the "
                              "latent, then 4x inside the denoiser)")


# ---------------------------------------------------------------------------------------------- method
#: training settings common to every preset
_SHARED_TRAINING: dict[str, Any] = {
    "batch_size": 4, "lr": 1e-3, "flips": True, "rot90": False, "grad_clip": None,
}


class LDSegSegmenter(ClassCounting, Segmenter):
    """LDSeg: label/image encoders, latent denoiser and label decoder trained jointly.

    Modules: ``label_encoder`` (training only), ``image_encoder``, ``denoiser`` (+ ``denoiser_ema``
    when `ema` is set), ``decoder`` (+ ``image_encoder_ema`` and ``decoder_ema`` with
    ``ema_scope="all"``). `inference_state_dict` holds the image encoder, the decoder and the denoiser
    used at inference (the EMA copies where there are).
    """

    name: ClassVar[str] = "ldseg"
    config_cls: ClassVar[type[MethodConfig]] = LDSegConfig
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        # METHODS Part 2 §7; flips only (code), no rot90, no gradient clipping (code).
        # lr_decay per epoch as METHODS Part 2 §7 (tiny none, small x0.95, paper x0.999 [D]); small floors
        # the factor at 0.1 (about where 30 epochs x0.95 and the paper's 2500 x0.999 end, 0.21 and 0.08).
        "tiny": {**_SHARED_TRAINING, "arch": "tiny", "crop_px": 64, "steps": 3, "val_every": 0,
                 "ckpt_every": 50, "ema": None, "dropout": 0.0, "uncertainty_samples": 4},
        # small departs from the paper in its image encoder and latent stride (ResNet-18 U-Net encoder,
        # stride 8): chosen on CoNSeP and GlaS validation at 30 minutes against the paper's encoder at
        # strides 16 and 8 (docs/results.md, 2026-12-07 seventeenth run; docs/methods.md), and in its
        # decoder's skips from that encoder: CoNSeP validation, 30 minutes, two seeds (twenty-first run),
        # and in its denoiser's target (v, not eps), its whole-model average (ema_scope) and a 16-channel
        # image condition z_i: the same test (twenty-second run), and in its narrower label decoder at 1/2
        # and 1/1 (32 and 16 channels, twice the steps in the same minutes): the same test (twenty-third run)
        "small": {**_SHARED_TRAINING, "precision": "auto", "arch": "small", "crop_px": 256, "steps": 660,
                  "epochs": 30, "val_every": 66, "ckpt_every": 66, "ema": 0.99, "dropout": 0.2,
                  "uncertainty_samples": 10, "lr_decay": 0.95, "lr_decay_floor": 0.1,
                  "image_downsampler": "resnet18", "latent_stride": 8, "decoder_skips": True,
                  "prediction": "v", "ema_scope": "all", "image_latent_channels": 16,
                  "decoder_widths": (32, 64, 32, 16), **STAIN_AUGMENTATION},
        "paper": {**_SHARED_TRAINING, "precision": "auto", "arch": "paper", "crop_px": 512, "steps": 53000,
                  "epochs": 2500, "val_every": 2120, "ckpt_every": 2120, "ema": 0.999, "dropout": 0.2,
                  "uncertainty_samples": 100, "lr_decay": 0.999, **STAIN_AUGMENTATION},
    }

    def __init__(self, cfg: MethodConfig, num_classes: int, in_channels: int = 3,
                 class_names: Sequence[str] | None = None) -> None:
        super().__init__(cfg, num_classes, in_channels, class_names)
        if not isinstance(cfg, LDSegConfig):  # pragma: no cover - checked by the base class
            raise ConfigError("LDSegSegmenter needs an LDSegConfig")
        latent = cfg.crop_px // cfg.latent_stride
        widths = ldseg_preset(cfg.arch)
        if cfg.decoder_widths is not None:
            widths["decoder_widths"] = tuple(cfg.decoder_widths)
        nets = build_ldseg_nets(widths, num_classes, in_channels, label_input=cfg.label_input,
                                latent_affine=cfg.latent_affine, latent_hw=(latent, latent),
                                dropout=cfg.dropout, decoder_bn=cfg.decoder_bn,
                                latent_stride=cfg.latent_stride, label_downsampler=cfg.label_downsampler,
                                image_downsampler=cfg.image_downsampler,
                                latent_channels=cfg.latent_channels,
                                image_latent_channels=cfg.image_latent_channels,
                                decoder_skips=cfg.decoder_skips)
        self.label_encoder = nets["label_encoder"]
        self.image_encoder = nets["image_encoder"]
        self.denoiser = nets["denoiser"]
        self.decoder = nets["decoder"]
        # 4 s, or the image encoder's own multiple when larger (32 for the ResNet encoders)
        encoder_divisor = getattr(self.image_encoder, "divisor", 1)
        self.size_divisor = max(ldseg_size_divisor(cfg.latent_stride), encoder_divisor)
        self.denoiser_ema: nn.Module | None = None
        self.image_encoder_ema: nn.Module | None = None
        self.decoder_ema: nn.Module | None = None
        if cfg.ema is not None:
            self.denoiser_ema = copy.deepcopy(self.denoiser).requires_grad_(False)
            if cfg.ema_scope == "all":
                self.image_encoder_ema = copy.deepcopy(self.image_encoder).requires_grad_(False)
                self.decoder_ema = copy.deepcopy(self.decoder).requires_grad_(False)
        # folds done so far, for the warm-up (only with ema_scope="all": older run folders lack it)
        self.register_buffer("ema_updates", torch.zeros((), dtype=torch.int64)
                             if self.decoder_ema is not None else None)
        # 1 when an optimiser step has run since the EMA was last updated (part of train_state.pt).
        self.register_buffer("ema_pending", torch.zeros((), dtype=torch.int64))
        self.register_buffer("alphas_cumprod", cosine_alpha_bar(torch.arange(cfg.T), cfg.T), persistent=False)
        # the DDIM grid points above 0, where the sampler calls the denoiser (`grid_t_share`)
        self.grid_t = ddim_grid(cfg.T, cfg.ddim_steps, cfg.round_grid)[:-1].round().long()
        # running training pixel counts per class (class_weights; None = off); train_state.pt only
        self.init_class_counts(cfg.class_weights == "inverse_freq")

    @property
    def lcfg(self) -> LDSegConfig:
        """The config, typed."""
        assert isinstance(self.cfg, LDSegConfig)
        return self.cfg

    # ------------------------------------------------------------------ helpers
    def preprocess(self, images: Tensor) -> Tensor:
        """Check (B, C_in, H, W) with H, W divisible by 4 s and apply the per-image min-max (`image_norm`)."""
        check_ldseg_input(images, "ldseg", self.in_channels, self.size_divisor)
        x = images.float()
        if self.lcfg.image_norm == "minmax":
            lo = x.amin(dim=(1, 2, 3), keepdim=True)
            hi = x.amax(dim=(1, 2, 3), keepdim=True)
            x = (x - lo) / (hi - lo).clamp_min(1e-6)
        return x

    def encode_image(self, x: Tensor, encoder: nn.Module | None = None,
                     ) -> tuple[Tensor, dict[int, Tensor] | None]:
        """Return z_i (B, C_i, h, w) of preprocessed images and, with `decoder_skips`, the decoder's image
        features {stride: (B, C, H/stride, W/stride)} (else None).

        Args:
            x: preprocessed images (B, C_in, H, W).
            encoder: the image encoder to run (None: the trained one; inference passes
                `inference_image_encoder`).
        """
        enc = self.image_encoder if encoder is None else encoder
        if not self.lcfg.decoder_skips:
            return enc(x), None
        return enc(x, return_skips=True)

    def inference_denoiser(self) -> nn.Module:
        """Return the denoiser used at inference (the EMA copy when `ema` is on)."""
        self._sync_ema()
        return self.denoiser_ema if self.denoiser_ema is not None else self.denoiser

    def inference_image_encoder(self) -> nn.Module:
        """Return the image encoder used at inference (the EMA copy with ``ema_scope="all"``)."""
        self._sync_ema()
        return self.image_encoder_ema if self.image_encoder_ema is not None else self.image_encoder

    def inference_decoder(self) -> nn.Module:
        """Return the label decoder used at inference (the EMA copy with ``ema_scope="all"``)."""
        self._sync_ema()
        return self.decoder_ema if self.decoder_ema is not None else self.decoder

    def ema_decay(self) -> float:
        """Return the decay of the next fold: `ema`, or with ``ema_scope="all"`` its warmed-up value."""
        ema = self.lcfg.ema
        assert ema is not None
        return ema if self.ema_updates is None else warmup_ema_decay(ema, int(self.ema_updates))

    @torch.no_grad()
    def _sync_ema(self) -> None:
        """Fold the weights of the last optimiser step into the EMA (once per step)."""
        if self.denoiser_ema is None or int(self.ema_pending) == 0:
            return
        decay = self.ema_decay()
        if self.image_encoder_ema is not None and self.decoder_ema is not None:
            fold_ema(self.denoiser_ema, self.denoiser, decay, average_buffers=True)
            fold_ema(self.image_encoder_ema, self.image_encoder, decay, average_buffers=True)
            fold_ema(self.decoder_ema, self.decoder, decay, average_buffers=True)
        else:
            fold_ema(self.denoiser_ema, self.denoiser, decay)
        if self.ema_updates is not None:
            self.ema_updates += 1
        self.ema_pending.zero_()

    def _abar(self, t: Tensor) -> Tensor:
        return self.alphas_cumprod.to(t.device)[t]

    # ------------------------------------------------------------------ training
    def lr_multiplier(self, stage: str, step: int, steps_per_epoch: int) -> float:
        """Return the factor on `lr` for the optimiser step after `step` steps (per-epoch exponential decay).

        Called by `train.loop.fit` before every step; a pure function of the step, so a resumed run
        gets the same rates as an uninterrupted one.
        """
        return lr_decay_multiplier(step, steps_per_epoch, self.lcfg.lr_decay, self.lcfg.lr_decay_floor)

    def draw_t(self, n: int, generator: torch.Generator) -> Tensor:
        """Return n training steps t (n,) int64 on the generator's device.

        Uniform in {0..T-1} (paper); with ``grid_t_share`` = p > 0 each draw is replaced, with probability p,
        by a DDIM grid point above 0 chosen uniformly (the points where the sampler calls the denoiser).
        With p = 0 no extra number is drawn, so the paper's random stream is unchanged.
        """
        cfg = self.lcfg
        gdev = generator.device
        t = torch.randint(0, cfg.T, (n,), generator=generator, device=gdev)
        if cfg.grid_t_share > 0:
            points = self.grid_t.to(gdev)
            use_grid = torch.rand((n,), generator=generator, device=gdev) < cfg.grid_t_share
            which = torch.randint(0, len(points), (n,), generator=generator, device=gdev)
            t = torch.where(use_grid, points[which], t)
        return t

    def forward_train(self, images: Tensor, labels: Tensor, generator: torch.Generator) -> dict[str, Tensor]:
        """Run the training forward pass; return every intermediate tensor (for tests and losses).

        Returns:
            Dict with "z0", "eps", "zt", "eps_hat", "zdn" (B, C_z, H/s, W/s), "pred" (the denoiser's
            output) and "target" (what it regresses: eps, or v with ``prediction="v"``), same shape,
            "zi" (B, C_i, H/s, W/s), "t" (B,) and "logits" (B, K, H, W).
        """
        cfg = self.lcfg
        x = self.preprocess(images)
        zi, skips = self.encode_image(x)
        z0 = self.label_encoder(labels)
        b = z0.shape[0]
        gdev = generator.device
        n_t = 1 if cfg.t_per_batch else b
        t = self.draw_t(n_t, generator).to(z0.device).expand(b)
        eps_shape = (1, *z0.shape[1:]) if cfg.shared_noise else tuple(z0.shape)
        eps = torch.randn(eps_shape, generator=generator, device=gdev).to(z0.device, z0.dtype).expand_as(z0)
        ab = self._abar(t).to(z0.dtype).view(b, 1, 1, 1)
        zt = ab.sqrt() * z0 + (1 - ab).sqrt() * eps
        pred = self.denoiser(torch.cat([zt, zi], dim=1), t)
        if cfg.prediction == "v":
            target = v_target(z0, eps, ab)
            x0_hat, eps_hat = from_v(zt, pred, ab)
            zdn = renormalize(x0_hat, "sample")
        else:
            target, eps_hat = eps, pred
            if cfg.zdn_mode == "literal":
                zdn = zt - eps_hat  # [P eq. 12]
            else:
                zdn = renormalize((zt - (1 - ab).sqrt() * eps_hat) / ab.sqrt(), "sample")
        logits = self.decoder(zdn, skips)
        return {"z0": z0, "zi": zi, "t": t, "eps": eps, "zt": zt, "eps_hat": eps_hat, "zdn": zdn,
                "pred": pred, "target": target, "logits": logits}

    def training_step(self, batch: dict[str, Any], generator: torch.Generator,
                      stage: str) -> dict[str, Tensor]:
        """Return {"model": CE + gamma (1 - Dice) + lambda MSE, "log/ce", "log/dice", "log/mse"}.

        MSE is the denoiser's error on its target: eps (paper) or v (``prediction="v"``).

        With ``class_weights="inverse_freq"`` the batch's labels are added to `class_counts` first and
        the CE is weighted by `class_weight_vector` (torch's weighted mean: sum w_y CE / sum w_y).
        """
        cfg = self.lcfg
        self._sync_ema()
        labels = batch["label"]
        self.update_class_counts(labels, IGNORE)
        weights = self.class_weight_vector()
        out = self.forward_train(batch["image"], labels, generator)
        logits = out["logits"].float()
        if bool((labels != IGNORE).any()):
            ce = F.cross_entropy(logits, labels, ignore_index=IGNORE, weight=weights)
        else:
            ce = logits.sum() * 0.0
        dice = ldseg_dice(torch.softmax(logits, dim=1), labels, cfg.dice_mode)
        mse = F.mse_loss(out["pred"].float(), out["target"].float())
        loss = ce + cfg.gamma * (1.0 - dice) + cfg.lam * mse
        if self.denoiser_ema is not None:
            self.ema_pending.fill_(1)
        return {"model": loss, "log/ce": ce.detach(), "log/dice": dice.detach(), "log/mse": mse.detach()}

    def validation_score(self, batches: Iterable[dict[str, Any]], generator: torch.Generator,
                         stage: str) -> float:
        """Mean foreground Dice of the sampled masks on the validation set (EMA denoiser)."""
        self._sync_ema()
        return super().validation_score(batches, generator, stage)

    def on_stage_end(self, stage: str, train_batches: Iterable[dict[str, Any]]) -> None:
        """Fold the last optimiser step into the EMA."""
        self._sync_ema()

    # ------------------------------------------------------------------ run folder
    def inference_state_dict(self) -> dict[str, Tensor]:
        """Return the image encoder, decoder and denoiser weights used at inference (label encoder excluded):
        the EMA copies where `ema` (and `ema_scope`) average them."""
        self._sync_ema()
        den = "denoiser_ema." if self.denoiser_ema is not None else "denoiser."
        enc = "image_encoder_ema." if self.image_encoder_ema is not None else "image_encoder."
        dec = "decoder_ema." if self.decoder_ema is not None else "decoder."
        keep = (enc, dec, den)
        return {k: v for k, v in self.state_dict().items() if k.startswith(keep)}

    # ------------------------------------------------------------------ inference
    def _run_seeds(self, batch: int, generator: torch.Generator | None) -> list[int]:
        g = generator if generator is not None else make_generator(self.lcfg.seed)
        return [int(torch.randint(0, 2**62, (1,), generator=g, device=g.device).item()) for _ in range(batch)]

    @torch.no_grad()
    def sample_logits(self, zi: Tensor, seeds: Sequence[int],
                      skips: dict[int, Tensor] | None = None) -> Tensor:
        """Run the DDIM sampler from z_T for each latent condition and decode.

        Args:
            zi: image embeddings (N, C_i, h, w).
            seeds: one seed per row of ``zi``; row n draws z_T (and eta noise) from its own generator.
            skips: the decoder's image features of the same rows (`decoder_skips`), else None.

        Returns:
            Logits (N, K, s h, s w) for the latent stride s.
        """
        cfg = self.lcfg
        den = self.inference_denoiser()
        gens = [make_generator(s) for s in seeds]
        shape = (1, cfg.latent_channels, *zi.shape[2:])

        def draw() -> Tensor:
            return torch.cat([torch.randn(shape, generator=g) for g in gens]).to(zi.device, zi.dtype)

        z = renormalize(draw(), cfg.renorm)
        grid = ddim_grid(cfg.T, cfg.ddim_steps, cfg.round_grid).tolist()
        n = zi.shape[0]
        for tau, tau_prev in itertools.pairwise(grid):
            t = torch.full((n,), tau, device=zi.device)
            pred = den(torch.cat([z, zi], dim=1), t)
            ab_t = float(cosine_alpha_bar(torch.tensor(tau), cfg.T))
            ab_p = float(cosine_alpha_bar(torch.tensor(tau_prev), cfg.T))
            x0 = None
            if cfg.prediction == "v":
                x0, eps_hat = from_v(z, pred, torch.tensor(ab_t, dtype=z.dtype))
            else:
                eps_hat = pred
            noise = draw() if cfg.eta > 0 else None
            z = renormalize(ddim_update(z, eps_hat, ab_t, ab_p, cfg.eta, noise, x0), cfg.renorm)
        if cfg.call_at_zero:  # the code's extra call at tau_0 = 0: abar = 1, identity update (either form)
            eps_hat = den(torch.cat([z, zi], dim=1), torch.zeros(n, device=zi.device))
            z = renormalize(ddim_update(z, eps_hat, 1.0, 1.0), cfg.renorm)
        return self.inference_decoder()(z, skips).float()

    @torch.no_grad()
    def _runs(self, images: Tensor, generator: torch.Generator | None, n_samples: int,
              ) -> tuple[Tensor, Tensor]:
        """Return (mean of one-hot masks, mean of softmax maps), each (B, K, H, W), over n_samples runs."""
        cfg = self.lcfg
        zi, skips = self.encode_image(self.preprocess(images), self.inference_image_encoder())
        b = zi.shape[0]
        base = self._run_seeds(b, generator)
        pairs = [(i, s) for i in range(b) for s in range(n_samples)]
        if cfg.renorm == "batch":  # whole-array statistics: all pairs must go through together
            chunks = [pairs]
        else:
            chunks = [pairs[j:j + cfg.sample_chunk] for j in range(0, len(pairs), cfg.sample_chunk)]
        k = self.num_classes
        h, w = images.shape[-2:]
        onehot_sum = torch.zeros(b, k, h, w, device=images.device)
        soft_sum = torch.zeros(b, k, h, w, device=images.device)
        for chunk in chunks:
            idx = torch.tensor([i for i, _ in chunk], device=zi.device)
            rows = None if skips is None else {st: f[idx] for st, f in skips.items()}
            logits = self.sample_logits(zi[idx], [derive_seed(base[i], s) for i, s in chunk], rows)
            probs = torch.softmax(logits, dim=1)
            onehot = F.one_hot(probs.argmax(1), k).permute(0, 3, 1, 2).to(probs.dtype)
            onehot_sum.index_add_(0, idx, onehot)
            soft_sum.index_add_(0, idx, probs)
        return onehot_sum / n_samples, soft_sum / n_samples

    @inference_autocast
    def predict_proba(self, images: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """Return (B, K, H, W) probabilities: the mean over `n_samples` runs of one-hot masks (paper) or of
        softmax maps (`mean_map="softmax"`).

        Args:
            images: (B, C_in, H, W) float32 in [0, 1], H, W divisible by 64.
            generator: source of the per-image seeds (None: a generator seeded with `cfg.seed`).
        """
        onehot, soft = self._runs(images, generator, self.lcfg.n_samples)
        return onehot if self.lcfg.mean_map == "onehot" else soft

    @inference_autocast
    def predict_with_uncertainty(self, images: Tensor, *, generator: torch.Generator | None = None,
                                 n_samples: int | None = None) -> tuple[Tensor, Tensor]:
        """Return (mean of one-hot masks (B, K, H, W), uncertainty (B, H, W)) over S runs.

        ``uncertainty="sd"``: per-pixel SD over runs of each foreground one-hot channel
        (sqrt(m (1 - m)) for the run frequency m), maximum over foreground classes; 0 where all runs
        agree, hence 0 everywhere for S = 1. ``"entropy"``: entropy of the mean map / log K, in [0, 1].

        Args:
            images: (B, C_in, H, W) float32 in [0, 1].
            generator: source of the per-image seeds.
            n_samples: S (default `uncertainty_samples`).
        """
        s = int(n_samples if n_samples is not None else self.lcfg.uncertainty_samples)
        if s < 1:
            raise InputError(f"n_samples={s} should be >= 1")
        mean, _ = self._runs(images, generator, s)
        if self.lcfg.uncertainty == "sd":
            fg = mean[:, 1:] if mean.shape[1] > 1 else mean
            unc = torch.sqrt((fg * (1 - fg)).clamp_min(0)).amax(dim=1)
        else:
            ent = -(mean * torch.log(mean.clamp_min(1e-12))).sum(1)
            unc = ent / max(math.log(mean.shape[1]), 1e-12)
        return mean, unc
