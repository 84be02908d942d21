"""Context-independent normalisation for L-Diffusion's feature path (``feature_norm="fixed"``).

Why: the autoencoder and the U-Net normalise with GroupNorm over the whole tile and the U-Net attends over
the whole tile, so a pixel's feature stack depends on everything else in its tile (a slide tile holding
white glass shifts the tissue features; docs/slides.md). ``feature_norm="fixed"`` removes both causes at
feature time while training stays as it was:

* every ``nn.GroupNorm`` of the AE and the U-Net becomes a `CalibratedGroupNorm`. It normalises with the
  tile's own statistics while training (mode "tile", exactly ``nn.GroupNorm``). After stage 1 the method
  runs the feature chain on training crops in mode "calibrate", which records each group's per-tile mean
  and variance, averaged over the crops, **once per chain step** (slot k: the U-Net call and the decode
  of step k; the encoder uses slot 0), because the activations' statistics change with the timestep.
  In mode "fixed" the layer normalises with those recorded numbers: per pixel, no tile statistics.
* every `nets.blocks.SelfAttention2d` of the U-Net attends within windows of the training crop (mode
  "fixed" only); a tile no larger than the crop is one window, i.e. the attention it was trained with.
  Windows start at the tile's top-left corner, so tiles on a grid of the crop size see the same windows.

The departure: at feature time a tile is normalised with the mean statistics of training crops instead of
its own, so a crop whose statistics are typical gets nearly the features it had before, and an atypical
one (mostly glass) no longer shifts its neighbours. The module swap keeps every state-dict key of the
original layers and adds the buffers ``slot_mean``, ``slot_var`` (S, G) and ``slot_count`` (S,).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
from torch import Tensor, nn

from ldiffusion.core.errors import ConfigError
from ldiffusion.nets.blocks import SelfAttention2d

logger = logging.getLogger(__name__)

__all__ = [
    "CalibratedGroupNorm",
    "NormMode",
    "WindowedSelfAttention2d",
    "calibrated_norms",
    "finish_calibration",
    "install_context_free_norms",
    "is_calibrated",
    "norm_mode",
    "set_norm_slot",
]

NormMode = Literal["tile", "calibrate", "fixed"]


class CalibratedGroupNorm(nn.GroupNorm):
    """GroupNorm with per-slot statistics recorded on training crops.

    Args:
        num_groups, num_channels, eps, affine: as `nn.GroupNorm`.
        slots: number of statistic sets S (one per chain step).

    Attributes:
        mode: "tile" (plain GroupNorm), "calibrate" (plain GroupNorm, recording the statistics of slot
            `slot`) or "fixed" (normalise with the recorded statistics of slot `slot`).
        slot: the statistic set in use, 0 <= slot < S.
    """

    def __init__(
        self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True, slots: int = 1
    ) -> None:
        super().__init__(num_groups, num_channels, eps=eps, affine=affine)
        self.register_buffer("slot_mean", torch.zeros(slots, num_groups))
        self.register_buffer("slot_var", torch.ones(slots, num_groups))
        self.register_buffer("slot_count", torch.zeros(slots))
        self.mode: NormMode = "tile"
        self.slot = 0
        self._acc: dict[int, list[Tensor]] = {}

    @classmethod
    def from_group_norm(cls, gn: nn.GroupNorm, slots: int) -> CalibratedGroupNorm:
        """Return a copy of `gn` (same affine weights, same device and dtype) with `slots` slots."""
        new = cls(gn.num_groups, gn.num_channels, gn.eps, gn.affine, slots)
        if gn.affine:
            new.weight = gn.weight
            new.bias = gn.bias
        ref = gn.weight if gn.affine else None
        if ref is not None:
            new.slot_mean = new.slot_mean.to(ref.device)
            new.slot_var = new.slot_var.to(ref.device)
            new.slot_count = new.slot_count.to(ref.device)
        return new

    def _group_stats(self, x: Tensor) -> tuple[Tensor, Tensor]:
        xg = x.float().reshape(x.shape[0], self.num_groups, -1)
        return xg.mean(-1), xg.var(-1, unbiased=False)  # each (B, G)

    def forward(self, x: Tensor) -> Tensor:
        """Normalise x (B, C, H, W) according to `mode`; returns (B, C, H, W) in x's dtype."""
        if self.mode == "calibrate":
            with torch.no_grad():
                mean, var = self._group_stats(x)
                acc = self._acc.setdefault(self.slot, [mean.new_zeros(self.num_groups)] * 2 + [0])
                acc[0] = acc[0] + mean.sum(0)
                acc[1] = acc[1] + var.sum(0)
                acc[2] = acc[2] + x.shape[0]
            return super().forward(x)
        if self.mode == "fixed" and float(self.slot_count[self.slot]) > 0:
            B, C = x.shape[:2]
            mean = self.slot_mean[self.slot].float()[None, :, None]
            inv = torch.rsqrt(self.slot_var[self.slot].float() + self.eps)[None, :, None]
            y = ((x.float().reshape(B, self.num_groups, -1) - mean) * inv).reshape(x.shape)
            if self.affine:
                y = y * self.weight.float().view(1, C, *([1] * (x.ndim - 2)))
                y = y + self.bias.float().view(1, C, *([1] * (x.ndim - 2)))
            return y.to(x.dtype)
        return super().forward(x)

    def finish(self) -> None:
        """Store the recorded statistics (crop means of the per-crop mean and variance) in the buffers."""
        with torch.no_grad():
            for slot, (s_mean, s_var, n) in self._acc.items():
                if n:
                    self.slot_mean[slot] = (s_mean / n).to(self.slot_mean)
                    self.slot_var[slot] = (s_var / n).to(self.slot_var)
                    self.slot_count[slot] = float(n)
        self._acc = {}


