"""Residual-U-Net backbones of cDAL's generator and LDSeg's image encoder (not in the papers)."""

from __future__ import annotations

import pytest
import torch

from ldiffusion.core.errors import ConfigError, InputError
from ldiffusion.nets import ResUNet
from ldiffusion.nets.cdal_resunet import CDALResUNetGenerator
from ldiffusion.nets.ldseg_resnet import ResNetImageEncoder


@pytest.mark.parametrize("out_stride", [1, 2, 4, 8, 16])
def test_resunet_out_stride_sets_output_size(out_stride):
    net = ResUNet(3, 2, out_stride=out_stride).eval()
    assert net(torch.zeros(1, 3, 64, 96)).shape == (1, 2, 64 // out_stride, 96 // out_stride)


def test_resunet_rejects_bad_stride_and_film_length():
    with pytest.raises(ConfigError, match="out_stride=3"):
        ResUNet(3, 2, out_stride=3)
    net = ResUNet(3, 2).eval()
    with pytest.raises(InputError, match="film needs 5"):
        net(torch.zeros(1, 3, 32, 32), film=[])


def test_resunet_film_modulates_decoder():
    torch.manual_seed(0)
    net = ResUNet(3, 2).eval()
    x = torch.rand(2, 3, 32, 32)
    zeros = [(torch.zeros(2, w), torch.zeros(2, w)) for w in (256, 128, 64, 32, 16)]
    assert torch.equal(net(x, film=zeros), net(x))
    shifted = [(s, h + 1.0) for s, h in zeros]
    assert not torch.allclose(net(x, film=shifted), net(x))


def test_cdal_resunet_generator_starts_as_plain_unet_on_noisy_label_and_image():
    torch.manual_seed(0)
    g = CDALResUNetGenerator(5, 3, nz=8, z_emb_dim=16).eval()
    xt, img = torch.randn(2, 5, 64, 64), torch.rand(2, 3, 64, 64)
    t = torch.tensor([0, 1])
    out = g(xt, t, torch.randn(2, 8), img)
    assert out.shape == (2, 5, 64, 64) and out.abs().max() < 1
    # FiLM is zero-initialised: t and z have no effect yet; the output is tanh(U-Net([x_t, I]))
    assert torch.allclose(out, g(xt, torch.tensor([1, 0]), torch.randn(2, 8), img))
    assert torch.allclose(out, g.net(torch.cat([xt, img], 1)).tanh())
    # after a FiLM update, t changes the output
    torch.nn.init.normal_(g.film[-1].weight)
    assert not torch.allclose(g(xt, torch.tensor([0, 0]), torch.zeros(2, 8), img),
                              g(xt, torch.tensor([1, 1]), torch.zeros(2, 8), img))
    with pytest.raises(InputError, match="expected xt"):
        g(torch.zeros(2, 4, 64, 64), t, torch.zeros(2, 8), img)


@pytest.mark.parametrize("stride", [4, 8, 16])
def test_ldseg_resnet_image_encoder_latent_shape(stride):
    enc = ResNetImageEncoder(3, stride).eval()
    assert enc(torch.rand(2, 3, 64, 128)).shape == (2, 1, 64 // stride, 128 // stride)
    with pytest.raises(InputError, match="divisible by"):
        enc(torch.rand(1, 3, 48, 48))
