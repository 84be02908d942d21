"""LDSeg networks: shapes per preset, standardised label latent, input checks, gradients."""

from __future__ import annotations

import pytest
import torch

from ldiffusion.core.errors import ConfigError, InputError
from ldiffusion.nets.ldseg import (
    ImageEncoder,
    LabelDecoder,
    LabelEncoder,
    LDSegDenoiser,
    build_ldseg_nets,
    ldseg_preset,
    ldseg_timestep_embedding,
)


@pytest.mark.parametrize(("name", "size"), [("tiny", 64), ("small", 64), ("paper", 128)])
def test_shapes_per_preset(name, size):
    torch.manual_seed(0)
    k = 3
    nets = build_ldseg_nets(ldseg_preset(name), num_classes=k, in_channels=3).eval()
    x = torch.rand(2, 3, size, size)
    y = torch.randint(0, k, (2, size, size))
    h = size // 16
    with torch.no_grad():
        zi = nets["image_encoder"](x)
        z0 = nets["label_encoder"](y)
        eps_hat = nets["denoiser"](torch.cat([z0, zi], 1), torch.tensor([0, 999]))
        logits = nets["decoder"](z0 - eps_hat)
    assert zi.shape == z0.shape == eps_hat.shape == (2, 1, h, h)
    assert logits.shape == (2, k, size, size)
    assert all(torch.isfinite(t).all() for t in (zi, z0, eps_hat, logits))


def test_preset_widths_follow_methods_doc():
    tiny, paper = ldseg_preset("tiny"), ldseg_preset("paper")
    assert tiny["label_widths"] == (8, 16, 32, 32, 16)
    assert tiny["denoiser_widths"] == (8, 16, 32) and tiny["temb_dim"] == 32
    assert paper["label_widths"] == (16, 32, 64, 64, 32) and paper["image_heads"] == 8
    with pytest.raises(ConfigError, match="tiny"):
        ldseg_preset("tinyy")


def test_label_encoder_latent_is_standardised_per_sample():
    torch.manual_seed(0)
    enc = LabelEncoder(4, (8, 16, 32, 32, 16), eps=1e-8)
    y = torch.randint(0, 4, (3, 64, 64))
    y[0] = 0  # a constant label map still gets mean 0 (std 0 or 1)
    z = enc(y)
    assert torch.allclose(z.mean(dim=(1, 2, 3)), torch.zeros(3), atol=1e-5)
    std = z.std(dim=(1, 2, 3), unbiased=False)
    assert torch.allclose(std[1:], torch.ones(2), atol=1e-3)
    # default Keras eps 1e-3: std = sqrt(v / (v + 1e-3)), still ~1
    enc_default = LabelEncoder(4, (8, 16, 32, 32, 16))
    z2 = enc_default(y[1:])
    assert torch.allclose(z2.std(dim=(1, 2, 3), unbiased=False), torch.ones(2), atol=1e-2)
    assert not any(n == "weight" for n, _ in enc.named_parameters())  # no affine by default


def test_label_encoder_affine_and_index_input():
    enc = LabelEncoder(2, (8, 16, 32, 32, 16), latent_affine=True, latent_hw=(4, 4), label_input="index")
    assert enc.weight is not None and enc.weight.shape == (1, 4, 4)
    assert enc.encode_input(torch.ones(1, 64, 64, dtype=torch.long)).shape == (1, 1, 64, 64)
    with pytest.raises(ConfigError, match="latent_hw"):
        LabelEncoder(2, latent_affine=True)


def test_one_hot_input_ignores_255():
    enc = LabelEncoder(3, (8, 16, 32, 32, 16))
    y = torch.zeros(1, 64, 64, dtype=torch.long)
    y[0, 0, 0] = 255
    x = enc.encode_input(y)
    assert x.shape == (1, 3, 64, 64) and x[0, :, 0, 0].sum() == 0 and x[0, 0, 1, 1] == 1


def test_size_check_has_clear_message():
    enc = ImageEncoder(3, 8, (16, 32, 32, 16), heads=4)
    with pytest.raises(InputError, match=r"divisible by 64.*pad or crop to \(128, 64\)"):
        enc(torch.rand(1, 3, 96, 64))
    with pytest.raises(InputError, match="3, H, W"):
        enc(torch.rand(1, 1, 64, 64))


def test_image_encoder_attention_in_last_two_stages():
    enc = ImageEncoder(3, 8, (16, 32, 32, 16), heads=4)
    kinds = [type(a).__name__ for a in enc.attns]
    assert kinds == ["Identity", "Identity", "MHSA2d", "MHSA2d"]
    assert enc.attns[2].heads == 4


def test_timestep_embedding_matches_keras_formula():
    e = ldseg_timestep_embedding(torch.tensor([0, 5]), 8)
    assert e.shape == (2, 8)
    assert torch.allclose(e[0], torch.tensor([0, 0, 0, 0, 1, 1, 1, 1.0]))
    freqs = torch.exp(-torch.log(torch.tensor(1e4)) * torch.arange(4) / 3)
    assert torch.allclose(e[1, :4], torch.sin(5 * freqs)) and torch.allclose(e[1, 4:], torch.cos(5 * freqs))


def test_denoiser_has_nine_skips_and_depends_on_t():
    torch.manual_seed(0)
    den = LDSegDenoiser(2, 8, (8, 16, 32), 32)
    assert len(den.up_blocks) == 9
    for p in den.parameters():  # undo zero-init so the output depends on every input
        if p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(2, 2, 4, 4)
    a = den(x, torch.tensor([10, 10]))
    b = den(x, torch.tensor([500, 500]))
    assert not torch.allclose(a, b)
    with pytest.raises(InputError):
        den(torch.randn(1, 2, 6, 6), torch.tensor([1]))