class WindowedSelfAttention2d(SelfAttention2d):
    """`SelfAttention2d` that attends within windows of ``window`` cells while ``windowed`` is set.

    Installed by class swap (same parameters, same state-dict keys); windows start at the top-left
    corner and the last row / column of windows may be smaller. ``windowed=False`` is the original layer.
    """

    windowed: bool = False
    window: tuple[int, int] | None = None
    image_px: tuple[int, int] | None = None
    crop_px: int = 0

    def forward(self, x: Tensor) -> Tensor:
        """Attend over positions, per window when ``windowed``: (B, C, H, W) -> (B, C, H, W)."""
        win = self.window
        h, w = x.shape[-2:]
        if not self.windowed or win is None or (h <= win[0] and w <= win[1]):
            return super().forward(x)
        rows = []
        for y0 in range(0, h, win[0]):
            cols = [
                super(WindowedSelfAttention2d, self).forward(x[..., y0 : y0 + win[0], x0 : x0 + win[1]])
                for x0 in range(0, w, win[1])
            ]
            rows.append(torch.cat(cols, dim=-1))
        return torch.cat(rows, dim=-2)


def install_context_free_norms(root: nn.Module, slots: int) -> int:
    """Replace every `nn.GroupNorm` under `root` by a `CalibratedGroupNorm` and make the U-Net's
    `SelfAttention2d` windowable, in place (state-dict keys of existing tensors unchanged).

    Args:
        root: the autoencoder or the U-Net.
        slots: statistic sets per layer (T, the chain's steps).

    Returns:
        The number of GroupNorm layers replaced.
    """
    if slots < 1:
        raise ConfigError(f"install_context_free_norms: slots={slots} should be >= 1")
    n = 0
    for parent in list(root.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.GroupNorm) and not isinstance(child, CalibratedGroupNorm):
                setattr(parent, name, CalibratedGroupNorm.from_group_norm(child, slots))
                n += 1
    for mod in root.modules():
        if type(mod) is SelfAttention2d:
            mod.__class__ = WindowedSelfAttention2d
    return n


def calibrated_norms(*roots: nn.Module) -> list[CalibratedGroupNorm]:
    """Return every `CalibratedGroupNorm` under `roots`."""
    return [m for r in roots for m in r.modules() if isinstance(m, CalibratedGroupNorm)]


def is_calibrated(*roots: nn.Module) -> bool:
    """Return True when the layers under `roots` hold recorded statistics (any slot of any layer)."""
    norms = calibrated_norms(*roots)
    return bool(norms) and all(float(m.slot_count.sum()) > 0 for m in norms)


def set_norm_slot(roots: tuple[nn.Module, ...], slot: int) -> None:
    """Select statistic set `slot` in every `CalibratedGroupNorm` under `roots`."""
    for m in calibrated_norms(*roots):
        m.slot = min(int(slot), m.slot_mean.shape[0] - 1)


@contextmanager
def norm_mode(
    roots: tuple[nn.Module, ...], mode: NormMode, *, image_px: tuple[int, int] | None = None, crop_px: int = 0
) -> Iterator[None]:
    """Run a block with every calibrated layer under `roots` in `mode` (restored afterwards).

    Args:
        roots: modules holding `CalibratedGroupNorm` / windowed attention layers.
        mode: "tile", "calibrate" or "fixed".
        image_px: (H, W) of the images of the block (mode "fixed": sets the attention windows).
        crop_px: the training crop side; the attention window of a layer at stride r is crop_px / r.
    """
    norms = calibrated_norms(*roots)
    attns = [m for r in roots for m in r.modules() if isinstance(m, WindowedSelfAttention2d)]
    old = [(m.mode, m.slot) for m in norms]
    for m in norms:
        m.mode, m.slot = mode, 0
    for a in attns:
        a.windowed = mode == "fixed" and image_px is not None and crop_px > 0
        a.image_px, a.crop_px = image_px, crop_px
        a.window = None
    hooks = []
    if any(a.windowed for a in attns):

        def set_window(mod: WindowedSelfAttention2d, args: tuple[Tensor, ...]) -> None:
            h, w = args[0].shape[-2:]
            H, W = mod.image_px or (h, w)
            mod.window = (max(1, mod.crop_px * h // H), max(1, mod.crop_px * w // W))

        hooks = [a.register_forward_pre_hook(set_window) for a in attns]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()
        for m, (mo, sl) in zip(norms, old, strict=True):
            m.mode, m.slot = mo, sl
        for a in attns:
            a.windowed = False


def finish_calibration(*roots: nn.Module) -> int:
    """Store the recorded statistics of every calibrated layer under `roots`; return the layer count."""
    norms = calibrated_norms(*roots)
    for m in norms:
        m.finish()
    missing = sum(1 for m in norms if float(m.slot_count.sum()) == 0)
    if missing:
        logger.warning(
            "feature_norm=fixed: %d of %d GroupNorm layers saw no calibration data", missing, len(norms)
        )
    return len(norms)
