"""ConvNeXt encoder (own implementation, timm-style feature API) + light FPN decoder for segmentation.

`ConvNeXtEncoder` follows ConvNeXt (Liu et al. 2022): patchify stem (conv k=s, stride s, then LayerNorm),
stages of blocks ``dwconv7x7 -> LayerNorm -> Linear(4d) -> GELU -> Linear(d) -> layer scale -> drop path``,
and LayerNorm + conv k2 s2 between stages. It exposes timm's contract: ``forward_features``,
``forward_intermediates`` and ``feature_info``. `ConvNeXtSegmenter` adds `FPNDecoder`, which fuses all stages
and upsamples the logits to the input size; ``head_stride`` (1 or 2, finer than the stem stride) adds
upsampling stages that each fuse the input, average-pooled to their stride, before the classifier.
`TimmSegmenter` does the same on any timm ``features_only`` backbone (optional ``timm`` extra).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldiffusion.core.errors import ConfigError, LDiffusionError
from ldiffusion.nets.blocks import check_input_shape, group_norm
from ldiffusion.nets.presets import lookup_preset

__all__ = [
    "CONVNEXT_PRESETS",
    "ConvNeXtBlock",
    "ConvNeXtEncoder",
    "ConvNeXtSegmenter",
    "DropPath",
    "FPNDecoder",
    "LayerNorm2d",
    "TimmSegmenter",
    "convnext_preset",
]

CONVNEXT_PRESETS: dict[str, dict[str, Any]] = {
    # METHODS Part 1 section 9. tiny uses a k2 s2 stem so 64 px tiles keep 32..4 px feature maps.
    "tiny": {"dims": (8, 16, 32, 32), "depths": (1, 1, 1, 1), "decoder_dim": 16, "stem_stride": 2},
    "small": {"dims": (32, 64, 128, 256), "depths": (1, 1, 3, 1), "decoder_dim": 64, "stem_stride": 4},
    # ConvNeXt-T; the stem maps the T-channel stack to 96 channels (k4 s4).
    "paper": {
        "dims": (96, 192, 384, 768),
        "depths": (3, 3, 9, 3),
        "decoder_dim": 256,
        "stem_stride": 4,
        "drop_path_rate": 0.1,
    },
}


def convnext_preset(name: str) -> dict[str, Any]:
    """Return the `ConvNeXtSegmenter` keyword arguments of preset ``name`` ("tiny" | "small" | "paper")."""
    return lookup_preset(CONVNEXT_PRESETS, "convnext", name)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel axis of (B, C, H, W) tensors (ConvNeXt "channels_first" norm)."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__(num_channels, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        """Normalise each position over C: (B, C, H, W) -> (B, C, H, W)."""
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class DropPath(nn.Module):
    """Stochastic depth: zero whole samples' residual branches with probability ``p`` while training.

    In eval mode (or with ``p == 0``) it is the identity and draws nothing. In training the per-sample
    mask comes from ``self.generator`` (None = torch's default generator); the training loop may set a
    generator on the input's device for reproducible runs.
    """

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ConfigError(f"DropPath: p must be in [0, 1), got {p}")
        self.p = p
        self.generator: torch.Generator | None = None

    def forward(self, x: Tensor) -> Tensor:
        """Apply stochastic depth to a residual branch x (B, ...)."""
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = torch.rand(shape, generator=self.generator, device=x.device, dtype=x.dtype) < keep
        return x * mask.to(x.dtype) / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class ConvNeXtBlock(nn.Module):
    """ConvNeXt block: dwconv7x7 -> LN -> Linear(4d) -> GELU -> Linear(d) -> layer scale -> drop path + x."""

    def __init__(self, dim: int, drop_path: float = 0.0, ls_init: float = 1e-6) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), ls_init))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        """(B, dim, H, W) -> (B, dim, H, W)."""
        h = self.dwconv(x).permute(0, 2, 3, 1)  # (B, H, W, dim)
        h = self.fc2(F.gelu(self.fc1(self.norm(h)))) * self.gamma
        return x + self.drop_path(h.permute(0, 3, 1, 2))


class ConvNeXtEncoder(nn.Module):
    """ConvNeXt backbone with timm's feature API.

    Stage ``i`` has ``dims[i]`` channels at stride ``stem_stride * 2**i``; inputs need H, W divisible
    by ``stem_stride * 2**(len(dims) - 1)``.

    Args:
        in_chans: input channels (T for the L-Diffusion grey-map stack, 3 for RGB).
        dims: stage widths.
        depths: blocks per stage.
        stem_stride: stem kernel and stride (4 as in ConvNeXt, 2 for small tiles).
        drop_path_rate: stochastic depth, linearly increasing from 0 to this value over all blocks.
        ls_init: layer-scale initial value.

    Attributes:
        feature_info: list of ``{"num_chs", "reduction", "module"}`` per stage.
    """

    def __init__(
        self,
        in_chans: int,
        dims: tuple[int, ...] = (96, 192, 384, 768),
        depths: tuple[int, ...] = (3, 3, 9, 3),
        stem_stride: int = 4,
        drop_path_rate: float = 0.0,
        ls_init: float = 1e-6,
    ) -> None:
        super().__init__()
        dims, depths = tuple(dims), tuple(depths)
        if not dims or len(dims) != len(depths) or stem_stride < 1:
            raise ConfigError(
                f"ConvNeXtEncoder: dims and depths must be non-empty and of equal length, stem_stride >= 1; "
                f"got dims={dims}, depths={depths}, stem_stride={stem_stride}"
            )
        self.in_chans, self.dims = in_chans, dims
        self.divisor = stem_stride * 2 ** (len(dims) - 1)
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, dims[0], stem_stride, stride=stem_stride), LayerNorm2d(dims[0])
        )
        n_blocks = sum(depths)
        rates = [drop_path_rate * j / max(n_blocks - 1, 1) for j in range(n_blocks)]  # linear 0 -> rate
        self.stages = nn.ModuleList()
        self.feature_info: list[dict[str, Any]] = []
        k = 0
        for i, (dim, depth) in enumerate(zip(dims, depths, strict=True)):
            down: list[nn.Module] = []
            if i > 0:
                down = [LayerNorm2d(dims[i - 1]), nn.Conv2d(dims[i - 1], dim, 2, stride=2)]
            blocks = [ConvNeXtBlock(dim, rates[k + j], ls_init) for j in range(depth)]
            k += depth
            self.stages.append(nn.Sequential(*down, *blocks))
            self.feature_info.append(
                {"num_chs": dim, "reduction": stem_stride * 2**i, "module": f"stages.{i}"}
            )

    def forward_intermediates(self, x: Tensor) -> list[Tensor]:
        """Return every stage's output: list of (B, dims[i], H / r_i, W / r_i).

        ``r_i = feature_info[i]["reduction"]``; H, W must be divisible by ``divisor``.
        """
        check_input_shape(x, self.divisor, "ConvNeXtEncoder", self.in_chans)
        h = self.stem(x)
        feats = []
        for stage in self.stages:
            h = stage(h)
            feats.append(h)
        return feats

    def forward_features(self, x: Tensor) -> Tensor:
        """Return the last stage's features (B, dims[-1], H / r, W / r)."""
        return self.forward_intermediates(x)[-1]

    def forward(self, x: Tensor) -> Tensor:
        """Same as `forward_features`."""
        return self.forward_features(x)


def _norm(kind: str, channels: int) -> nn.Module:
    """Return the decoder norm: "group" (GroupNorm over the tile) or "layer" (per-pixel LayerNorm2d)."""
    if kind == "group":
        return group_norm(channels)
    if kind == "layer":
        return LayerNorm2d(channels)
    raise ConfigError(f"decoder_norm={kind!r} is not valid; choose 'group' or 'layer'")


class _UpFuse(nn.Module):
    """x2 upsampling stage of a fine head: bilinear x2 of the decoder map, concatenated with a 3x3 conv
    of the input at that stride, then conv3x3-norm-GELU: (B, d_in, h, w) -> (B, d_out, 2h, 2w).
    """

    def __init__(self, dim_in: int, dim_out: int, in_chans: int, norm: str) -> None:
        super().__init__()
        self.skip = nn.Sequential(nn.Conv2d(in_chans, dim_out, 3, padding=1), _norm(norm, dim_out), nn.GELU())
        self.fuse = nn.Sequential(
            nn.Conv2d(dim_in + dim_out, dim_out, 3, padding=1, bias=False), _norm(norm, dim_out), nn.GELU()
        )

    def forward(self, h: Tensor, x_at: Tensor) -> Tensor:
        """Upsample `h` to `x_at`'s size (the input pooled to the new stride) and fuse both."""
        h = F.interpolate(h, size=x_at.shape[-2:], mode="bilinear", align_corners=False)
        return self.fuse(torch.cat([h, self.skip(x_at)], dim=1))


class FPNDecoder(nn.Module):
    """Light FPN head (Panoptic-FPN style): lateral 1x1 -> top-down nearest x2 sum -> 3x3 smooth ->
    bilinear resize of every level to the finest one -> sum -> conv3x3-norm-GELU -> 1x1 classifier.

    Args:
        in_channels: channels of each feature map, finest first.
        decoder_dim: width of the pyramid.
        num_classes: output classes K.
        norm: "group" (GroupNorm, default) or "layer" (per-pixel LayerNorm: no dependence on the tile).
        up_levels: x2 upsampling stages after the fuse (0 = logits at the finest feature stride); each
            fuses the input image / stack, so `forward` then needs ``image``.
        in_chans: channels of that input (with ``up_levels > 0``).
    """

    def __init__(
        self,
        in_channels: list[int] | tuple[int, ...],
        decoder_dim: int,
        num_classes: int,
        norm: str = "group",
        up_levels: int = 0,
        in_chans: int = 0,
    ) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, decoder_dim, 1) for c in in_channels)
        self.smooth = nn.ModuleList(nn.Conv2d(decoder_dim, decoder_dim, 3, padding=1) for _ in in_channels)
        self.fuse = nn.Sequential(
            nn.Conv2d(decoder_dim, decoder_dim, 3, padding=1, bias=False), _norm(norm, decoder_dim), nn.GELU()
        )
        dims = [decoder_dim] + [max(decoder_dim // 2 ** (i + 1), 8) for i in range(up_levels)]
        self.up = nn.ModuleList(_UpFuse(dims[i], dims[i + 1], in_chans, norm) for i in range(up_levels))
        self.classifier = nn.Conv2d(dims[-1], num_classes, 1)

    def forward(self, feats: list[Tensor], size: tuple[int, int], image: Tensor | None = None) -> Tensor:
        """Fuse ``feats`` (finest first) into logits (B, K, *size); ``image`` (B, in_chans, H, W) feeds the
        upsampling stages.
        """
        lat = [conv(f) for conv, f in zip(self.lateral, feats, strict=True)]
        for i in range(len(lat) - 2, -1, -1):
            lat[i] = lat[i] + F.interpolate(lat[i + 1], size=lat[i].shape[-2:], mode="nearest")
        target = lat[0].shape[-2:]
        fused = sum(
            F.interpolate(conv(p), size=target, mode="bilinear", align_corners=False) if i else conv(p)
            for i, (conv, p) in enumerate(zip(self.smooth, lat, strict=True))
        )
        h = self.fuse(fused)
        if len(self.up):
            if image is None:
                raise ConfigError("FPNDecoder: up_levels > 0 needs the input image")
            stride = image.shape[-1] // h.shape[-1]
            for up in self.up:
                stride //= 2
                h = up(h, F.avg_pool2d(image, stride) if stride > 1 else image)
        logits = self.classifier(h)
        if tuple(logits.shape[-2:]) == tuple(size):
            return logits
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


class ConvNeXtSegmenter(nn.Module):
    """ConvNeXt encoder + FPN decoder: (B, in_chans, H, W) -> logits (B, num_classes, H, W).

    Args:
        in_chans: input channels (T grey maps for L-Diffusion).
        num_classes: classes K (incl. background).
        dims, depths, stem_stride, drop_path_rate: see `ConvNeXtEncoder`.
        decoder_dim: FPN width.
        head_stride: stride of the logits before the final bilinear resize: None = ``stem_stride`` (the
            FPN's finest map), or a finer power-of-two divisor of it (1 = full resolution); each halving
            adds an `FPNDecoder` upsampling stage fed by the input.
        decoder_norm: "group" (GroupNorm) or "layer" (per-pixel LayerNorm2d) in the decoder.

    Example:
        >>> net = ConvNeXtSegmenter(3, 2, **convnext_preset("tiny"))
        >>> net(torch.zeros(1, 3, 64, 64)).shape
        torch.Size([1, 2, 64, 64])
    """

    def __init__(
        self,
        in_chans: int,
        num_classes: int,
        dims: tuple[int, ...] = (32, 64, 128, 256),
        depths: tuple[int, ...] = (1, 1, 3, 1),
        decoder_dim: int = 64,
        stem_stride: int = 4,
        drop_path_rate: float = 0.0,
        head_stride: int | None = None,
        decoder_norm: str = "group",
    ) -> None:
        super().__init__()
        self.in_chans, self.num_classes = in_chans, num_classes
        self.encoder = ConvNeXtEncoder(in_chans, dims, depths, stem_stride, drop_path_rate)
        head = stem_stride if head_stride is None else int(head_stride)
        if head < 1 or stem_stride % head or (stem_stride // head) & (stem_stride // head - 1):
            raise ConfigError(
                f"seg_head_stride={head_stride} is not valid for a segmenter with stem stride {stem_stride}; "
                f"use a power-of-two divisor of {stem_stride} (1 = full resolution) or None"
            )
        self.head_stride = head
        up = (stem_stride // head).bit_length() - 1
        self.decoder = FPNDecoder(
            [f["num_chs"] for f in self.encoder.feature_info],
            decoder_dim,
            num_classes,
            norm=decoder_norm,
            up_levels=up,
            in_chans=in_chans,
        )

    @property
    def feature_info(self) -> list[dict[str, Any]]:
        """The encoder's feature_info."""
        return self.encoder.feature_info

    def forward(self, x: Tensor) -> Tensor:
        """Segment x (B, in_chans, H, W), H, W divisible by ``encoder.divisor``; logits (B, K, H, W)."""
        return self.decoder(self.encoder.forward_intermediates(x), tuple(x.shape[-2:]), x)


class TimmSegmenter(nn.Module):
    """Any timm backbone (``features_only=True``) + `FPNDecoder`; needs the optional ``timm`` extra.

    Args:
        backbone_name: timm model name, e.g. ``"convnext_tiny"``.
        in_chans: input channels.
        num_classes: classes K.
        decoder_dim: FPN width.
        pretrained: load timm's pretrained weights (needs them cached locally or network access).
        **backbone_kwargs: passed to ``timm.create_model``.

    Raises:
        LDiffusionError: timm is not installed.
    """

    def __init__(
        self,
        backbone_name: str,
        in_chans: int,
        num_classes: int,
        decoder_dim: int = 128,
        pretrained: bool = False,
        **backbone_kwargs: Any,
    ) -> None:
        super().__init__()
        timm = import_timm()
        self.in_chans, self.num_classes = in_chans, num_classes
        self.encoder = timm.create_model(
            backbone_name, pretrained=pretrained, features_only=True, in_chans=in_chans, **backbone_kwargs
        )
        info = self.encoder.feature_info
        self.feature_info = [
            {"num_chs": c, "reduction": r, "module": m}
            for c, r, m in zip(info.channels(), info.reduction(), info.module_name(), strict=True)
        ]
        self.divisor = max(f["reduction"] for f in self.feature_info)
        self.decoder = FPNDecoder(info.channels(), decoder_dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Segment x (B, in_chans, H, W); returns logits (B, K, H, W)."""
        check_input_shape(x, self.divisor, "TimmSegmenter", self.in_chans)
        return self.decoder(list(self.encoder(x)), tuple(x.shape[-2:]))


def import_timm() -> Any:
    """Import timm or raise `LDiffusionError` naming the extra."""
    try:
        import timm
    except ImportError as e:
        raise LDiffusionError(
            f"TimmSegmenter needs the 'timm' extra: pip install \"ldiffusion[timm]\" (import failed: {e})"
        ) from e
    return timm