def test_decoder_outputs_logits_at_full_resolution():
    dec = LabelDecoder(4, (16, 32, 32, 16), out_bn=False)
    assert dec(torch.randn(2, 1, 4, 4)).shape == (2, 4, 64, 64)
    with pytest.raises(InputError):
        dec(torch.randn(2, 2, 4, 4))


# ------------------------------------------------------------------- latent stride, Table V (issue 20)
def _run_all_four(nets, k: int, size: int):
    """Run image encoder, label encoder, denoiser (t = 0, 999) and decoder on 2 random images / labels."""
    x = torch.rand(2, 3, size, size)
    y = torch.randint(0, k, (2, size, size))
    with torch.no_grad():
        zi = nets["image_encoder"](x)
        z0 = nets["label_encoder"](y)
        eps_hat = nets["denoiser"](torch.cat([z0, zi], 1), torch.tensor([0, 999]))
        return zi, z0, eps_hat, nets["decoder"](z0 - eps_hat)


@pytest.mark.parametrize("stride", [16, 8, 4])
def test_latent_shape_follows_the_stride(stride):
    from ldiffusion.nets.ldseg import ldseg_size_divisor

    torch.manual_seed(0)
    k, size = 3, 64
    nets = build_ldseg_nets(ldseg_preset("tiny"), num_classes=k, in_channels=3, latent_stride=stride).eval()
    zi, z0, eps_hat, logits = _run_all_four(nets, k, size)
    h = size // stride
    assert zi.shape == z0.shape == eps_hat.shape == (2, 1, h, h)
    assert logits.shape == (2, k, size, size)
    assert ldseg_size_divisor(stride) == 4 * stride
    # the widths stay those of the preset: same parameter count at every stride except the decoder's
    # first convs (ConvTranspose2d and Conv2d 3x3 have the same weight count for the same channels)
    n16 = sum(p.numel() for p in build_ldseg_nets(ldseg_preset("tiny"), k, 3).parameters())
    assert sum(p.numel() for p in nets.parameters()) == n16


def test_bad_stride_and_size_name_the_key():
    with pytest.raises(ConfigError, match="latent_stride=2"):
        build_ldseg_nets(ldseg_preset("tiny"), num_classes=2, latent_stride=2)
    enc = LabelEncoder(2, (8, 16, 32, 32, 16), latent_stride=4)
    enc(torch.zeros(1, 16, 16, dtype=torch.long))  # 16 = 4 x 4 is enough at stride 4
    with pytest.raises(InputError, match="divisible by 16"):
        enc(torch.zeros(1, 24, 24, dtype=torch.long))


def test_nearest_label_downsampler_takes_block_corners_and_standardises():
    from ldiffusion.nets.ldseg_nearest import NearestLabelDownsampler

    y = torch.zeros(1, 16, 16, dtype=torch.long)
    y[0, :4, :4] = 1  # top-left 4x4 block -> its corner pixel is 1
    y[0, 5, 5] = 2  # inside block (1, 1) but not its corner -> invisible
    y[0, 8:12, 12:16] = 255  # ignored -> 0
    z = NearestLabelDownsampler(3, latent_stride=4)(y)
    assert z.shape == (1, 1, 4, 4)
    raw = torch.zeros(4, 4)
    raw[0, 0] = 1.0
    expect = (raw - raw.mean()) / torch.sqrt(raw.var(unbiased=False) + 1e-3)
    assert torch.allclose(z[0, 0], expect, atol=1e-6)
    assert not list(NearestLabelDownsampler(3).parameters())


def test_nearest_image_downsampler_is_grey_corner_sample():
    from ldiffusion.nets.ldseg_nearest import NearestImageDownsampler

    x = torch.rand(2, 3, 64, 64)
    z = NearestImageDownsampler(3, latent_stride=8)(x)
    grey = x.mean(1)[:, ::8, ::8]
    m = grey.mean(dim=(1, 2), keepdim=True)
    v = grey.var(dim=(1, 2), unbiased=False, keepdim=True)
    assert z.shape == (2, 1, 8, 8)
    assert torch.allclose(z[:, 0], (grey - m) / torch.sqrt(v + 1e-3), atol=1e-5)


def test_table_v_rows_build_without_the_replaced_encoder():
    nets = build_ldseg_nets(ldseg_preset("tiny"), 2, 3, label_downsampler="nearest",
                            image_downsampler="nearest")
    assert not list(nets["label_encoder"].parameters()) and not list(nets["image_encoder"].parameters())
    with pytest.raises(ConfigError, match="image_downsampler='pool'"):
        build_ldseg_nets(ldseg_preset("tiny"), 2, 3, image_downsampler="pool")


@pytest.mark.parametrize("downsampler", ["encoder", "resnet18"])
def test_latent_channels_shape_every_network(downsampler):
    torch.manual_seed(0)
    k, size = 3, 64
    nets = build_ldseg_nets(ldseg_preset("tiny"), num_classes=k, in_channels=3, latent_stride=8,
                            image_downsampler=downsampler, latent_channels=4, image_latent_channels=6).eval()
    zi, z0, eps_hat, logits = _run_all_four(nets, k, size)
    assert zi.shape == (2, 6, 8, 8)
    assert z0.shape == eps_hat.shape == (2, 4, 8, 8)
    assert logits.shape == (2, k, size, size)
    with pytest.raises(InputError, match=r"expected a latent \(B, 4, h, w\)"):
        nets["decoder"](z0[:, :1])
