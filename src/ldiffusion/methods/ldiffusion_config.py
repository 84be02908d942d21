"""L-Diffusion config (`LDiffusionConfig`) and its presets ``tiny`` / ``small`` / ``paper``.

METHODS.md Part 1 §8 (keys) and §9 (presets); every [I]/[D] choice and every departure is listed with its
key in ``docs/methods.md``. `ldiffusion.methods.ldiffusion` re-exports `LDiffusionConfig`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from ldiffusion.core.config import check_range
from ldiffusion.core.errors import ConfigError
from ldiffusion.methods import base as _base
from ldiffusion.methods.base import MethodConfig
from ldiffusion.methods.ldiffusion_features import feature_timesteps

__all__ = ["LDIFFUSION_PRESETS", "LDiffusionConfig"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class LDiffusionConfig(MethodConfig):
    """L-Diffusion config (METHODS.md Part 1 §8 keys).

    Note: ``steps`` is the number T of reverse steps / feature maps (the paper's ablation key), NOT an
    optimiser step count; the stages have ``ae_steps``, ``diffusion_steps`` and ``seg_steps``. ``lr`` and
    ``batch_size`` (from `MethodConfig`) are those of the segmenter stage; ``epochs`` is unused
    (use ``ae_epochs``, ``diffusion_epochs``, ``seg_epochs``).

    Attributes:
        ae: autoencoder: preset name of `nets.autoencoder_preset` ("tiny", "small") or
            ``"sd_vae:<folder>"`` (a local diffusers AutoencoderKL, frozen, stage 0 skipped).
        autoencoder: run folder of a trained ``autoencoder`` method (stage 0 skipped; its ``ae`` preset must
            equal ``ae``).
        ae_steps, ae_epochs, ae_lr, ae_batch_size: stage 0 optimisation.
        unet: `nets.unet_preset` name of the ε-predictor.
        unet_init: "random" or "pretrained:<file.safetensors>" (TimeUNet state dict, keys optionally "unet.").
        train_timesteps: T_train of the scaled-linear schedule (βs scaled by 1000 / T_train).
        beta_start, beta_end: base scaled-linear end points (SD-1.5: 0.00085, 0.012).
        t_train_max: the denoiser's training timesteps are drawn from U{1..t_train_max} (1-based); None =
            ``t_start`` (the steps the chain visits). ``train_timesteps`` gives the paper's U{1..T_train}.
        t_full_share: share of the draws taken from the full range U{1..T_train} instead (0 = none).
        noise: forward / reverse noise family (Table 4-5 ablation).
        noise_scale_convention: Laplace scale: "unit_variance" (b = 1/√2) or "unit_scale" (b = 1, the code).
        student_nu: Student's t degrees of freedom (> 2, rescaled to unit variance).
        noise_clip: clamp Cauchy draws to [-clip, clip] (None = no clipping; MSE may explode).
        contrastive: add L_CRT in stage 1 (Table 4 ablation).
        crt_weight: λ. crt_k: K pixels per class per tile. crt_tau: τ. crt_sim: similarity.
        crt_warmup_steps: L_CRT weight 0 (and L_CRT not computed) until the denoiser has trained this many
            stage-1 steps; then the weight ramps linearly to λ over ``crt_ramp_steps`` steps.
        crt_ramp_steps: length of that ramp (None = ``crt_warmup_steps``; 0 = a step to λ).
        crt_resolution: R_crt, side the feature stack is resized to before sampling (labels nearest).
        crt_backprop: "full" | "checkpoint" (activation checkpointing, same gradients) | "last_k".
        crt_last_k: steps that carry gradients with ``crt_backprop="last_k"``.
        crt_every: compute L_CRT every this many stage-1 steps.
        diffusion_steps, diffusion_epochs, diffusion_lr, diffusion_batch_size: stage 1 optimisation.
        steps: T, reverse steps = feature maps per pixel vector.
        t_start: τ_1, first timestep of the chain (1-based; default T_train / 2).
        eta: DDIM η of the reverse steps (1 = re-spaced DDPM with same-family noise).
        feature_mode: "chain" (T successive steps) or "independent" (T one-step denoisings).
        decode_target: decode "latent" x_{τ_{k+1}} or "x0" (x̂0) after each step.
        feature_channels: what each decoded step adds to the stack: "grey" (1 map, the paper), "rgb"
            (3 maps) or "grey+rgb" (4 maps); the stack has T x 1, 3 or 4 channels.
        feature_draws: stacks of this many noise draws are averaged into one feature stack.
        feature_norm: "tile" (GroupNorm statistics and self-attention over the whole tile, as trained) or
            "fixed" (context-independent: GroupNorm statistics of the AE and U-Net calibrated on training
            crops after stage 1, one set per chain step; self-attention in windows of the training crop;
            per-pixel LayerNorm in the segmenter's FPN head).
        norm_calibration_batches: training batches used for that calibration.
        component_schedule: "shared" (N = 1), "per_class" (per-class γ at training; base schedule at
            inference) or "per_class_iterative" (per-class γ at training; at inference the chain runs with
            the base schedule, the segmenter predicts, then the chain runs again with each location's
            predicted class schedule, ``per_class_iterations`` times).
        per_class_iterations: K, the re-runs of ``per_class_iterative``.
        per_class_seg_share: ``per_class_iterative`` stage 2: share of training tiles whose chain uses
            their training labels' class schedules (the rest the base schedule), so the segmenter learns
            both the first pass and the re-runs.
        component_gamma: explicit γ_n per class (default: spread over [0.8, 1.2] by pixel-frequency rank).
        seg: `nets.convnext_preset` name of the segmenter. seg_mode: "dense" (ConvNeXt + FPN) or "pixel".
        seg_loss: "dice" or "dice+ce". seg_inputs: "grey" (paper) or "grey+rgb" (= ``seg_with_image``).
        seg_with_image: give the segmenter the image (3 channels) beside the feature stack (a departure;
            on in ``small``).
        seg_trajectory: False replaces the feature stack by zeros without running the chain (an
            ablation control: the same segmenter sees only the image; needs ``seg_with_image``).
        seg_head_stride: output stride of the FPN head (1, 2 or 4); None = the segmenter's stem stride
            (4 in the small / paper segmenters, 2 in tiny); ``small`` sets 1. Finer strides add upsampling
            stages with a skip from the input stack.
        seg_steps, seg_epochs: stage 2 optimisation (lr / batch_size: the `MethodConfig` fields).
        ae_max_minutes, diffusion_max_minutes, seg_max_minutes: wall-clock budget of each stage in minutes;
            None = the run's per-stage budget (``--max-minutes``), which a set value replaces for that stage.
            They split a total budget unevenly across the stages (e.g. 5 / 5 / 20 for 30 minutes).
        feature_cache: folder for cached stage-2 feature stacks (None = recompute every step).
    """

    preset: str = "tiny"
    crop_px: int = 64
    batch_size: int = 4
    lr: float = 1e-3
    # stage 0
    ae: str = "tiny"
    autoencoder: str | None = None
    ae_steps: int = 100
    ae_epochs: int | None = None
    ae_lr: float = 2e-3
    ae_batch_size: int = 4
    # diffusion
    unet: str = "tiny"
    unet_init: str = "random"
    train_timesteps: int = 100
    beta_start: float = 0.00085
    beta_end: float = 0.012
    t_train_max: int | None = None
    t_full_share: float = 0.0
    noise: Literal["laplace", "gaussian", "cauchy", "student_t"] = "laplace"
    noise_scale_convention: Literal["unit_variance", "unit_scale"] = "unit_variance"
    student_nu: float = 3.0
    noise_clip: float | None = None
    contrastive: bool = True
    crt_weight: float = 1.0
    crt_k: int = 8
    crt_tau: float = 0.07
    crt_sim: Literal["cosine", "dot", "neg_sq_euclid"] = "cosine"
    crt_warmup_steps: int = 0
    crt_ramp_steps: int | None = None
    crt_resolution: int = 64
    crt_backprop: Literal["full", "checkpoint", "last_k"] = "checkpoint"
    crt_last_k: int = 1
    crt_every: int = 1
    diffusion_steps: int = 40
    diffusion_epochs: int | None = None
    diffusion_lr: float = 1e-4
    diffusion_batch_size: int = 2
    # features
    steps: int = 3
    t_start: int = 20
    eta: float = 1.0
    feature_mode: Literal["chain", "independent"] = "chain"
    decode_target: Literal["latent", "x0"] = "latent"
    feature_channels: Literal["grey", "rgb", "grey+rgb"] = "grey"
    feature_draws: int = 1
    feature_norm: Literal["tile", "fixed"] = "tile"
    norm_calibration_batches: int = 8
    component_schedule: Literal["shared", "per_class", "per_class_iterative"] = "shared"
    per_class_iterations: int = 1
    per_class_seg_share: float = 0.5
    component_gamma: tuple[float, ...] | None = None
    # segmenter
    seg: str = "tiny"
    seg_mode: Literal["dense", "pixel"] = "dense"
    seg_loss: Literal["dice", "dice+ce"] = "dice+ce"
    seg_inputs: Literal["grey", "grey+rgb"] = "grey"
    seg_with_image: bool = False
    seg_trajectory: bool = True
    seg_head_stride: int | None = None
    seg_steps: int = 150
    seg_epochs: int | None = None
    ae_max_minutes: float | None = None
    diffusion_max_minutes: float | None = None
    seg_max_minutes: float | None = None
    feature_cache: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in (
            "ae_steps",
            "ae_batch_size",
            "diffusion_steps",
            "diffusion_batch_size",
            "seg_steps",
            "crt_k",
            "crt_resolution",
            "crt_last_k",
            "crt_every",
            "feature_draws",
            "train_timesteps",
            "norm_calibration_batches",
            "per_class_iterations",
        ):
            check_range(key, getattr(self, key), 1)
        for key in ("ae_epochs", "diffusion_epochs", "seg_epochs"):
            if getattr(self, key) is not None:
                check_range(key, getattr(self, key), 1)
        for key in ("ae_max_minutes", "diffusion_max_minutes", "seg_max_minutes"):
            if getattr(self, key) is not None:
                check_range(key, getattr(self, key), 0.0, lo_open=True)
        for key in ("ae_lr", "diffusion_lr", "crt_tau"):
            check_range(key, getattr(self, key), 0.0, lo_open=True)
        check_range("crt_weight", self.crt_weight, 0.0)
        check_range("crt_warmup_steps", self.crt_warmup_steps, 0)
        if self.crt_ramp_steps is not None:
            check_range("crt_ramp_steps", self.crt_ramp_steps, 0)
        check_range("eta", self.eta, 0.0)
        check_range("t_full_share", self.t_full_share, 0.0, 1.0)
        check_range("per_class_seg_share", self.per_class_seg_share, 0.0, 1.0)
        check_range("beta_start", self.beta_start, 0.0, 1.0, lo_open=True)
        check_range("beta_end", self.beta_end, self.beta_start, 1.0)
        if self.student_nu <= 2:
            raise ConfigError(
                f"student_nu={self.student_nu} is not valid; need nu > 2 (unit-variance rescaling)"
            )
        if self.noise_clip is not None:
            check_range("noise_clip", self.noise_clip, 0.0, lo_open=True)
        feature_timesteps(self.steps, self.t_start, self.train_timesteps)  # raises ConfigError when invalid
        if self.t_train_max is not None and not self.t_start <= self.t_train_max <= self.train_timesteps:
            raise ConfigError(
                f"t_train_max={self.t_train_max} is out of range; expected t_start={self.t_start} <= "
                f"t_train_max <= train_timesteps={self.train_timesteps} (None = t_start)"
            )
        if not self.seg_trajectory and not self.with_image:
            raise ConfigError("seg_trajectory=false leaves the segmenter no input; set seg_with_image=true "
                              "(the ablation control: the image only)")
        if self.seg_head_stride is not None and self.seg_head_stride not in (1, 2, 4):
            raise ConfigError(
                f"seg_head_stride={self.seg_head_stride!r} is not valid; choose 1, 2, 4 or None "
                "(None = the segmenter's stem stride)"
            )
        if not (self.ae in ("tiny", "small") or self.ae.startswith("sd_vae")):
            raise ConfigError(f"ae={self.ae!r} is not valid; choose 'tiny', 'small' or 'sd_vae:<folder>'")
        if self.ae == "sd_vae" or self.ae == "sd_vae:":
            raise ConfigError(
                "ae='sd_vae' needs the folder of a diffusers AutoencoderKL: "
                "--set ae=sd_vae:/path/to/stable-diffusion-v1-5/vae"
            )
        if self.ae.startswith("sd_vae") and self.autoencoder is not None:
            raise ConfigError("give either ae=sd_vae:<folder> or autoencoder=<run>, not both")
        if not (self.unet_init == "random" or self.unet_init.startswith("pretrained:")):
            raise ConfigError(
                f"unet_init={self.unet_init!r} is not valid; use 'random' or 'pretrained:<file.safetensors>'"
            )
        if self.component_gamma is not None and (
            not self.component_gamma or any(g <= 0 for g in self.component_gamma)
        ):
            raise ConfigError(
                f"component_gamma={list(self.component_gamma)} should be positive numbers, one per class"
            )

    # ------------------------------------------------------------------ derived values
    @property
    def t_train_high(self) -> int:
        """Return the upper end (1-based, inclusive) of the denoiser's training timesteps."""
        return self.t_start if self.t_train_max is None else self.t_train_max

    @property
    def with_image(self) -> bool:
        """Return True when the segmenter also sees the image (``seg_with_image`` or ``seg_inputs``)."""
        return self.seg_with_image or self.seg_inputs == "grey+rgb"

    @property
    def maps_per_step(self) -> int:
        """Return the feature maps one decoded step adds: 1 (grey), 3 (rgb) or 4 (grey+rgb)."""
        return {"grey": 1, "rgb": 3, "grey+rgb": 4}[self.feature_channels]

    def crt_weight_at(self, trained_steps: int) -> float:
        """Return the L_CRT weight after `trained_steps` stage-1 steps (warm-up, then a linear ramp to λ)."""
        warm = self.crt_warmup_steps
        ramp = warm if self.crt_ramp_steps is None else self.crt_ramp_steps
        if trained_steps < warm:
            return 0.0
        if ramp == 0:
            return self.crt_weight
        return self.crt_weight * min(1.0, (trained_steps - warm + 1) / ramp)


_TINY: dict[str, Any] = {
    "crop_px": 64,
    "batch_size": 4,
    "lr": 2e-3,
    "ae": "tiny",
    "ae_steps": 100,
    "ae_lr": 2e-3,
    "ae_batch_size": 4,
    "unet": "tiny",
    "train_timesteps": 100,
    "t_train_max": 100,  # U{1..T_train}, as before issue 19 (the e2e bar was measured so)
    "steps": 3,
    "t_start": 20,
    "eta": 1.0,
    "crt_k": 8,
    "crt_tau": 0.07,
    "crt_weight": 1.0,
    "crt_resolution": 64,
    "crt_backprop": "full",
    "diffusion_lr": 1e-4,
    "diffusion_batch_size": 2,
    "diffusion_steps": 30,
    "seg": "tiny",
    "seg_steps": 150,
    "val_every": 50,
    "ckpt_every": 50,
}
_SMALL: dict[str, Any] = {
    "precision": "auto",
    "crop_px": 128,
    "batch_size": 8,
    "lr": 1e-3,
    "ae": "small",
    "ae_steps": 1500,
    "ae_lr": 1e-3,
    "ae_batch_size": 8,
    "unet": "small",
    "train_timesteps": 1000,
    "t_train_max": 1000,  # old default kept until the lead's ablation (issue 19) says otherwise
    "steps": 5,
    "t_start": 200,  # chosen on MoNuSeg validation Dice: 0.652 vs 0.553 at 500 (docs/methods.md)
    "eta": 1.0,
    "crt_k": 32,
    "crt_tau": 0.07,
    "crt_weight": 1.0,
    "crt_resolution": 64,
    "diffusion_lr": 1e-4,
    "diffusion_batch_size": 2,
    "diffusion_steps": 256,
    "seg": "small",
    "seg_steps": 400,
    # departures chosen on validation by the issue 19 ablation (docs/results.md, 2026-12-06 tenth run):
    # the image beside the trajectory stack (MoNuSeg +0.085, WSSS4LUAD +0.024) and a full-resolution head
    # (+0.002, +0.124); the paper preset keeps neither
    "seg_with_image": True,
    "seg_head_stride": 1,
    "val_every": 100,
    "ckpt_every": 100,
    **_base.STAIN_AUGMENTATION,
}
_PAPER: dict[str, Any] = {
    "precision": "auto",
    "crop_px": 512,
    "batch_size": 32,
    "lr": 1e-3,
    "ae": "sd_vae",
    "unet": "paper",
    "train_timesteps": 1000,
    "t_train_max": 1000,  # the paper: t ~ U{1..T_train}
    "steps": 10,
    "t_start": 500,
    "eta": 1.0,
    "crt_k": 100,
    "crt_tau": 0.07,
    "crt_weight": 1.0,
    "crt_resolution": 64,
    "diffusion_lr": 1e-5,
    "diffusion_batch_size": 1,
    "diffusion_epochs": 100,
    "seg": "paper",
    "seg_epochs": 50,
    "val_every": 1000,
    "ckpt_every": 500,
    **_base.STAIN_AUGMENTATION,
}

#: preset name -> config overrides (METHODS.md Part 1 §9).
LDIFFUSION_PRESETS: dict[str, dict[str, Any]] = {"tiny": _TINY, "small": _SMALL, "paper": _PAPER}
