"""The U-Net baseline (`"unet"`): `nets.SegUNet` trained with cross-entropy + soft Dice, Adam."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ldiffusion.core.config import check_range
from ldiffusion.losses.dice import soft_dice_loss
from ldiffusion.methods.base import MethodConfig, Segmenter, inference_autocast


@dataclasses.dataclass(frozen=True, kw_only=True)
class UNetConfig(MethodConfig):
    """U-Net baseline config.

    Attributes:
        base: channels of the first level (doubled per level).
        depth: number of resolution levels (H, W must be multiples of 2**(depth-1)).
        ce_weight: weight of the cross-entropy term.
        dice_weight: weight of the soft Dice term (classes present, background excluded).
    """

    base: int = 8
    depth: int = 3
    ce_weight: float = 1.0
    dice_weight: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("base", self.base, 1)
        check_range("depth", self.depth, 1, 8)
        check_range("ce_weight", self.ce_weight, 0.0)
        check_range("dice_weight", self.dice_weight, 0.0)


class UNetMethod(Segmenter):
    """U-Net baseline segmenter: logits = SegUNet(preprocess(x)); loss = w_ce*CE + w_dice*softDice."""

    name: ClassVar[str] = "unet"
    config_cls: ClassVar[type[MethodConfig]] = UNetConfig
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "tiny": {"base": 8, "depth": 3, "crop_px": 64, "batch_size": 4, "lr": 3e-3, "steps": 60,
                 "val_every": 20, "ckpt_every": 20},
        "small": {"precision": "auto", "base": 32, "depth": 4, "crop_px": 256, "batch_size": 8, "lr": 1e-3,
                  "steps": 2000, "val_every": 200, "ckpt_every": 200},
        "paper": {"precision": "auto", "base": 64, "depth": 5, "crop_px": 512, "batch_size": 16, "lr": 1e-3,
                  "steps": 20000, "val_every": 1000, "ckpt_every": 1000},
    }

    def __init__(self, cfg: MethodConfig, num_classes: int, in_channels: int = 3,
                 class_names: list[str] | None = None) -> None:
        super().__init__(cfg, num_classes, in_channels, class_names)
        from ldiffusion.nets import SegUNet

        assert isinstance(cfg, UNetConfig)
        self.net = SegUNet(in_channels=in_channels, num_classes=num_classes, base=cfg.base, depth=cfg.depth)
        self.size_divisor = 2 ** (cfg.depth - 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Return logits (B, K, H, W) for images (B, C, H, W) in [0, 1]."""
        return self.net(self.preprocess(images))

    def training_step(self, batch: dict[str, Any], generator: torch.Generator,
                      stage: str) -> dict[str, torch.Tensor]:
        """Return {"model": CE + Dice, "log/ce": ..., "log/dice": ...}."""
        cfg = self.cfg
        assert isinstance(cfg, UNetConfig)
        logits = self(batch["image"])
        target = batch["label"]
        if bool((target != 255).any()):
            ce = F.cross_entropy(logits.float(), target, ignore_index=255)
        else:
            ce = logits.sum() * 0.0
        dice = soft_dice_loss(logits, target, ignore_index=255)
        loss = cfg.ce_weight * ce + cfg.dice_weight * dice
        return {"model": loss, "log/ce": ce.detach(), "log/dice": dice.detach()}

    @inference_autocast
    def predict_proba(self, images: torch.Tensor, *,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """Return softmax probabilities (B, K, H, W); deterministic (ignores `generator`)."""
        h, w = images.shape[-2:]
        if h % self.size_divisor or w % self.size_divisor:
            d = self.size_divisor
            raise ValueError(f"expected (B, C, H, W) with H, W divisible by {d}, got {tuple(images.shape)}; "
                             f"pad to ({-(-h // d) * d}, {-(-w // d) * d})")
        return torch.softmax(self(images).float(), dim=1)
