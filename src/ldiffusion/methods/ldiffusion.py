"""L-Diffusion (`"ldiffusion"`): Laplace latent diffusion features + contrastive loss + ConvNeXt segmenter.

METHODS.md Part 1; every interpretation ([I]/[D]) is listed with its config key in ``docs/methods.md``.

Stages (run one after the other by `train.loop.fit`):

* ``"autoencoder"`` (stage 0; skipped when ``autoencoder=RUN`` names a trained autoencoder run or ``ae`` is
  ``sd_vae:<folder>``): `nets.Autoencoder` on L1 + MSE reconstruction, all training images; afterwards the
  latent scale s = 1 / std of the training latents.
* ``"diffusion"`` (stage 1): the time U-Net on ``L_MSE + crt_weight * L_CRT``. ``L_MSE`` = ||ε - ε̂(x_t, t)||²
  on every training image (annotated or not), ε from the `noise` family, t ~ U{1..T_train}; with
  ``component_schedule="per_class"`` each latent location is noised with its class's schedule (labels
  reduced by majority vote; unlabelled locations use the base schedule). ``L_CRT`` (annotated images
  only): the T-step grey feature stack (`ldiffusion_features.feature_stack`, graph through the frozen
  decoder and the U-Net), resized to ``crt_resolution`` (labels nearest), standardised per tile and step,
  up to ``crt_k`` pixels per class per tile, supervised InfoNCE with temperature ``crt_tau``. The
  autoencoder is frozen (not optimised).
* ``"segmenter"`` (stage 2): AE and U-Net frozen; a ConvNeXt + FPN (``seg_mode="dense"``) or a per-pixel
  classifier (``"pixel"``) on the T-channel stack (+ RGB with ``seg_inputs="grey+rgb"``), soft Dice (+ CE).
  Feature noise seeds are ``derive_seed(seed, "features", id)`` per tile; ``feature_cache=DIR`` stores
  the stacks on disk (keyed by tile id and content) so later epochs reuse them.

Inference: ``predict_proba`` averages ``n_samples`` noise draws (each a stack averaged over
``feature_draws`` draws); ``predict_with_uncertainty`` returns the per-pixel spread over draws (mutual
information / log K).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ldiffusion.core.config import check_range
from ldiffusion.core.errors import CheckpointError, ConfigError
from ldiffusion.core.io import load_weights, read_json, save_torch
from ldiffusion.core.rng import derive_seed
from ldiffusion.diffusion.noise import make_noise
from ldiffusion.diffusion.process import DiffusionProcess
from ldiffusion.diffusion.schedules import (
    ComponentSchedule,
    Schedule,
    gammas_from_frequencies,
    reduce_labels_majority,
)
from ldiffusion.diffusion.timesteps import training_timesteps
from ldiffusion.losses.contrastive import info_nce_loss, sample_pixel_vectors, standardize_features
from ldiffusion.losses.dice import soft_dice_loss
from ldiffusion.methods import base as _base
from ldiffusion.methods.base import MethodConfig, OptimizerSpec, Segmenter, Stage, inference_autocast
from ldiffusion.methods.ldiffusion_features import (
    feature_cache_path,
    feature_stack,
    feature_timesteps,
    generators_for,
)

logger = logging.getLogger(__name__)

__all__ = ["LDiffusionConfig", "LDiffusionMethod"]


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
        noise: forward / reverse noise family (Table 4-5 ablation).
        noise_scale_convention: Laplace scale: "unit_variance" (b = 1/√2) or "unit_scale" (b = 1, the code).
        student_nu: Student's t degrees of freedom (> 2, rescaled to unit variance).
        noise_clip: clamp Cauchy draws to [-clip, clip] (None = no clipping; MSE may explode).
        contrastive: add L_CRT in stage 1 (Table 4 ablation).
        crt_weight: λ. crt_k: K pixels per class per tile. crt_tau: τ. crt_sim: similarity.
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
        feature_draws: stacks of this many noise draws are averaged into one feature stack.
        component_schedule: "shared" (N = 1) or "per_class" (per-class γ at training; base schedule at
        inference).
        component_gamma: explicit γ_n per class (default: spread over [0.8, 1.2] by pixel-frequency rank).
        seg: `nets.convnext_preset` name of the segmenter. seg_mode: "dense" (ConvNeXt + FPN) or "pixel".
        seg_loss: "dice" or "dice+ce". seg_inputs: "grey" (paper) or "grey+rgb".
        seg_steps, seg_epochs: stage 2 optimisation (lr / batch_size: the `MethodConfig` fields).
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
    noise: Literal["laplace", "gaussian", "cauchy", "student_t"] = "laplace"
    noise_scale_convention: Literal["unit_variance", "unit_scale"] = "unit_variance"
    student_nu: float = 3.0
    noise_clip: float | None = None
    contrastive: bool = True
    crt_weight: float = 1.0
    crt_k: int = 8
    crt_tau: float = 0.07
    crt_sim: Literal["cosine", "dot", "neg_sq_euclid"] = "cosine"
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
    feature_draws: int = 1
    component_schedule: Literal["shared", "per_class"] = "shared"
    component_gamma: tuple[float, ...] | None = None
    # segmenter
    seg: str = "tiny"
    seg_mode: Literal["dense", "pixel"] = "dense"
    seg_loss: Literal["dice", "dice+ce"] = "dice+ce"
    seg_inputs: Literal["grey", "grey+rgb"] = "grey"
    seg_steps: int = 150
    seg_epochs: int | None = None
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
        ):
            check_range(key, getattr(self, key), 1)
        for key in ("ae_epochs", "diffusion_epochs", "seg_epochs"):
            if getattr(self, key) is not None:
                check_range(key, getattr(self, key), 1)
        for key in ("ae_lr", "diffusion_lr", "crt_tau"):
            check_range(key, getattr(self, key), 0.0, lo_open=True)
        check_range("crt_weight", self.crt_weight, 0.0)
        check_range("eta", self.eta, 0.0)
        check_range("beta_start", self.beta_start, 0.0, 1.0, lo_open=True)
        check_range("beta_end", self.beta_end, self.beta_start, 1.0)
        if self.student_nu <= 2:
            raise ConfigError(
                f"student_nu={self.student_nu} is not valid; need nu > 2 (unit-variance rescaling)"
            )
        if self.noise_clip is not None:
            check_range("noise_clip", self.noise_clip, 0.0, lo_open=True)
        feature_timesteps(self.steps, self.t_start, self.train_timesteps)  # raises ConfigError when invalid
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


class _PixelClassifier(nn.Module):
    """Per-pixel MLP on the T-vector (1x1 convolutions): ``seg_mode="pixel"`` (the 3717aac code's idea)."""

    def __init__(self, in_chans: int, num_classes: int, hidden: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_chans, hidden, 1),
            nn.GELU(),
            nn.Conv2d(hidden, hidden, 1),
            nn.GELU(),
            nn.Conv2d(hidden, num_classes, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class LDiffusionMethod(Segmenter):
    """L-Diffusion segmenter (stages "autoencoder", "diffusion", "segmenter"; see the module docstring)."""

    name: ClassVar[str] = "ldiffusion"
    stage_step_keys: ClassVar[tuple[str, ...]] = ("ae_steps", "diffusion_steps", "seg_steps")
    config_cls: ClassVar[type[MethodConfig]] = LDiffusionConfig
    presets: ClassVar[dict[str, dict[str, Any]]] = {"tiny": _TINY, "small": _SMALL, "paper": _PAPER}

    def __init__(
        self,
        cfg: MethodConfig,
        num_classes: int,
        in_channels: int = 3,
        class_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__(cfg, num_classes, in_channels, class_names)
        from ldiffusion.nets import (
            Autoencoder,
            ConvNeXtSegmenter,
            TimeUNet,
            autoencoder_preset,
            convnext_preset,
            load_diffusers_autoencoder,
            unet_preset,
        )

        assert isinstance(cfg, LDiffusionConfig)
        if in_channels != 3:
            raise ConfigError(f"ldiffusion needs RGB images (in_channels=3), got in_channels={in_channels}")
        self.ae: nn.Module
        if cfg.ae.startswith("sd_vae:"):
            self.ae = load_diffusers_autoencoder(cfg.ae.split(":", 1)[1])
        else:
            self.ae = Autoencoder(in_channels=3, **autoencoder_preset(cfg.ae))
        self.ae_pretrained = cfg.ae.startswith("sd_vae:") or cfg.autoencoder is not None
        if cfg.autoencoder is not None:
            self._load_autoencoder_run(Path(cfg.autoencoder))
        c = int(self.ae.latent_channels)
        self.unet = TimeUNet(c, c, **unet_preset(cfg.unet))
        if cfg.unet_init.startswith("pretrained:"):
            self._load_unet(Path(cfg.unet_init.split(":", 1)[1]))
        seg_in = cfg.steps + (3 if cfg.seg_inputs == "grey+rgb" else 0)
        self.seg: nn.Module
        if cfg.seg_mode == "dense":
            self.seg = ConvNeXtSegmenter(seg_in, num_classes, **convnext_preset(cfg.seg))
            seg_div = int(self.seg.encoder.divisor)
        else:
            self.seg = _PixelClassifier(seg_in, num_classes)
            seg_div = 1
        f = int(self.ae.downsample_factor)
        lat_div = f * int(self.unet.divisor)
        self.size_divisor = lat_div * seg_div // math.gcd(lat_div, seg_div)
        gam = (
            list(cfg.component_gamma)
            if cfg.component_gamma is not None
            else gammas_from_frequencies([float(num_classes - i) for i in range(num_classes)])
        )
        if len(gam) != num_classes:
            raise ConfigError(
                f"component_gamma has {len(gam)} entries; expected one per class ({num_classes})"
            )
        self.register_buffer("component_gammas", torch.tensor(gam, dtype=torch.float64))
        self.register_buffer("crt_counter", torch.zeros((), dtype=torch.long))
        self.process = self._make_process()
        self._component: ComponentSchedule | None = None

    # ------------------------------------------------------------------ construction helpers
    def _make_process(self) -> DiffusionProcess:
        cfg = self.cfg
        assert isinstance(cfg, LDiffusionConfig)
        kw: dict[str, Any] = {}
        if cfg.noise == "laplace":
            kw["convention"] = cfg.noise_scale_convention
        elif cfg.noise == "student_t":
            kw["nu"] = cfg.student_nu
        elif cfg.noise == "cauchy":
            kw["clip"] = cfg.noise_clip
        sched = Schedule.from_config(
            "scaled_linear", cfg.train_timesteps, beta_start=cfg.beta_start, beta_end=cfg.beta_end
        )
        return DiffusionProcess(sched, make_noise(cfg.noise, **kw))

    def _component_schedule(self) -> ComponentSchedule:
        cfg = self.cfg
        assert isinstance(cfg, LDiffusionConfig)
        gam = [float(g) for g in self.component_gammas.tolist()]
        if self._component is None or self._component.gammas != gam:
            self._component = ComponentSchedule(
                self.num_classes, cfg.train_timesteps, cfg.beta_start, cfg.beta_end, gammas=gam
            )
        return self._component

    def _load_autoencoder_run(self, run: Path) -> None:
        cfg = self.cfg
        assert isinstance(cfg, LDiffusionConfig)
        weights = run / "model.safetensors"
        if not weights.is_file():
            # load_segmenter of a finished run: the AE weights come from this run's own model.safetensors
            logger.warning("autoencoder run %s not found; expecting the weights from a saved run folder", run)
            return
        info = read_json(run / "config.json") if (run / "config.json").is_file() else {}
        if info.get("method") not in (None, "autoencoder"):
            raise CheckpointError(f"{run}: holds a {info.get('method')!r} run, not an autoencoder run")
        their = info.get("config", {}).get("ae", cfg.ae)
        if their != cfg.ae:
            raise ConfigError(
                f"{run}: the autoencoder was trained with ae={their!r} but this run uses "
                f"ae={cfg.ae!r}; add --set ae={their}"
            )
        state = load_weights(weights)
        ae_state = {k[3:]: v for k, v in state.items() if k.startswith("ae.")}
        try:
            self.ae.load_state_dict(ae_state)
        except RuntimeError as e:
            raise CheckpointError(f"{weights}: does not match autoencoder preset {cfg.ae!r} ({e})") from e
        logger.info("loaded autoencoder from %s (scaling_factor %.4f)", run, float(self.ae.scaling_factor))

    def _load_unet(self, path: Path) -> None:
        if not path.is_file():
            logger.warning("unet_init file %s not found; expecting the weights from a saved run folder", path)
            return
        state = load_weights(path)
        if any(k.startswith("unet.") for k in state):
            state = {k[5:]: v for k, v in state.items() if k.startswith("unet.")}
        try:
            self.unet.load_state_dict(state)
        except RuntimeError as e:
            raise CheckpointError(
                f"{path}: not a TimeUNet state dict for preset {self.cfg.unet!r} ({e})"
            ) from e  # type: ignore[attr-defined]

    # ------------------------------------------------------------------ stages
    def stages(self) -> list[Stage]:
        """Return the stages: "autoencoder" (unless pretrained), "diffusion", "segmenter"."""
        cfg = self.cfg
        assert isinstance(cfg, LDiffusionConfig)
        out = []
        if not self.ae_pretrained:
            out.append(
                Stage(
                    name="autoencoder",
                    optimizers={"ae": OptimizerSpec(list(self.ae.parameters()), cfg.ae_lr)},
                    steps=cfg.ae_steps,
                    batch_size=cfg.ae_batch_size,
                    epochs=cfg.ae_epochs,
                    selects_on_val=True,
                    uses_unannotated=True,
                    val_every=0,
                )
            )
        out.append(
            Stage(
                name="diffusion",
                optimizers={"unet": OptimizerSpec(list(self.unet.parameters()), cfg.diffusion_lr)},
                steps=cfg.diffusion_steps,
                batch_size=cfg.diffusion_batch_size,
                epochs=cfg.diffusion_epochs,
                selects_on_val=False,
                uses_unannotated=True,
                val_every=0,
            )
        )
        out.append(
            Stage(
                name="segmenter",
                optimizers={"segmenter": OptimizerSpec(list(self.seg.parameters()), cfg.lr)},
                steps=cfg.seg_steps,
                batch_size=cfg.batch_size,
                epochs=cfg.seg_epochs,
                selects_on_val=True,
                uses_unannotated=False,
                val_every=cfg.val_every,
            )
        )
        return out

    def training_step(
        self, batch: dict[str, Any], generator: torch.Generator, stage: str
    ) -> dict[str, torch.Tensor]:
        """Return the stage's loss: {"ae"}, {"unet", "log/mse", "log/crt"} or {"segmenter", "log/dice",
        ...}.
        """
        self.ae.requires_grad_(stage == "autoencoder" and not self.ae_pretrained)  # frozen after stage 0
        if stage == "autoencoder":
            losses = self.ae.loss(self.preprocess(batch["image"]) * 2.0 - 1.0, generator=generator)
            return {
                "ae": losses["total"],
                **{f"log/{k}": v.detach() for k, v in losses.items() if k != "total"},
            }
        if stage == "diffusion":
            return self._diffusion_step(batch, generator)
        if stage == "segmenter":
            return self._segmenter_step(batch, generator)
        raise ConfigError(
            f"stage={stage!r} is not a stage of ldiffusion; expected one of {[s.name for s in self.stages()]}"
        )

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Return scaled latents s·E(2x-1).mean (B, c, h, w) of images in [0, 1] (no gradients)."""
        with torch.no_grad():
            return self.ae.encode(self.preprocess(images) * 2.0 - 1.0).mean * float(self.ae.scaling_factor)

    def _mse_loss(
        self, z0: torch.Tensor, labels: torch.Tensor | None, generator: torch.Generator
    ) -> torch.Tensor:
        cfg = self.cfg
        assert isinstance(cfg, LDiffusionConfig)
        B = z0.shape[0]
        t = training_timesteps(B, self.process.T, generator, device=z0.device)
        eps = self.process.noise.sample(z0.shape, generator=generator, device=z0.device, dtype=z0.dtype)
        if cfg.component_schedule == "per_class" and labels is not None:
            comp = reduce_labels_majority(labels, int(self.ae.downsample_factor), self.num_classes)
            ab = self._component_schedule().alphas_cumprod_map(t, comp)
            xt = self.process.add_noise(z0, eps, alphas_cumprod=ab)
        else:
            xt = self.process.add_noise(z0, eps, t)
        return F.mse_loss(self.unet(xt, t).float(), eps.float())

    def _diffusion_step(self, batch: dict[str, Any], generator: torch.Generator) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        assert isinstance(cfg, LDiffusionConfig)
        images, labels = batch["image"], batch["label"]
        annotated = batch.get("annotated")
        if annotated is None:
            annotated = (labels != 255).flatten(1).any(1)
        annotated = torch.as_tensor(annotated, dtype=torch.bool, device=images.device)
        z0 = self.encode(images)
        mse = self._mse_loss(z0, labels, generator)
        self.crt_counter += 1
        crt = mse.new_zeros(())
        if (
            cfg.contrastive
            and cfg.crt_weight > 0
            and int(self.crt_counter) % cfg.crt_every == 0
            and bool(annotated.any())
        ):
            idx = torch.nonzero(annotated).flatten()
            crt = self.contrastive_loss(images[idx], labels[idx], generator, z0=z0[idx])
        return {"unet": mse + cfg.crt_weight * crt, "log/mse": mse.detach(), "log/crt": crt.detach()}

    def contrastive_loss(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        generator: torch.Generator,
        z0: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Return L_CRT of annotated images (B, 3, H, W) with labels (B, H, W) (graph through U-Net and
        decoder).
        """
        cfg = self.cfg
        assert isinstance(cfg, LDiffusionConfig)
        seeds = torch.randint(
            0, 2**62, (images.shape[0],), generator=generator, device=generator.device
        ).tolist()
        feats = feature_stack(
            self.ae,
            self.unet,
            self.process,
            images,
            steps=cfg.steps,
            t_start=cfg.t_start,
            eta=cfg.eta,
            generators=generators_for(seeds, images.device),
            feature_mode=cfg.feature_mode,
            decode_target=cfg.decode_target,
            grad=True,
            backprop=cfg.crt_backprop,
            last_k=cfg.crt_last_k,
            z0=z0,
        )
        feats, lab = self._to_crt_resolution(feats, labels)
        if cfg.crt_sim != "dot":
            feats = standardize_features(feats)
        vecs, vlab = sample_pixel_vectors(feats, lab, cfg.crt_k, generator=generator)
        return info_nce_loss(vecs, vlab, tau=cfg.crt_tau, sim=cfg.crt_sim)

    def _to_crt_resolution(
        self, feats: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        r = self.cfg.crt_resolution  # type: ignore[attr-defined]
        h, w = feats.shape[-2:]
        size = (min(r, h), min(r, w))
        if size != (h, w):
            feats = F.interpolate(feats, size=size, mode="area")
            labels = F.interpolate(labels[:, None].float(), size=size, mode="nearest")[:, 0].long()
        return feats, labels

    # ------------------------------------------------------------------ features and segmenter
    def features(self, images: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        """Return the feature stack (B, T, H, W), averaged over ``feature_draws`` draws, without gradients.

        Args:
            images: (B, 3, H, W) in [0, 1].
            seeds: one noise seed per image (draw d uses ``derive_seed(seed, d)`` for d > 0).
        """
        cfg = self.cfg
        assert isinstance(cfg, LDiffusionConfig)
        with torch.no_grad():
            z0 = self.encode(images)
            acc = None
            for d in range(cfg.feature_draws):
                sd = list(seeds) if d == 0 else [derive_seed(s, d) for s in seeds]
                f = feature_stack(
                    self.ae,
                    self.unet,
                    self.process,
                    images,
                    steps=cfg.steps,
                    t_start=cfg.t_start,
                    eta=cfg.eta,
                    seeds=sd,
                    feature_mode=cfg.feature_mode,
                    decode_target=cfg.decode_target,
                    z0=z0,
                )
                acc = f if acc is None else acc + f
            assert acc is not None
            return acc / cfg.feature_draws

    def _train_features(self, images: torch.Tensor, ids: Sequence[str]) -> torch.Tensor:
        cfg = self.cfg
        assert isinstance(cfg, LDiffusionConfig)
        seeds = [derive_seed(cfg.seed, "features", i) for i in ids]
        if cfg.feature_cache is None:
            return self.features(images, seeds)
        cache = Path(cfg.feature_cache)
        cache.mkdir(parents=True, exist_ok=True)
        out = []
        for b, case_id in enumerate(ids):
            key = hashlib.sha1(images[b].detach().cpu().numpy().tobytes()).hexdigest()[:16]
            path = feature_cache_path(cache, case_id, key)
            if path.is_file():
                out.append(torch.load(path, map_location=images.device, weights_only=True)[None])
                continue
            f = self.features(images[b : b + 1], seeds[b : b + 1])
            save_torch(path, f[0].cpu())
            out.append(f)
        return torch.cat(out)

    def segment(self, features: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """Return segmenter logits (B, K, H, W) of a feature stack (B, T, H, W) in [0, 1] (and the images)."""
        x = features * 2.0 - 1.0
        if self.cfg.seg_inputs == "grey+rgb":  # type: ignore[attr-defined]
            x = torch.cat([x, images * 2.0 - 1.0], dim=1)
        return self.seg(x)

    def _segmenter_step(self, batch: dict[str, Any], generator: torch.Generator) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        assert isinstance(cfg, LDiffusionConfig)
        images, target = batch["image"], batch["label"]
        ids = batch.get("id") or [str(i) for i in range(images.shape[0])]
        feats = self._train_features(images, list(ids))
        logits = self.segment(feats, images)
        dice = soft_dice_loss(logits, target, ignore_index=255)
        out = {"log/dice": dice.detach()}
        loss = dice
        if cfg.seg_loss == "dice+ce":
            ce = (
                F.cross_entropy(logits.float(), target, ignore_index=255)
                if bool((target != 255).any())
                else logits.sum() * 0.0
            )
            loss = loss + ce
            out["log/ce"] = ce.detach()
        return {"segmenter": loss, **out}

    def _draw_seeds(self, generator: torch.Generator | None, n: int) -> list[int]:
        if generator is None:
            base = derive_seed(self.cfg.seed, "predict")
        else:
            base = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
        return [derive_seed(base, "tile", b) for b in range(n)]

    def _check_size(self, images: torch.Tensor) -> None:
        h, w = images.shape[-2:]
        d = self.size_divisor
        if images.ndim != 4 or h % d or w % d:
            raise ValueError(
                f"expected (B, 3, H, W) with H, W divisible by {d}, got {tuple(images.shape)}; "
                f"pad to ({-(-h // d) * d}, {-(-w // d) * d})"
            )

    def _sample_probs(
        self, images: torch.Tensor, generator: torch.Generator | None, n_samples: int
    ) -> list[torch.Tensor]:
        self._check_size(images)
        images = self.preprocess(images)
        probs = []
        with torch.no_grad():
            for s in range(n_samples):
                seeds = (
                    self._draw_seeds(generator, images.shape[0])
                    if s == 0 or generator is not None
                    else [derive_seed(x, s) for x in self._draw_seeds(None, images.shape[0])]
                )
                feats = self.features(images, seeds)
                probs.append(torch.softmax(self.segment(feats, images).float(), dim=1))
        return probs

    @inference_autocast
    def predict_proba(
        self, images: torch.Tensor, *, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Return class probabilities (B, K, H, W), the mean over ``n_samples`` noise draws.

        Args:
            images: (B, 3, H, W) float32 in [0, 1], H and W multiples of `size_divisor`.
            generator: drives the per-tile noise seeds (None: seeds derived from the config seed).
        """
        return torch.stack(self._sample_probs(images, generator, self.cfg.n_samples)).mean(0)

    @inference_autocast
    def predict_with_uncertainty(
        self, images: torch.Tensor, *, generator: torch.Generator | None = None, n_samples: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return `(probs (B, K, H, W), uncertainty (B, H, W) in [0, 1])` over S noise draws.

        With S > 1 the uncertainty is the spread over the draws: the mutual information
        H(mean p) - mean H(p), divided by log K. With S = 1 it is the normalised entropy of p.
        """
        S = int(n_samples if n_samples is not None else max(self.cfg.n_samples, 1))
        draws = torch.stack(self._sample_probs(images, generator, S))  # (S, B, K, H, W)
        probs = draws.mean(0)

        def entropy(p: torch.Tensor) -> torch.Tensor:
            return -(p * torch.log(p.clamp_min(1e-12))).sum(-3)

        norm = max(math.log(probs.shape[1]), 1e-12)
        unc = entropy(probs) - entropy(draws).mean(0) if S > 1 else entropy(probs)
        return probs, (unc / norm).clamp(0.0, 1.0)

    # ------------------------------------------------------------------ validation and hooks
    def validation_score(
        self, batches: Iterable[dict[str, Any]], generator: torch.Generator, stage: str
    ) -> float:
        """Stage score (higher is better): segmenter foreground Dice in [0, 1]; earlier stages a score <= 0.

        Stage 0 gives -MSE of the reconstruction ([0, 1] images), stage 1 -L_MSE. Both are <= 0 on purpose,
        so that they never beat a Dice when a loop carries the best score from one stage into the next.
        """
        if stage == "segmenter":
            self.score_name = "val_dice"  # type: ignore[misc]
            return super().validation_score(batches, generator, stage)
        from ldiffusion.train.validation import pad_to_multiple

        vals: list[float] = []
        with torch.no_grad():
            for batch in batches:
                images, _ = pad_to_multiple(batch["image"].to(self.device), self.size_divisor)
                if stage == "autoencoder":
                    rec = (self.ae.decode(self.ae.encode(images * 2.0 - 1.0).mean).clamp(-1, 1) + 1) / 2
                    vals.append(-float(F.mse_loss(rec.float(), images.float())))
                else:
                    vals.append(-float(self._mse_loss(self.encode(images), None, generator)))
        self.score_name = "val_neg_recon_mse" if stage == "autoencoder" else "val_neg_eps_mse"  # type: ignore[misc]
        return float(sum(vals) / max(len(vals), 1))

    def on_stage_end(self, stage: str, train_batches: Iterable[dict[str, Any]]) -> None:
        """After stage 0: set the latent scale s = 1/std and (per_class) γ_n from label frequencies."""
        if stage != "autoencoder":
            return
        cfg = self.cfg
        assert isinstance(cfg, LDiffusionConfig)
        zs, counts = [], torch.zeros(self.num_classes, dtype=torch.float64)
        with torch.no_grad():
            for i, batch in enumerate(train_batches):
                lab = batch["label"].flatten().cpu()
                lab = lab[lab < self.num_classes]
                counts += torch.bincount(lab, minlength=self.num_classes).double()
                if i < 32:
                    zs.append(
                        self.ae.encode(self.preprocess(batch["image"].to(self.device)) * 2 - 1).mean.flatten()
                    )
        if zs:
            std = float(torch.cat(zs).float().std())
            self.ae.scaling_factor = 1.0 / max(std, 1e-6)
            logger.info(
                "autoencoder latent std %.4f -> scaling_factor %.4f", std, float(self.ae.scaling_factor)
            )
        if cfg.component_gamma is None and counts.sum() > 0:
            self.component_gammas.copy_(
                torch.tensor(gammas_from_frequencies(counts.tolist()), dtype=torch.float64)
            )
