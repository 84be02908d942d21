"""cDAL generator on a residual-encoder U-Net backbone (``g_backbone="resnet18"`` / ``"resnet34"``).

Not in the paper (docs/methods.md, cDAL): the paper's generator is the NCSN++ U-Net of
`ldiffusion.nets.cdal.CDALGenerator`. On a CPU its full-resolution residual blocks make a training
step of the `small` preset cost about 2.5x a ResNet-18 U-Net's forward and backward pass at the same
batch, so in minutes of training it sees far fewer images than the U-Net baseline. This generator
keeps cDAL's interface and conditioning and swaps the network for `ResUNet`:

* input: the noisy label x_t (B, C_y, H, W) concatenated with the normalised image (B, C_I, H, W);
* time t and latent z: a sinusoidal embedding of t through a two-layer MLP, and z through cDAL's
  `MappingNetwork`; their concatenation gives, per decoder block, a (scale, shift) FiLM pair
  (zero-initialised, so the net starts as a plain U-Net on [x_t, I]);
* output: tanh of the U-Net's logits, x̂0 in (-1, 1), as `CDALGenerator`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldiffusion.nets.blocks import timestep_embedding
from ldiffusion.nets.cdal import MappingNetwork, check_generator_inputs
from ldiffusion.nets.res_unet import DECODER_WIDTHS, ResUNet

__all__ = ["CDALResUNetGenerator"]


class CDALResUNetGenerator(nn.Module):
    """x0-predictor x_θ(x_t, t, z, I) = tanh(ResUNet([x_t, I]; FiLM(t, z))).

    Args:
        label_channels: C_y (x_t and output channels).
        image_channels: C_I.
        encoder: "resnet18" or "resnet34".
        nz: latent size; z_emb_dim: style width; n_mlp: mapping depth (as `CDALGenerator`).
        t_emb_dim: width of the time embedding.

    Input H, W must be multiples of ``size_divisor`` (32).

    Example:
        >>> import torch
        >>> g = CDALResUNetGenerator(2, 3)
        >>> g(torch.zeros(1, 2, 64, 64), torch.zeros(1, dtype=torch.long), torch.zeros(1, 16),
        ...   torch.zeros(1, 3, 64, 64)).shape
        torch.Size([1, 2, 64, 64])
    """

    size_divisor = ResUNet.divisor

    def __init__(self, label_channels: int, image_channels: int = 3, *, encoder: str = "resnet18",
                 nz: int = 16, z_emb_dim: int = 32, n_mlp: int = 2, t_emb_dim: int = 64) -> None:
        super().__init__()
        self.label_channels, self.image_channels = label_channels, image_channels
        self.nz, self.t_emb_dim = nz, t_emb_dim
        self.net = ResUNet(label_channels + image_channels, label_channels, encoder)
        self.temb = nn.Sequential(nn.Linear(t_emb_dim, t_emb_dim), nn.SiLU(), nn.Linear(t_emb_dim, t_emb_dim))
        self.mapping = MappingNetwork(nz, z_emb_dim, n_mlp)
        self.film = nn.ModuleList(nn.Linear(t_emb_dim + z_emb_dim, 2 * w) for w in DECODER_WIDTHS)
        for lin in self.film:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, xt: Tensor, t: Tensor, z: Tensor, image: Tensor) -> Tensor:
        """Predict x̂0.

        Args:
            xt: noisy label (B, C_y, H, W), H, W multiples of 32.
            t: time indices (B,) int, k - 1 in {0..T-1}.
            z: latent (B, nz) (zeros for the "w/o latent" ablation).
            image: conditioning image (B, C_I, H, W), already normalised.

        Returns:
            x̂0 (B, C_y, H, W) in (-1, 1).
        """
        check_generator_inputs("CDALResUNetGenerator", xt, image, self.label_channels, self.size_divisor)
        temb = F.silu(self.temb(timestep_embedding(t, self.t_emb_dim).to(xt.device)))
        cond = torch.cat([temb, self.mapping(z)], dim=1)
        film = [tuple(lin(cond).chunk(2, dim=1)) for lin in self.film]
        logits = self.net(torch.cat([xt, image.to(xt.dtype)], dim=1), film=film)  # type: ignore[arg-type]
        return logits.tanh()
