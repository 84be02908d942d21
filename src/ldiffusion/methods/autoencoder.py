"""Method `"autoencoder"`: stage 0 of L-Diffusion, trainable on its own.

Trains `nets.Autoencoder` to reconstruct dataset images (labels unused; unannotated images
included). Images enter the network scaled to [-1, 1] (SD-VAE convention, METHODS Part 1 §2).
Validation score: mean reconstruction PSNR in dB on [0, 1] images (higher is better). After
training, `scaling_factor` is set to 1 / std of the training latents (posterior means), so scaled
latents have unit variance for the diffusion stage, and saved with the weights.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from typing import Any, ClassVar

import torch

from ldiffusion.methods.base import STAIN_AUGMENTATION, MethodConfig, OptimizerSpec, Stage, Trainable
from ldiffusion.train.validation import pad_to_multiple, psnr

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True)
class AutoencoderConfig(MethodConfig):
    """Autoencoder config.

    Attributes:
        ae: autoencoder preset name of `nets.autoencoder_preset` ("tiny", "small").
        scale_batches: at most this many training batches are encoded to estimate the latent std.
    """

    ae: str = "tiny"
    scale_batches: int = 32


def latent_mean(encoded: Any) -> torch.Tensor:
    """Return the posterior mean from whatever `Autoencoder.encode` returns."""
    if isinstance(encoded, torch.Tensor):
        return encoded
    if isinstance(encoded, (tuple, list)):
        return encoded[0]
    for attr in ("mean", "mode"):
        v = getattr(encoded, attr, None)
        if v is not None:
            return v() if callable(v) else v
    raise TypeError(f"cannot read a latent from {type(encoded).__name__}")


class AutoencoderMethod(Trainable):
    """Autoencoder trained on reconstruction (`Autoencoder.loss`), selected on validation PSNR."""

    name: ClassVar[str] = "autoencoder"
    config_cls: ClassVar[type[MethodConfig]] = AutoencoderConfig
    score_name: ClassVar[str] = "val_psnr"
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "tiny": {"ae": "tiny", "crop_px": 64, "batch_size": 4, "lr": 2e-3, "steps": 100, "val_every": 50,
                 "ckpt_every": 50, "grad_clip": 1.0, "rot90": True, "flips": True},
        "small": {"precision": "auto", "ae": "small", "crop_px": 128, "batch_size": 8, "lr": 1e-3,
                  "steps": 3000, "val_every": 500, "ckpt_every": 500, **STAIN_AUGMENTATION},
    }

    def __init__(self, cfg: MethodConfig, num_classes: int, in_channels: int = 3,
                 class_names: list[str] | None = None) -> None:
        super().__init__(cfg, num_classes, in_channels, class_names)
        from ldiffusion.nets import Autoencoder, autoencoder_preset

        assert isinstance(cfg, AutoencoderConfig)
        self.ae = Autoencoder(in_channels=in_channels, **autoencoder_preset(cfg.ae))
        self.size_divisor = int(self.ae.downsample_factor)

    @property
    def scaling_factor(self) -> float:
        """1 / std of the training latents (1.0 before training ends)."""
        return float(self.ae.scaling_factor)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Map [0, 1] images to [-1, 1]."""
        return super().preprocess(images) * 2.0 - 1.0

    def stages(self) -> list[Stage]:
        """One stage "autoencoder" on all images (annotated or not), selected on PSNR."""
        return [Stage(name="autoencoder",
                      optimizers={"model": OptimizerSpec(list(self.ae.parameters()), self.cfg.lr)},
                      steps=self.cfg.steps, batch_size=self.cfg.batch_size, epochs=self.cfg.epochs,
                      selects_on_val=True, uses_unannotated=True, val_every=self.cfg.val_every)]

    def training_step(self, batch: dict[str, Any], generator: torch.Generator,
                      stage: str) -> dict[str, torch.Tensor]:
        """Return {"model": total, "log/recon": ..., "log/kl": ...} from `Autoencoder.loss`."""
        losses = self.ae.loss(self.preprocess(batch["image"]), generator=generator)
        out = {"model": losses["total"]}
        for k, v in losses.items():
            if k != "total":
                out[f"log/{k}"] = v.detach()
        return out

    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """Return reconstructions in [0, 1] of images (B, C, H, W) in [0, 1] (posterior mean)."""
        padded, (h, w) = pad_to_multiple(images, self.size_divisor)
        z = latent_mean(self.ae.encode(self.preprocess(padded)))
        x = self.ae.decode(z)
        return ((x.float().clamp(-1, 1) + 1) / 2)[..., :h, :w]

    def validation_score(self, batches: Iterable[dict[str, Any]], generator: torch.Generator,
                         stage: str) -> float:
        """Mean reconstruction PSNR (dB) over validation images."""
        vals: list[float] = []
        with torch.no_grad():
            for batch in batches:
                images = batch["image"].to(self.device)
                vals += psnr(self.reconstruct(images), images).tolist()
        return float(sum(vals) / max(len(vals), 1))

    def on_stage_end(self, stage: str, train_batches: Iterable[dict[str, Any]]) -> None:
        """Set `scaling_factor` = 1 / std of the training latents."""
        zs = []
        with torch.no_grad():
            for i, batch in enumerate(train_batches):
                if i >= self.cfg.scale_batches:  # type: ignore[attr-defined]
                    break
                images = batch["image"].to(self.device)
                padded, _ = pad_to_multiple(images, self.size_divisor)
                zs.append(latent_mean(self.ae.encode(self.preprocess(padded))).float().flatten())
        if zs:
            std = float(torch.cat(zs).std())
            self.ae.scaling_factor = 1.0 / max(std, 1e-6)
            logger.info("autoencoder latent std %.4f -> scaling_factor %.4f", std, self.scaling_factor)
