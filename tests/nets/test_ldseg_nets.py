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
