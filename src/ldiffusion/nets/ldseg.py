"""LDSeg networks: label encoder, image encoder, latent denoiser and label decoder (METHODS Part 2 §2).

All four modules work on NCHW float32 tensors; the latent is one channel (the paper's; `latent_channels`
and `image_latent_channels` widen z0 and z_i) at 1/s of the input size
(``h = H/s``, ``w = W/s``) for the latent stride s = 16 (paper, default), 8 or 4 (``latent_stride``;
the encoders drop their last down-samplings and the decoder its first up-samplings). The denoiser
halves the latent twice more, so H and W must be divisible by 4 s (64 at s = 16). All activations
are SiLU. Layer layouts follow the authors' Keras code [C:model.py]
(channels-last there); widths come from `ldseg_preset` (METHODS Part 2 §7).

- `LabelEncoder`: one-hot (default) or index map -> 5 residual blocks with 4 max-pools -> conv1x1(->1)
  -> per-sample LayerNorm over (C, h, w), eps 1e-3, **without** affine by default, so every latent has
  mean 0 and std 1 (the code's learnable element-wise affine is `latent_affine=True`).
- `ImageEncoder`: stem conv -> 4 down blocks (residual + stride-2 conv + GroupNorm(4)); multi-head
  self-attention (`F.scaled_dot_product_attention`) after the last two -> conv1x1(->1, zero-init)
  -> one-unit attention -> SiLU -> BatchNorm(1).
- `LDSegDenoiser`: DDPM U-Net (Keras DDPM example) on ``[z_t || z_i]`` with a sinusoidal embedding of
  the raw step t, predicting eps (B, 1, h, w).
- `LabelDecoder`: 4 x [ConvTranspose2d(k3, s2) -> residual block] -> SiLU -> conv1x1(->K) ->
  BatchNorm(K); returns logits (softmax is applied by the method).
- The parameter-free replacements of the two encoders in the paper's Table V ablation live in
  `ldiffusion.nets.ldseg_nearest`.

Example:
    >>> p = ldseg_preset("tiny")
    >>> nets = build_ldseg_nets(p, num_classes=2, in_channels=3)
    >>> x = torch.rand(2, 3, 64, 64)
    >>> nets["image_encoder"](x).shape
    torch.Size([2, 1, 4, 4])
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldiffusion.core.errors import ConfigError, InputError
from ldiffusion.nets.presets import lookup_preset

__all__ = [
    "LDSEG_PRESETS",
    "LDSEG_SIZE_DIVISOR",
    "ImageEncoder",
    "LDSegDenoiser",
    "LabelDecoder",
    "LabelEncoder",
    "build_ldseg_nets",
    "check_ldseg_input",
    "ldseg_preset",
    "ldseg_size_divisor",
    "ldseg_timestep_embedding",
]

#: H and W of LDSeg inputs must be multiples of this (16 in the encoders, x4 in the denoiser).
LDSEG_SIZE_DIVISOR = 64
#: the encoders and the decoder change the resolution by this factor (paper default).
LATENT_FACTOR = 16
#: label-latent strides the networks support (1/16 paper; 1/8 and 1/4 keep more label detail).
LATENT_STRIDES = (4, 8, 16)

#: the widths of the authors' code [C:model.py], used by the `small` and `paper` presets.
_CODE_WIDTHS: dict[str, Any] = {
    "label_widths": (16, 32, 64, 64, 32),
    "image_stem": 16,
    "image_widths": (32, 64, 64, 32),
    "image_heads": 8,
    "decoder_widths": (32, 64, 64, 32),
    "denoiser_stem": 16,
    "denoiser_widths": (16, 32, 64),
    "temb_dim": 64,
    "dropout": 0.2,
}

LDSEG_PRESETS: dict[str, dict[str, Any]] = {
    # METHODS Part 2 §7. tiny: 64 px -> latent 4x4; CPU unit tests.
    "tiny": {
        "label_widths": (8, 16, 32, 32, 16),
        "image_stem": 8,
        "image_widths": (16, 32, 32, 16),
        "image_heads": 4,
        "decoder_widths": (16, 32, 32, 16),
        "denoiser_stem": 8,
        "denoiser_widths": (8, 16, 32),
        "temb_dim": 32,
        "dropout": 0.0,
    },
    # small: the paper's widths at 256 px -> latent 16x16 (GlaS resized), CPU minutes.
    "small": dict(_CODE_WIDTHS),
    # paper: the code's widths [C:model.py]; 512 px -> latent 32x32.
    "paper": dict(_CODE_WIDTHS),
}


def ldseg_preset(name: str) -> dict[str, Any]:
    """Return the widths of LDSeg preset ``name`` ("tiny" | "small" | "paper") as keyword arguments.

    Keys: ``label_widths`` (5), ``image_stem``, ``image_widths`` (4), ``image_heads``,
    ``decoder_widths`` (4), ``denoiser_stem``, ``denoiser_widths`` (3), ``temb_dim``, ``dropout``.

    Raises:
        ConfigError: unknown preset name.

    Example:
        >>> ldseg_preset("paper")["denoiser_widths"]
        (16, 32, 64)
    """
    return lookup_preset(LDSEG_PRESETS, "ldseg", name)


def ldseg_size_divisor(latent_stride: int = LATENT_FACTOR) -> int:
    """Return the multiple H and W must have for latent stride s: 4 s (s in the encoders, x4 in the denoiser).

    Raises:
        ConfigError: s is not one of 4, 8, 16.

    Example:
        >>> ldseg_size_divisor(16), ldseg_size_divisor(4)
        (64, 16)
    """
    if latent_stride not in LATENT_STRIDES:
        raise ConfigError(f"latent_stride={latent_stride!r} is not valid; "
                          f"choose one of {list(LATENT_STRIDES)}")
    return 4 * latent_stride


def _n_down(latent_stride: int) -> int:
    ldseg_size_divisor(latent_stride)  # validates
    return round(math.log2(latent_stride))


def check_ldseg_input(x: Tensor, name: str, channels: int | None = None,
                      divisor: int = LDSEG_SIZE_DIVISOR) -> None:
    """Raise `InputError` unless ``x`` is (B, C, H, W) with H, W divisible by ``divisor``.

    Args:
        x: input tensor.
        name: model name used in the message.
        channels: expected C, or None to skip that check.
        divisor: 4 x the latent stride (64 at the paper's 1/16; `ldseg_size_divisor`).
    """
    if x.ndim != 4:
        raise InputError(f"{name}: expected (B, C, H, W), got shape {tuple(x.shape)}")
    if channels is not None and x.shape[1] != channels:
        raise InputError(f"{name}: expected (B, {channels}, H, W), got {tuple(x.shape)}")
    h, w = x.shape[-2:]
    d = divisor
    if h % d or w % d:
        ph, pw = -(-h // d) * d, -(-w // d) * d
        raise InputError(
            f"{name}: expected (B, C, H, W) with H, W divisible by {d} (LDSeg: {d // 4}x down-sampling to "
            f"the latent, then 4x inside the denoiser), got {tuple(x.shape)}; pad or crop to ({ph}, {pw})"
        )


def ldseg_timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Embed raw steps with the Keras-DDPM sinusoid ``[sin || cos]``, freqs ``exp(-ln(P) k / (half-1))``.

    Args:
        t: steps (B,), int or float (raw index 0..T-1; non-integer values are fine).
        dim: even embedding width >= 4.
        max_period: P.

    Returns:
        (B, dim) float32.
    """
    if t.ndim != 1:
        raise InputError(f"ldseg_timestep_embedding: expected t of shape (B,), got {tuple(t.shape)}")
    if dim < 4 or dim % 2:
        raise ConfigError(f"temb_dim={dim} should be an even number >= 4")
    half = dim // 2
    k = torch.arange(half, device=t.device, dtype=torch.float32)
    freqs = torch.exp(-math.log(max_period) * k / (half - 1))
    args = t.to(torch.float32)[:, None] * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


def _zero(m: nn.Module) -> nn.Module:
    for p in m.parameters():
        nn.init.zeros_(p)
    return m


def _glorot(m: nn.Module) -> nn.Module:
    """Glorot-uniform weights, zero bias (Keras VarianceScaling fan_avg) for every conv/linear in ``m``."""
    for mod in m.modules():
        if isinstance(mod, (nn.Conv2d, nn.Linear, nn.ConvTranspose2d)):
            nn.init.xavier_uniform_(mod.weight)
            if mod.bias is not None:
                nn.init.zeros_(mod.bias)
    return m


def _gn(channels: int, groups: int) -> nn.GroupNorm:
    g = max(1, min(groups, channels))
    while channels % g:
        g -= 1
    return nn.GroupNorm(g, channels, eps=1e-3)  # Keras GroupNormalization epsilon


class ResConvBlock(nn.Module):
    """ResUNet block RB(c) [C:model.res_conv_block]: conv3-BN-SiLU-conv3-BN-Dropout + (conv1-BN) -> SiLU.

    He-uniform initialised convolutions. (B, in_ch, H, W) -> (B, out_ch, H, W).
    """

    def __init__(self, in_ch: int, out_ch: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_ch, out_ch, 3, padding=1),
            nn.BatchNorm2d(out_ch),
            nn.SiLU(),
            nn.Conv2d(out_ch, out_ch, 3, padding=1),
            nn.BatchNorm2d(out_ch),
            nn.Dropout(dropout),
        )
        self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1), nn.BatchNorm2d(out_ch))
        for mod in self.modules():
            if isinstance(mod, nn.Conv2d):
                nn.init.kaiming_uniform_(mod.weight, nonlinearity="relu")
                nn.init.zeros_(mod.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the block."""
        return F.silu(self.body(x) + self.shortcut(x))


class LabelEncoder(nn.Module):
    """Map a label map to the standardised latent z0 (B, C_z, H/s, W/s), s = ``latent_stride``.

    RB(w0)@H -> maxpool -> RB(w1) -> maxpool -> RB(w2) -> maxpool -> RB(w3) -> maxpool -> RB(w4)@H/16
    -> conv1x1(->C_z) -> LayerNorm over (C, h, w) per sample, eps 1e-3. C_z = 1 in the paper. With
    s = 8 (4) the last one (two) max-pools are left out, so the last blocks run at H/s.

    Args:
        num_classes: K (classes incl. background).
        widths: 5 block widths (preset ``label_widths``).
        label_input: "onehot" (default, K channels) or "index" (the class id as 1 float channel, as in
            the code; imposes an order on multi-class labels).
        latent_affine: learnable element-wise affine of shape (1, h, w) after the LayerNorm (code);
            needs ``latent_hw``. Off by default so z0 has exactly mean 0, std 1 per sample.
        latent_hw: (h, w) of the latent; only used with ``latent_affine``.
        dropout: dropout in the residual blocks.
        ignore_index: label value of unlabelled pixels; they become all-zero one-hot vectors (index 0
            with "index").
        eps: LayerNorm epsilon (1e-3 as in Keras); the per-sample std of z0 is sqrt(v / (v + eps)) for
            a pre-norm variance v, i.e. 1 up to ~eps / (2 v).
        latent_stride: s in (4, 8, 16); 16 = the paper's four down-samplings.
        latent_channels: C_z, channels of the latent (1 = paper).
    """

    def __init__(
        self,
        num_classes: int,
        widths: tuple[int, ...] = (16, 32, 64, 64, 32),
        *,
        label_input: Literal["onehot", "index"] = "onehot",
        latent_affine: bool = False,
        latent_hw: tuple[int, int] | None = None,
        dropout: float = 0.0,
        ignore_index: int = 255,
        eps: float = 1e-3,
        latent_stride: int = LATENT_FACTOR,
        latent_channels: int = 1,
    ) -> None:
        super().__init__()
        if len(widths) != 5:
            raise ConfigError(f"LabelEncoder: widths={widths} should have 5 entries (4 down-samplings)")
        if label_input not in ("onehot", "index"):
            raise ConfigError(f"label_input={label_input!r} is not valid; choose one of ['index', 'onehot']")
        if latent_affine and latent_hw is None:
            raise ConfigError(
                "LabelEncoder: latent_affine=True needs latent_hw=(h, w) (the code's affine "
                "is element-wise over the latent)"
            )
        self.num_classes = int(num_classes)
        self.label_input = label_input
        self.ignore_index = ignore_index
        self.n_down = _n_down(latent_stride)
        self.divisor = ldseg_size_divisor(latent_stride)
        in_ch = self.num_classes if label_input == "onehot" else 1
        blocks = []
        for w in widths:
            blocks.append(ResConvBlock(in_ch, w, dropout))
            in_ch = w
        self.blocks = nn.ModuleList(blocks)
        self.out = nn.Conv2d(in_ch, latent_channels, 1)
        self.eps = float(eps)
        if latent_affine:
            assert latent_hw is not None
            self.weight: nn.Parameter | None = nn.Parameter(torch.ones(1, *latent_hw))
            self.bias: nn.Parameter | None = nn.Parameter(torch.zeros(1, *latent_hw))
        else:
            self.weight = None
            self.bias = None

    def encode_input(self, label: Tensor) -> Tensor:
        """Turn labels (B, H, W) int64 into the network input (B, K or 1, H, W) float32."""
        if label.ndim != 3:
            raise InputError(f"LabelEncoder: expected labels (B, H, W), got {tuple(label.shape)}")
        valid = (label != self.ignore_index) & (label >= 0) & (label < self.num_classes)
        safe = torch.where(valid, label, torch.zeros_like(label))
        if self.label_input == "index":
            return safe.float().unsqueeze(1)
        onehot = F.one_hot(safe, self.num_classes).permute(0, 3, 1, 2).float()
        return onehot * valid.unsqueeze(1).float()

    def forward(self, label: Tensor) -> Tensor:
        """Encode labels (B, H, W) int64 (H, W divisible by 4 s) into z0 (B, C_z, H/s, W/s)."""
        x = self.encode_input(label)
        check_ldseg_input(x, "LabelEncoder", divisor=self.divisor)
        for i, block in enumerate(self.blocks):
            if 0 < i <= self.n_down:
                x = F.max_pool2d(x, 2)
            x = block(x)
        z = self.out(x)
        mean = z.mean(dim=(1, 2, 3), keepdim=True)
        var = z.var(dim=(1, 2, 3), unbiased=False, keepdim=True)
        z = (z - mean) / torch.sqrt(var + self.eps)
        if self.weight is not None and self.bias is not None:
            if tuple(self.weight.shape[1:]) != tuple(z.shape[2:]):
                raise InputError(
                    f"LabelEncoder: latent_affine was built for a latent of "
                    f"{tuple(self.weight.shape[1:])}, got {tuple(z.shape[2:])}"
                )
            z = z * self.weight + self.bias
        return z


class MHSA2d(nn.Module):
    """Multi-head self-attention over positions [C:model.ImgEncoder]: GN -> Linear q,k,v -> SDPA ->
    Linear (zero-init) -> + input. (B, C, H, W) -> (B, C, H, W).

    Args:
        ch: channels (= units).
        heads: heads; ``ch`` must be divisible by it.
        groups: GroupNorm groups (8 in the code; 1 for the one-unit output attention).
    """

    def __init__(self, ch: int, heads: int, groups: int = 8) -> None:
        super().__init__()
        if heads < 1 or ch % heads:
            raise ConfigError(f"MHSA2d: channels {ch} must be divisible by heads={heads}")
        self.heads = heads
        self.norm = _gn(ch, groups)
        self.qkv = _glorot(nn.Linear(ch, 3 * ch))
        self.proj = _zero(nn.Linear(ch, ch))

    def forward(self, x: Tensor) -> Tensor:
        """Attend over the H*W positions."""
        b, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        q, k, v = self.qkv(tokens).reshape(b, h * w, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, HW, d); scale 1/sqrt(d)
        out = self.proj(out.transpose(1, 2).reshape(b, h * w, c))
        return x + out.transpose(1, 2).reshape(b, c, h, w)


class _DownBlock(nn.Module):
    """Image-encoder down block DB(c): r=conv1(x); h=SiLU-conv3-Dropout-SiLU-conv3(zero); SiLU(h+r)
    -> conv3 stride 2 (stride 1 with ``down=False``) -> GroupNorm(4)."""

    def __init__(self, in_ch: int, out_ch: int, dropout: float, down: bool = True) -> None:
        super().__init__()
        self.res = nn.Conv2d(in_ch, out_ch, 1)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.drop = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.down = nn.Conv2d(out_ch, out_ch, 3, stride=2 if down else 1, padding=1)
        _glorot(self)
        _zero(self.conv2)
        self.norm = _gn(out_ch, 4)

    def forward(self, x: Tensor) -> Tensor:
        """(B, in, H, W) -> (B, out, H/2, W/2) (H, W when not down-sampling)."""
        h = self.conv2(F.silu(self.drop(self.conv1(F.silu(x)))))
        return self.norm(self.down(F.silu(h + self.res(x))))


class ImageEncoder(nn.Module):
    """Map images (B, C_in, H, W) to the image embedding z_i (B, C_i, H/s, W/s), s = ``latent_stride``.

    stem conv3(s) -> DB(c1) -> DB(c2) -> DB(c3) + MHSA(c3) -> DB(c4) + MHSA(c4) -> conv1(->C_i, zero-init)
    -> MHSA(C_i units, 1 head, GN 1 group) -> SiLU -> BatchNorm(C_i). C_i = 1 in the paper. With
    s = 8 (4) the last one (two) down blocks keep their resolution (stride-1 conv), so both MHSA
    layers run at H/s at s = 4:
    (H/4)^2 tokens, which is heavy at large crops.

    Args:
        in_channels: image channels.
        stem: stem width.
        widths: 4 down-block widths (preset ``image_widths``).
        heads: heads of the two MHSA layers.
        dropout: dropout in the down blocks.
        latent_stride: s in (4, 8, 16).
        out_channels: C_i, channels of z_i (1 = paper).
    """

    def __init__(
        self,
        in_channels: int = 3,
        stem: int = 16,
        widths: tuple[int, ...] = (32, 64, 64, 32),
        heads: int = 8,
        dropout: float = 0.0,
        latent_stride: int = LATENT_FACTOR,
        out_channels: int = 1,
    ) -> None:
        super().__init__()
        if len(widths) != 4:
            raise ConfigError(f"ImageEncoder: widths={widths} should have 4 entries (4 down-samplings)")
        self.in_channels = in_channels
        n_down = _n_down(latent_stride)
        self.divisor = ldseg_size_divisor(latent_stride)
        self.stem = _glorot(nn.Conv2d(in_channels, stem, 3, padding=1))
        downs, attns = [], []
        ch = stem
        for i, w in enumerate(widths):
            downs.append(_DownBlock(ch, w, dropout, down=i < n_down))
            attns.append(MHSA2d(w, heads, groups=8) if i >= 2 else nn.Identity())
            ch = w
        self.downs = nn.ModuleList(downs)
        self.attns = nn.ModuleList(attns)
        self.out = _zero(nn.Conv2d(ch, out_channels, 1))
        self.out_attn = MHSA2d(out_channels, 1, groups=1)
        self.out_bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        """Encode images (B, C_in, H, W), H, W divisible by 4 s, into z_i (B, C_i, H/s, W/s)."""
        check_ldseg_input(x, "ImageEncoder", self.in_channels, self.divisor)
        h = self.stem(x)
        for down, attn in zip(self.downs, self.attns, strict=True):
            h = attn(down(h))
        return self.out_bn(F.silu(self.out_attn(self.out(h))))


class _TimeResBlock(nn.Module):
    """Denoiser ResBlock: GN(4)-SiLU-conv3 + Linear(SiLU(temb)) -> GN(4)-SiLU-conv3 (zero) + residual."""

    def __init__(self, in_ch: int, out_ch: int, temb_dim: int) -> None:
        super().__init__()
        self.norm1 = _gn(in_ch, 4)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb = nn.Linear(temb_dim, out_ch)
        self.norm2 = _gn(out_ch, 4)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip: nn.Module = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()
        _glorot(self)
        _zero(self.conv2)

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        """Apply the block; temb (B, temb_dim)."""
        h = self.conv1(F.silu(self.norm1(x))) + self.temb(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class _Attn(nn.Module):
    """Single-head attention: GN(4) -> q, k, v -> softmax(q k^T / sqrt(c)) v -> proj (zero) + x."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.inner = MHSA2d(ch, 1, groups=4)

    def forward(self, x: Tensor) -> Tensor:
        """Attend over positions."""
        return self.inner(x)


class LDSegDenoiser(nn.Module):
    """DDPM U-Net predicting eps (B, C_z, h, w) from ``[z_t || z_i]`` (B, C_z + C_i, h, w) and steps t (B,).

    Levels with widths (w0, w1, w2), attention at levels 1 and 2, 2 ResBlocks per level down, a
    stride-2 conv after levels 0 and 1; middle ResBlock -> Attn -> ResBlock; 3 ResBlocks per level up,
    each after concatenating one of the 9 skips; nearest x2 + conv3 between levels; head
    GN(4) -> SiLU -> conv3(->1). Time: sinusoid(t) -> Linear -> SiLU -> Linear.

    Args:
        in_channels: input channels, C_z + C_i (2 in the paper: z_t and z_i).
        stem: stem width.
        widths: 3 level widths.
        temb_dim: time-embedding width.
        num_res_blocks: ResBlocks per level on the way down (up: +1).
        out_channels: C_z, channels of the predicted eps (1 = paper).
    """

    def __init__(
        self,
        in_channels: int = 2,
        stem: int = 16,
        widths: tuple[int, ...] = (16, 32, 64),
        temb_dim: int = 64,
        num_res_blocks: int = 2,
        out_channels: int = 1,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.temb_dim = temb_dim
        attn = [i > 0 for i in range(len(widths))]
        self.stem = nn.Conv2d(in_channels, stem, 3, padding=1)
        self.time_mlp = nn.Sequential(nn.Linear(temb_dim, temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim))
        self.down_blocks = nn.ModuleList()
        self.down_attn = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        skip_ch = [stem]
        ch = stem
        for i, w in enumerate(widths):
            for _ in range(num_res_blocks):
                self.down_blocks.append(_TimeResBlock(ch, w, temb_dim))
                self.down_attn.append(_Attn(w) if attn[i] else nn.Identity())
                ch = w
                skip_ch.append(ch)
            if i < len(widths) - 1:
                self.downsamples.append(nn.Conv2d(ch, w, 3, stride=2, padding=1))
                skip_ch.append(w)
        self.mid1 = _TimeResBlock(ch, widths[-1], temb_dim)
        self.mid_attn = _Attn(widths[-1])
        self.mid2 = _TimeResBlock(widths[-1], widths[-1], temb_dim)
        ch = widths[-1]
        self.up_blocks = nn.ModuleList()
        self.up_attn = nn.ModuleList()
        self.upsamples = nn.ModuleList()
        for i in reversed(range(len(widths))):
            for _ in range(num_res_blocks + 1):
                self.up_blocks.append(_TimeResBlock(ch + skip_ch.pop(), widths[i], temb_dim))
                self.up_attn.append(_Attn(widths[i]) if attn[i] else nn.Identity())
                ch = widths[i]
            if i > 0:
                self.upsamples.append(nn.Conv2d(ch, widths[i], 3, padding=1))
        self.head_norm = _gn(ch, 4)
        self.head = nn.Conv2d(ch, out_channels, 3, padding=1)
        self.num_res_blocks = num_res_blocks
        self.num_levels = len(widths)
        # Glorot everywhere except the zero-initialised layers set inside the blocks.
        for mod in [self.stem, self.time_mlp, *self.downsamples, *self.upsamples, self.head]:
            _glorot(mod)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        """Predict eps (B, C_z, h, w) from x = [z_t || z_i] (B, C_z + C_i, h, w), h, w % 4 == 0, t (B,)."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise InputError(f"LDSegDenoiser: expected (B, {self.in_channels}, h, w), got {tuple(x.shape)}")
        f = 2 ** (self.num_levels - 1)
        if x.shape[-2] % f or x.shape[-1] % f:
            raise InputError(
                f"LDSegDenoiser: latent h, w must be divisible by {f}, got {tuple(x.shape)}; "
                f"the image size must be divisible by {LDSEG_SIZE_DIVISOR}"
            )
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        temb = self.time_mlp(ldseg_timestep_embedding(t.to(x.device), self.temb_dim).to(x.dtype))
        h = self.stem(x)
        skips = [h]
        k = 0
        for i in range(self.num_levels):
            for _ in range(self.num_res_blocks):
                h = self.down_attn[k](self.down_blocks[k](h, temb))
                skips.append(h)
                k += 1
            if i < self.num_levels - 1:
                h = self.downsamples[i](h)
                skips.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, temb)), temb)
        k = 0
        for j, _i in enumerate(reversed(range(self.num_levels))):
            for _ in range(self.num_res_blocks + 1):
                h = self.up_attn[k](self.up_blocks[k](torch.cat([h, skips.pop()], dim=1), temb))
                k += 1
            if j < self.num_levels - 1:
                h = self.upsamples[j](F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.head(F.silu(self.head_norm(h)))


class LabelDecoder(nn.Module):
    """Decode a latent (B, C_z, h, w) into class logits (B, K, s h, s w), s = ``latent_stride``.

    4 x [ConvTranspose2d(k3, s2, p1, output_padding 1)(c) -> RB(c)] -> SiLU -> conv1x1(->K) ->
    BatchNorm(K) (code-only, ``out_bn``). Softmax over K gives the paper's output. With s = 8 (4)
    the first one (two) transposed convolutions become stride-1 conv3x3, so those blocks run at the
    latent resolution.

    Args:
        num_classes: K.
        widths: 4 widths (preset ``decoder_widths``).
        dropout: dropout in the residual blocks.
        out_bn: BatchNorm on the logits as in the code.
        latent_stride: s in (4, 8, 16).
        latent_channels: C_z (1 = paper).
        skip_channels: {stride: channels} of image features concatenated before the block whose output
            has that stride (not in the paper, whose decoder has no skips; `decoder_skips`). None = none.
    """

    def __init__(
        self,
        num_classes: int,
        widths: tuple[int, ...] = (32, 64, 64, 32),
        dropout: float = 0.0,
        out_bn: bool = True,
        latent_stride: int = LATENT_FACTOR,
        latent_channels: int = 1,
        skip_channels: dict[int, int] | None = None,
    ) -> None:
        super().__init__()
        if len(widths) != 4:
            raise ConfigError(f"LabelDecoder: widths={widths} should have 4 entries (4 up-samplings)")
        n_keep = len(widths) - _n_down(latent_stride)  # blocks at the latent resolution come first
        ups: list[nn.Module] = []
        blocks = []
        self.latent_channels = int(latent_channels)
        self.skip_channels = dict(skip_channels or {})
        #: stride of each block's output
        self.block_strides = [latent_stride if i < n_keep else latent_stride >> (i - n_keep + 1)
                              for i in range(len(widths))]
        ch = self.latent_channels
        for i, w in enumerate(widths):
            if i < n_keep:
                ups.append(nn.Conv2d(ch, w, 3, padding=1))
            else:
                ups.append(nn.ConvTranspose2d(ch, w, 3, stride=2, padding=1, output_padding=1))
            blocks.append(ResConvBlock(w + self.skip_channels.get(self.block_strides[i], 0), w, dropout))
            ch = w
        self.ups = nn.ModuleList(ups)
        self.blocks = nn.ModuleList(blocks)
        self.out = nn.Conv2d(ch, num_classes, 1)
        self.out_bn: nn.Module = nn.BatchNorm2d(num_classes) if out_bn else nn.Identity()

    def forward(self, z: Tensor, skips: dict[int, Tensor] | None = None) -> Tensor:
        """Return logits (B, K, s h, s w) for a latent z (B, C_z, h, w) and, with `skip_channels`, the
        image features ``skips`` {stride: (B, skip_channels[stride], s h / stride, s w / stride)}."""
        if z.ndim != 4 or z.shape[1] != self.latent_channels:
            raise InputError(f"LabelDecoder: expected a latent (B, {self.latent_channels}, h, w), "
                             f"got {tuple(z.shape)}")
        if set(self.skip_channels) - set(skips or {}):
            raise InputError(f"LabelDecoder: needs image features at strides {sorted(self.skip_channels)}, "
                             f"got {sorted(skips or {})}")
        h = z
        for up, block, stride in zip(self.ups, self.blocks, self.block_strides, strict=True):
            h = up(h)
            if stride in self.skip_channels:
                h = torch.cat([h, skips[stride].to(h.dtype)], dim=1)  # type: ignore[index]
            h = block(h)
        return self.out_bn(self.out(F.silu(h)))


def build_ldseg_nets(
    preset: dict[str, Any],
    num_classes: int,
    in_channels: int = 3,
    *,
    label_input: Literal["onehot", "index"] = "onehot",
    latent_affine: bool = False,
    latent_hw: tuple[int, int] | None = None,
    dropout: float | None = None,
    decoder_bn: bool = True,
    latent_stride: int = LATENT_FACTOR,
    label_downsampler: Literal["encoder", "nearest"] = "encoder",
    image_downsampler: Literal["encoder", "nearest", "resnet18", "resnet34"] = "encoder",
    latent_channels: int = 1,
    image_latent_channels: int = 1,
    decoder_skips: bool = False,
) -> nn.ModuleDict:
    """Build the four LDSeg modules from a preset dict (see `ldseg_preset`).

    Args:
        preset: widths (`ldseg_preset`).
        num_classes: K.
        in_channels: image channels.
        label_input, latent_affine, latent_hw, dropout, decoder_bn: see `LabelEncoder` / `LabelDecoder`.
        latent_stride: s in (4, 8, 16): the latent is (H/s, W/s).
        label_downsampler: "encoder" (learned `LabelEncoder`) or "nearest" (`NearestLabelDownsampler`,
            Table V).
        image_downsampler: "encoder" (learned `ImageEncoder`), "nearest" (`NearestImageDownsampler`) or
            "resnet18" / "resnet34" (`ldseg_resnet.ResNetImageEncoder`, not in the paper).
        latent_channels: C_z, channels of the label latent (1 = paper; the "nearest" label down-sampler
            gives 1).
        image_latent_channels: C_i, channels of the image condition z_i (1 = paper; the "nearest" image
            down-sampler gives 1).
        decoder_skips: the label decoder also receives the ResNet image encoder's features finer than the
            latent (not in the paper; needs ``image_downsampler`` "resnet18" / "resnet34").

    Returns:
        ``ModuleDict`` with keys "label_encoder", "image_encoder", "denoiser", "decoder".
    """
    p = dict(preset)
    drop = float(p["dropout"] if dropout is None else dropout)
    if label_downsampler not in ("encoder", "nearest"):
        raise ConfigError(f"label_downsampler={label_downsampler!r} is not valid; choose one of "
                          "['encoder', 'nearest']")
    if image_downsampler not in ("encoder", "nearest", "resnet18", "resnet34"):
        raise ConfigError(f"image_downsampler={image_downsampler!r} is not valid; choose one of "
                          "['encoder', 'nearest', 'resnet18', 'resnet34']")
    for key, value, sampler in (("latent_channels", latent_channels, label_downsampler),
                                ("image_latent_channels", image_latent_channels, image_downsampler)):
        if int(value) < 1:
            raise ConfigError(f"{key}={value} should be >= 1")
        if sampler == "nearest" and int(value) != 1:
            raise ConfigError(f"{key}={value} needs a learned down-sampler: 'nearest' gives 1 channel")
    if decoder_skips and not image_downsampler.startswith("resnet"):
        raise ConfigError(f"decoder_skips needs image_downsampler 'resnet18' or 'resnet34', got "
                          f"{image_downsampler!r}")
    from ldiffusion.nets.ldseg_nearest import (  # imports this module
        NearestImageDownsampler,
        NearestLabelDownsampler,
    )

    label_enc: nn.Module
    if label_downsampler == "nearest":
        label_enc = NearestLabelDownsampler(num_classes, latent_stride)
    else:
        label_enc = LabelEncoder(
            num_classes,
            tuple(p["label_widths"]),
            label_input=label_input,
            latent_affine=latent_affine,
            latent_hw=latent_hw,
            dropout=drop,
            latent_stride=latent_stride,
            latent_channels=latent_channels,
        )
    image_enc: nn.Module
    if image_downsampler == "nearest":
        image_enc = NearestImageDownsampler(in_channels, latent_stride)
    elif image_downsampler.startswith("resnet"):
        from ldiffusion.nets.ldseg_resnet import ResNetImageEncoder  # imports this module

        image_enc = ResNetImageEncoder(in_channels, latent_stride, image_downsampler,
                                       out_channels=image_latent_channels)
    else:
        image_enc = ImageEncoder(in_channels, p["image_stem"], tuple(p["image_widths"]), p["image_heads"],
                                 drop, latent_stride=latent_stride, out_channels=image_latent_channels)
    return nn.ModuleDict(
        {
            "label_encoder": label_enc,
            "image_encoder": image_enc,
            "denoiser": LDSegDenoiser(latent_channels + image_latent_channels, p["denoiser_stem"],
                                      tuple(p["denoiser_widths"]), p["temb_dim"],
                                      out_channels=latent_channels),
            "decoder": LabelDecoder(num_classes, tuple(p["decoder_widths"]), drop, out_bn=decoder_bn,
                                    latent_stride=latent_stride, latent_channels=latent_channels,
                                    skip_channels=getattr(image_enc, "skip_channels", None) if decoder_skips
                                    else None),
        }
    )
