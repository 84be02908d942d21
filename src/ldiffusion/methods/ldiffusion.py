"""L-Diffusion (`"ldiffusion"`): Laplace latent diffusion features + contrastive loss + ConvNeXt segmenter.

METHODS.md Part 1; every interpretation ([I]/[D]) is listed with its config key in ``docs/methods.md``.
The config and presets live in `ldiffusion_config`, the chain in `ldiffusion_features`, feature stacks
and inference in `ldiffusion_inference`, the context-independent normalisation in `ldiffusion_norm`;
``LDiffusionConfig`` and ``LDiffusionMethod`` stay importable from here.

Stages (run one after the other by `train.loop.fit`):

* ``"autoencoder"`` (stage 0; skipped when ``autoencoder=RUN`` names a trained autoencoder run or ``ae`` is
  ``sd_vae:<folder>``): `nets.Autoencoder` on L1 + MSE reconstruction, all training images; afterwards the
  latent scale s = 1 / std of the training latents.
* ``"diffusion"`` (stage 1): the time U-Net on ``L_MSE + w * L_CRT``. ``L_MSE`` = ||ε - ε̂(x_t, t)||²
  on every training image (annotated or not), ε from the `noise` family, t ~ U{1..t_train_max} (a share
  ``t_full_share`` from U{1..T_train}); with ``component_schedule="per_class"`` or
  ``"per_class_iterative"`` each latent location is noised with its class's schedule (labels reduced by
  majority vote; unlabelled locations use the base schedule). ``L_CRT`` (annotated images only): the
  T-step feature stack (`ldiffusion_features.feature_stack`, graph through the frozen decoder and the
  U-Net; with ``per_class_iterative`` the chain runs the labels' class schedules), resized to
  ``crt_resolution`` (labels nearest), standardised per tile and step, up to ``crt_k`` pixels per class
  per tile, supervised InfoNCE with temperature ``crt_tau``. Its weight w is 0 for the first
  ``crt_warmup_steps`` steps, then ramps linearly to ``crt_weight`` (λ). The autoencoder is frozen. With
  ``feature_norm="fixed"`` the stage ends by calibrating the GroupNorm statistics of the chain.
* ``"segmenter"`` (stage 2): AE and U-Net frozen; a ConvNeXt + FPN (``seg_mode="dense"``) or a per-pixel
  classifier (``"pixel"``) on the feature stack (+ the image with ``seg_with_image``), soft Dice (+ CE).
  Feature noise seeds are ``derive_seed(seed, "features", id)`` per tile; ``feature_cache=DIR`` stores
  the stacks on disk (keyed by tile id and content) so later epochs reuse them.

Inference (`ldiffusion_inference`): ``predict_proba`` averages ``n_samples`` noise draws (each a stack
averaged over ``feature_draws`` draws; ``per_class_iterative`` re-runs the chain with the predicted class
schedules); ``predict_with_uncertainty`` returns the per-pixel spread over draws (mutual information /
log K).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ldiffusion.core.errors import CheckpointError, ConfigError
from ldiffusion.core.io import load_weights, read_json
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
from ldiffusion.methods.base import MethodConfig, OptimizerSpec, Segmenter, Stage
from ldiffusion.methods.ldiffusion_config import LDIFFUSION_PRESETS, LDiffusionConfig
from ldiffusion.methods.ldiffusion_features import generators_for
from ldiffusion.methods.ldiffusion_inference import LDiffusionInference
from ldiffusion.methods.ldiffusion_norm import install_context_free_norms

logger = logging.getLogger(__name__)

__all__ = ["LDiffusionConfig", "LDiffusionMethod"]


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


class LDiffusionMethod(LDiffusionInference, Segmenter):
    """L-Diffusion segmenter (stages "autoencoder", "diffusion", "segmenter"; see the module docstring)."""

    name: ClassVar[str] = "ldiffusion"
    stage_step_keys: ClassVar[tuple[str, ...]] = ("ae_steps", "diffusion_steps", "seg_steps")
    config_cls: ClassVar[type[MethodConfig]] = LDiffusionConfig
    presets: ClassVar[dict[str, dict[str, Any]]] = LDIFFUSION_PRESETS

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
        if cfg.feature_norm == "fixed":
            install_context_free_norms(self.ae, cfg.steps)
            install_context_free_norms(self.unet, cfg.steps)
        seg_in = cfg.steps * cfg.maps_per_step + (3 if cfg.with_image else 0)
        self.seg: nn.Module
        if cfg.seg_mode == "dense":
            self.seg = ConvNeXtSegmenter(
                seg_in,
                num_classes,
                **convnext_preset(cfg.seg),
                head_stride=cfg.seg_head_stride,
                decoder_norm="layer" if cfg.feature_norm == "fixed" else "group",
            )
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
        self.register_buffer("norm_calibrated", torch.zeros((), dtype=torch.bool))
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
                    max_minutes=cfg.ae_max_minutes,
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
                max_minutes=cfg.diffusion_max_minutes,
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
                max_minutes=cfg.seg_max_minutes,
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

    def training_timesteps(
        self, batch: int, generator: torch.Generator, device: torch.device
    ) -> torch.Tensor:
        """Draw the denoiser's training timesteps (B,), 0-based: U{1..t_train_max}, a share U{1..T_train}.

        With ``t_train_max = T_train`` and ``t_full_share = 0`` the draws are those of the paper's
        U{1..T_train} (same generator calls as before issue 19).
        """
        cfg: LDiffusionConfig = self.cfg  # type: ignore[assignment]
        t = training_timesteps(batch, cfg.t_train_high, generator, device=device)
        if cfg.t_full_share > 0 and cfg.t_train_high < self.process.T:
            full = torch.rand(batch, generator=generator, device=generator.device) < cfg.t_full_share
            t_full = training_timesteps(batch, self.process.T, generator, device=device)
            t = torch.where(full.to(device), t_full, t)
        return t

    def noised_latents(
        self, z0: torch.Tensor, labels: torch.Tensor | None, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return (x_t, ε, t) of the denoiser's training step for latents z0 (B, c, h, w).

        With ``component_schedule`` "per_class" / "per_class_iterative" and labels (B, H, W), each latent
        location is noised with its majority class's ᾱ_(n,t) (unlabelled cells: the base schedule).
        """
        cfg: LDiffusionConfig = self.cfg  # type: ignore[assignment]
        t = self.training_timesteps(z0.shape[0], generator, z0.device)
        eps = self.process.noise.sample(z0.shape, generator=generator, device=z0.device, dtype=z0.dtype)
        if cfg.component_schedule != "shared" and labels is not None:
            comp = reduce_labels_majority(labels, int(self.ae.downsample_factor), self.num_classes)
            ab = self._component_schedule().alphas_cumprod_map(t, comp)
            return self.process.add_noise(z0, eps, alphas_cumprod=ab), eps, t
        return self.process.add_noise(z0, eps, t), eps, t

    def _mse_loss(
        self, z0: torch.Tensor, labels: torch.Tensor | None, generator: torch.Generator
    ) -> torch.Tensor:
        xt, eps, t = self.noised_latents(z0, labels, generator)
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
        weight = cfg.crt_weight_at(int(self.crt_counter))  # steps trained before this one
        self.crt_counter += 1
        crt = mse.new_zeros(())
        if (
            cfg.contrastive
            and weight > 0
            and int(self.crt_counter) % cfg.crt_every == 0
            and bool(annotated.any())
        ):
            idx = torch.nonzero(annotated).flatten()
            crt = self.contrastive_loss(images[idx], labels[idx], generator, z0=z0[idx])
        return {
            "unet": mse + weight * crt,
            "log/mse": mse.detach(),
            "log/crt": crt.detach(),
            "log/crt_weight": mse.new_tensor(weight),
        }

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
        comp = table = None
        if cfg.component_schedule == "per_class_iterative":  # the chain the re-runs use, with the labels
            comp = reduce_labels_majority(labels, int(self.ae.downsample_factor), self.num_classes)
            table = self.component_table()
        feats = self._chain_features(images, generators=generators_for(seeds, images.device), grad=True,
                                     backprop=cfg.crt_backprop, last_k=cfg.crt_last_k, z0=z0,
                                     component_map=comp, component_table=table)
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

    def _segmenter_step(self, batch: dict[str, Any], generator: torch.Generator) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        assert isinstance(cfg, LDiffusionConfig)
        images, target = batch["image"], batch["label"]
        ids = batch.get("id") or [str(i) for i in range(images.shape[0])]
        comp = None
        if cfg.component_schedule == "per_class_iterative" and cfg.per_class_seg_share > 0:
            # a share of the tiles runs the chain with their labels' class schedules (what the re-runs
            # see at inference); the others (and unlabelled cells) the base schedule
            use = torch.rand(images.shape[0], generator=generator, device=generator.device)
            use = (use < cfg.per_class_seg_share).to(target.device)
            if bool(use.any()):
                comp = reduce_labels_majority(target, int(self.ae.downsample_factor), self.num_classes)
                comp = torch.where(use[:, None, None], comp, torch.full_like(comp, 255))
        feats = self._train_features(images, list(ids), comp)
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
        """After stage 0: set the latent scale s = 1/std and (per_class) γ_n from label frequencies.
        After stage 1 with ``feature_norm="fixed"``: calibrate the chain's GroupNorm statistics.
        """
        cfg = self.cfg
        if stage == "diffusion" and isinstance(cfg, LDiffusionConfig) and cfg.feature_norm == "fixed":
            n = self.calibrate_feature_norms(train_batches, cfg.norm_calibration_batches)
            logger.info("feature_norm=fixed: GroupNorm statistics calibrated on %d training crops", n)
            return
        if stage == "autoencoder":
            self._set_data_statistics(train_batches, latent_scale=True)

    def on_stage_start(self, stage: str, train_batches: Iterable[dict[str, Any]]) -> None:
        """Before the diffusion stage with a pretrained autoencoder (no stage 0): set the per-class γ_n
        from the label frequencies, as stage 0's end does otherwise (the autoencoder keeps its scale).
        """
        if stage == "diffusion" and self.ae_pretrained:
            self._set_data_statistics(train_batches, latent_scale=False)

    def _set_data_statistics(self, train_batches: Iterable[dict[str, Any]], latent_scale: bool) -> None:
        """Set γ_n from the training label frequencies (unless `component_gamma` is given) and, with
        `latent_scale`, the autoencoder's scaling factor s = 1 / std of the training latents (32 batches).
        """
        cfg = self.cfg
        assert isinstance(cfg, LDiffusionConfig)
        zs, counts = [], torch.zeros(self.num_classes, dtype=torch.float64)
        with torch.no_grad():
            for i, batch in enumerate(train_batches):
                lab = batch["label"].flatten().cpu()
                lab = lab[lab < self.num_classes]
                counts += torch.bincount(lab, minlength=self.num_classes).double()
                if latent_scale and i < 32:
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
