"""The U-Net baseline (`"unet"`): a U-Net trained with cross-entropy + soft Dice, Adam.

The cross-entropy takes the batch's per-pixel "weight" when `separation_weight` > 0 (the U-Net
paper's weight map, `data.targets.separation_weights`).

`encoder="plain"` is the Ronneberger-style `nets.SegUNet` (the `tiny` preset); `encoder="resnet18"`
(the `small` and `paper` presets) is `nets.ResUNet`, a ResNet-18-encoder U-Net with 5 levels down
to 1/32, the layout of the library U-Nets that pathology groups use as their baseline.

With `ema` set, an exponential moving average of the network's weights (and BatchNorm statistics)
is kept beside it and used for validation, prediction and `model.safetensors`.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F

from ldiffusion.core.config import check_range
from ldiffusion.core.errors import ConfigError
from ldiffusion.losses.dice import soft_dice_loss
from ldiffusion.methods.base import (
    STAIN_AUGMENTATION,
    MethodConfig,
    Segmenter,
    fold_ema,
    inference_autocast,
    warmup_ema_decay,
)


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
        ema: decay of an exponential moving average of the weights and BatchNorm statistics (None =
            off; `small` 0.99, `tiny` and `paper` off). The n-th average step uses
            min(ema, (1 + n) / (10 + n)), so a short run is not dominated by its first weights. The
            average is what validation scores, what `model.safetensors` holds and what predicts.
    """

    encoder: Literal["plain", "resnet18", "resnet34"] = "plain"
    base: int = 8
    depth: int = 3
    ce_weight: float = 1.0
    dice_weight: float = 1.0
    ema: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("base", self.base, 1)
        if self.ema is not None:
            check_range("ema", self.ema, 0.0, 1.0, lo_open=True)
            if self.ema >= 1.0:
                raise ConfigError(f"ema={self.ema} should be < 1 (or null to turn the average off)")
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
        # small averages its weights (ema) since the twentieth run: chosen on validation (MoNuSeg, CoNSeP and
        # CoNSeP's nuclei for MoNuSeg models, two seeds; docs/results.md); paper: not measured, off
        "small": {"precision": "auto", "encoder": "resnet18", "crop_px": 256, "batch_size": 8, "lr": 1e-3,
                  "steps": 2000, "val_every": 100, "ckpt_every": 100, "ema": 0.99, **STAIN_AUGMENTATION},
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
        self.net_ema: torch.nn.Module | None = None
        if cfg.ema is not None:
            self.net_ema = copy.deepcopy(self.net).requires_grad_(False)
            # 1 while the last optimiser step is not folded in yet; the number of folds done
            self.register_buffer("ema_pending", torch.zeros((), dtype=torch.int64))
            self.register_buffer("ema_updates", torch.zeros((), dtype=torch.int64))

    def ema_decay(self, n: int) -> float:
        """Return the decay of the n-th average step (n = 0, 1, ...): min(ema, (1 + n) / (10 + n))."""
        cfg = self.cfg
        assert isinstance(cfg, UNetConfig) and cfg.ema is not None
        return warmup_ema_decay(cfg.ema, n)

    @torch.no_grad()
    def _sync_ema(self) -> None:
        """Fold the weights of the last optimiser step into the average (once per step)."""
        if self.net_ema is None or int(self.ema_pending) == 0:
            return
        fold_ema(self.net_ema, self.net, self.ema_decay(int(self.ema_updates)), average_buffers=True)
        self.ema_updates += 1
        self.ema_pending.zero_()

    def inference_net(self) -> torch.nn.Module:
        """Return the network that validates and predicts: the average when `ema` is on, else `net`."""
        self._sync_ema()
        return self.net_ema if self.net_ema is not None else self.net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Return logits (B, K, H, W) for images (B, C, H, W) in [0, 1]."""
        return self.net(self.preprocess(images))

    def training_step(self, batch: dict[str, Any], generator: torch.Generator,
                      stage: str) -> dict[str, torch.Tensor]:
        """Return {"model": CE + Dice, "log/ce": ..., "log/dice": ...}."""
        cfg = self.cfg
        assert isinstance(cfg, UNetConfig)
        self._sync_ema()
        logits = self(batch["image"])
        target = batch["label"]
        if bool((target != 255).any()):
            ce = weighted_cross_entropy(logits.float(), target, batch.get("weight"))
        else:
            ce = logits.sum() * 0.0
        dice = soft_dice_loss(logits, target, ignore_index=255)
        loss = cfg.ce_weight * ce + cfg.dice_weight * dice
        if self.net_ema is not None:
            self.ema_pending.fill_(1)
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
        return torch.softmax(self.inference_net()(self.preprocess(images)).float(), dim=1)

    def inference_state_dict(self) -> dict[str, torch.Tensor]:
        """Return the weights that predict, under the keys of `net` (the average when `ema` is on)."""
        if self.net_ema is None:
            return super().inference_state_dict()
        return {f"net.{k}": v for k, v in self.inference_net().state_dict().items()}

    def load_inference_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load inference weights into `net` and, when `ema` is on, restart the average from them."""
        super().load_inference_state_dict(state)
        if self.net_ema is not None:
            self.net_ema.load_state_dict(self.net.state_dict())
            self.ema_pending.zero_()
