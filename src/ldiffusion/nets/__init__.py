"""Networks: building blocks, U-Nets, autoencoders, ConvNeXt segmenters, the `NETS` registry and `create_net`.

Every registered constructor takes keyword arguments only, accepts ``preset="tiny" | "small" | "paper"``
(the preset's values are defaults that explicit keyword arguments override) and returns an ``nn.Module``.

Registered names:
    ``"time_unet"`` `TimeUNet` (needs ``in_channels``, ``out_channels``),
    ``"seg_unet"`` `SegUNet` (``in_channels``, ``num_classes``),
    ``"res_unet"`` `ResUNet` (``in_channels``, ``num_classes``, ``encoder``; no presets),
    ``"autoencoder"`` `Autoencoder` (presets tiny, small),
    ``"convnext_seg"`` `ConvNeXtSegmenter` (``in_chans``, ``num_classes``),
    ``"timm_seg"`` `TimmSegmenter` (``backbone_name``, ``in_chans``, ``num_classes``; needs the timm extra).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from ldiffusion.core.registry import Registry
from ldiffusion.nets.autoencoder import (
    Autoencoder,
    DiagonalGaussian,
    DiffusersAutoencoder,
    autoencoder_preset,
    load_diffusers_autoencoder,
)
from ldiffusion.nets.convnext_seg import ConvNeXtEncoder, ConvNeXtSegmenter, TimmSegmenter, convnext_preset
from ldiffusion.nets.res_unet import ResUNet
from ldiffusion.nets.seg_unet import SegUNet, seg_unet_preset
from ldiffusion.nets.unet import TimeUNet, unet_preset

__all__ = [
    "NETS",
    "Autoencoder",
    "ConvNeXtEncoder",
    "ConvNeXtSegmenter",
    "DiagonalGaussian",
    "DiffusersAutoencoder",
    "ResUNet",
    "SegUNet",
    "TimeUNet",
    "TimmSegmenter",
    "autoencoder_preset",
    "convnext_preset",
    "create_net",
    "load_diffusers_autoencoder",
    "seg_unet_preset",
    "unet_preset",
]

NETS: Registry[Callable[..., nn.Module]] = Registry("net")


def _with_preset(
    preset_fn: Callable[[str], dict[str, Any]], preset: str | None, kwargs: dict[str, Any]
) -> dict[str, Any]:
    cfg = preset_fn(preset) if preset is not None else {}
    cfg.update(kwargs)
    return cfg


@NETS.register("time_unet")
def _time_unet(*, preset: str | None = None, **kwargs: Any) -> nn.Module:
    return TimeUNet(**_with_preset(unet_preset, preset, kwargs))


@NETS.register("seg_unet")
def _seg_unet(*, preset: str | None = None, **kwargs: Any) -> nn.Module:
    return SegUNet(**_with_preset(seg_unet_preset, preset, kwargs))


@NETS.register("res_unet")
def _res_unet(**kwargs: Any) -> nn.Module:
    return ResUNet(**kwargs)


@NETS.register("autoencoder")
def _autoencoder(*, preset: str | None = None, **kwargs: Any) -> nn.Module:
    return Autoencoder(**_with_preset(autoencoder_preset, preset, kwargs))


@NETS.register("convnext_seg")
def _convnext_seg(*, preset: str | None = None, **kwargs: Any) -> nn.Module:
    return ConvNeXtSegmenter(**_with_preset(convnext_preset, preset, kwargs))


@NETS.register("timm_seg")
def _timm_seg(**kwargs: Any) -> nn.Module:
    return TimmSegmenter(**kwargs)  # raises LDiffusionError naming the extra when timm is missing


def create_net(name: str, **kwargs: Any) -> nn.Module:
    """Build the registered net ``name``; ``None``-valued kwargs are dropped so the net's defaults win.

    Args:
        name: a name in ``NETS.names()``.
        **kwargs: constructor arguments, optionally ``preset=``.

    Raises:
        ConfigError: ``name`` is not registered (the message lists the choices).

    Example:
        >>> net = create_net("time_unet", preset="tiny", in_channels=4, out_channels=4, dropout=None)
        >>> type(net).__name__, net.base
        ('TimeUNet', 16)
    """
    constructor = NETS.get(name)
    return constructor(**{k: v for k, v in kwargs.items() if v is not None})
