"""The U-Net baseline (`"unet"`): a U-Net trained with cross-entropy + soft Dice, Adam.

The cross-entropy takes the batch's per-pixel "weight" when `separation_weight` > 0 (the U-Net
paper's weight map, `data.targets.separation_weights`).

`encoder="plain"` is the Ronneberger-style `nets.SegUNet` (the `tiny` preset); `encoder="resnet18"`
(the `small` and `paper` presets) is `nets.ResUNet`, a ResNet-18-encoder U-Net with 5 levels down
to 1/32, the layout of the library U-Nets that pathology groups use as their baseline.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F

from ldiffusion.core.config import check_range
from ldiffusion.losses.dice import soft_dice_loss
from ldiffusion.methods.base import STAIN_AUGMENTATION, MethodConfig, Segmenter, inference_autocast


@dataclasses.dataclass(frozen=True, kw_only=True)
class UNetConfig(MethodConfig):
    """U-Net baseline config.

    Attributes:
        encoder: "plain" (`SegUNet`, sized by `base` and `depth`) or "resnet18" / "resnet34"
            (`ResUNet`; `base` and `depth` unused).
        base: channels of the first level (doubled per level) of the plain U-Net.
        depth: number of resolution levels of the plain U-Net (H, W multiples of 2**(depth-1)).
        ce_weight: weight of the cross-entropy term.
        dice_weight: weight of the soft Dice term (classes present, background excluded).
    """

    encoder: Literal["plain", "resnet18", "resnet34"] = "plain"
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


def weighted_cross_entropy(logits: torch.Tensor, target: torch.Tensor,
                           weight: torch.Tensor | None, ignore_index: int = 255) -> torch.Tensor:
    """Return the cross-entropy of (B, K, H, W) logits and (B, H, W) targets, weighted per pixel.

    With `weight` (B, H, W) the mean is sum(w * ce) / sum(w) over the labelled pixels, so all-ones
    weights give `F.cross_entropy` and the loss keeps its scale whatever the weights' level.
    """
    if weight is None:
        return F.cross_entropy(logits, target, ignore_index=ignore_index)
    ce = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="none")
    w = weight.to(ce.dtype) * (target != ignore_index)
    return (w * ce).sum() / w.sum().clamp_min(1e-12)


class UNetMethod(Segmenter):
    """U-Net baseline segmenter: logits = SegUNet(preprocess(x)); loss = w_ce*CE + w_dice*softDice."""

    name: ClassVar[str] = "unet"
    config_cls: ClassVar[type[MethodConfig]] = UNetConfig
    supports_pixel_weights: ClassVar[bool] = True
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "tiny": {"base": 8, "depth": 3, "crop_px": 64, "batch_size": 4, "lr": 3e-3, "steps": 60,
                 "val_every": 20, "ckpt_every": 20},
        "small": {"precision": "auto", "encoder": "resnet18", "crop_px": 256, "batch_size": 8, "lr": 1e-3,
                  "steps": 2000, "val_every": 100, "ckpt_every": 100, **STAIN_AUGMENTATION},
        "paper": {"precision": "auto", "encoder": "resnet18", "crop_px": 512, "batch_size": 16, "lr": 1e-3,
                  "steps": 20000, "val_every": 1000, "ckpt_every": 1000, **STAIN_AUGMENTATION},
    }

    def __init__(self, cfg: MethodConfig, num_classes: int, in_channels: int = 3,
                 class_names: list[str] | None = None) -> None:
        super().__init__(cfg, num_classes, in_channels, class_names)
        from ldiffusion.nets import ResUNet, SegUNet

        assert isinstance(cfg, UNetConfig)
        self.net: torch.nn.Module
        if cfg.encoder == "plain":
            self.net = SegUNet(in_channels=in_channels, num_classes=num_classes, base=cfg.base,
                               depth=cfg.depth)
            self.size_divisor = 2 ** (cfg.depth - 1)
        else:
            self.net = ResUNet(in_channels=in_channels, num_classes=num_classes, encoder=cfg.encoder)
            self.size_divisor = ResUNet.divisor
            self.wide_context = True

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
            ce = weighted_cross_entropy(logits.float(), target, batch.get("weight"))
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
