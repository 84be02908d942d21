"""Tests for ldiffusion.nets.autoencoder: shapes per preset, posterior, loss, save/load, diffusers adapter."""

from __future__ import annotations

import sys

import pytest
import torch

from ldiffusion.core.errors import CheckpointError, ConfigError, InputError, LDiffusionError
from ldiffusion.core.io import load_weights, save_weights
from ldiffusion.nets.autoencoder import (
    Autoencoder,
    DiagonalGaussian,
    autoencoder_preset,
    load_diffusers_autoencoder,
)
from tests.nets._contract import (
    assert_all_params_get_grad,
    assert_deterministic,
    assert_save_load_roundtrip,
    unzero,
)


def _images(b=2, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, size, size, generator=g) * 2 - 1


@pytest.mark.parametrize(("preset", "f"), [("tiny", 4), ("small", 8)])
def test_shapes_per_preset(preset, f):
    # x (2, 3, 64, 64) in [-1, 1] -> mean/logvar (2, 4, 64/f, 64/f) -> decode (2, 3, 64, 64) in (-1, 1)
    ae = Autoencoder(**autoencoder_preset(preset))
    assert ae.downsample_factor == f
    post = ae.encode(_images())
    assert post.mean.shape == post.logvar.shape == (2, 4, 64 // f, 64 // f)
    x = ae.decode(post.sample(torch.Generator().manual_seed(0)))
    assert x.shape == (2, 3, 64, 64)
    assert x.abs().max() < 1


def test_posterior_sample_and_kl():
    mean = torch.zeros(2, 1, 2, 2)
    post = DiagonalGaussian(mean, torch.zeros_like(mean))
    torch.testing.assert_close(post.kl(), torch.zeros(2))
    post = DiagonalGaussian(torch.ones(2, 1, 2, 2), torch.zeros(2, 1, 2, 2))
    torch.testing.assert_close(post.kl(), torch.full((2,), 0.5 * 4))  # 0.5 * mean^2 per element, 4 elements
    s1 = post.sample(torch.Generator().manual_seed(3))
    s2 = post.sample(torch.Generator().manual_seed(3))
    assert torch.equal(s1, s2) and not torch.equal(s1, post.mean)
    assert not torch.equal(s1[0], s1[1])  # per-sample noise
    point = DiagonalGaussian(torch.ones(2, 1, 2, 2))
    assert torch.equal(point.sample(), point.mean) and torch.equal(point.kl(), torch.zeros(2))


def test_loss_terms_and_plain_autoencoder():
    ae = Autoencoder(**autoencoder_preset("tiny"), kl_weight=1e-3)
    x = _images()
    out = ae.loss(x, torch.Generator().manual_seed(0))
    assert set(out) == {"recon", "kl", "total"}
    torch.testing.assert_close(out["total"], out["recon"] + 1e-3 * out["kl"])
    plain = Autoencoder(**autoencoder_preset("tiny"), kl=False)
    assert plain.encode(x).logvar is None
    assert plain.loss(x)["kl"] == 0


def test_backward_reaches_every_parameter():
    ae = Autoencoder(**autoencoder_preset("tiny"))
    unzero(ae)
    loss = ae.loss(_images(), torch.Generator().manual_seed(0))["total"]
    assert_all_params_get_grad(ae, loss)


def test_scaling_factor_is_saved_with_weights(tmp_path):
    ae = Autoencoder(**autoencoder_preset("tiny"))
    assert ae.scaling_factor == 1.0
    ae.scaling_factor = 0.5
    save_weights(tmp_path / "ae.safetensors", ae.state_dict())
    other = Autoencoder(**autoencoder_preset("tiny"))
    other.load_state_dict(load_weights(tmp_path / "ae.safetensors"))
    assert other.scaling_factor == 0.5
    with pytest.raises(ConfigError, match="> 0"):
        ae.scaling_factor = 0.0


def test_save_load_roundtrip(tmp_path):
    x = _images()
    assert_save_load_roundtrip(
        lambda: Autoencoder(**autoencoder_preset("small")),
        lambda m: m(x, torch.Generator().manual_seed(0)),
        tmp_path,
    )


def test_deterministic_under_seed():
    x = _images()
    assert_deterministic(lambda: Autoencoder(**autoencoder_preset("tiny")), lambda m: m.encode(x).mean)


def test_input_errors():
    ae = Autoencoder(**autoencoder_preset("small"))
    with pytest.raises(InputError, match=r"divisible by 8, got \(1, 3, 60, 60\); pad to \(64, 64\)"):
        ae.encode(torch.zeros(1, 3, 60, 60))
    with pytest.raises(InputError, match="4 channels"):
        ae.decode(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ConfigError, match="choose one of"):
        autoencoder_preset("paper")


def test_diffusers_missing_gives_extra_hint(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # makes `import diffusers` raise ImportError
    with pytest.raises(LDiffusionError, match=r'pip install "ldiffusion\[diffusers\]"'):
        load_diffusers_autoencoder(tmp_path)


def test_diffusers_autoencoder_roundtrip(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
        scaling_factor=0.3,
    ).eval()
    vae.save_pretrained(tmp_path / "vae")
    ae = load_diffusers_autoencoder(tmp_path / "vae")
    assert ae.scaling_factor == pytest.approx(0.3)
    assert ae.downsample_factor == 2
    x = _images(size=32)
    post = ae.encode(x)
    assert post.mean.shape == (2, 4, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(post.mean, vae.encode(x).latent_dist.mean)
        rec = ae.decode(post.mean)
        torch.testing.assert_close(rec, vae.decode(post.mean).sample.clamp(-1, 1))
    assert rec.shape == (2, 3, 32, 32) and rec.abs().max() <= 1
    assert not any(p.requires_grad for p in ae.parameters())
    with pytest.raises(CheckpointError, match=r"config\.json"):
        load_diffusers_autoencoder(tmp_path / "missing")


def test_diffusers_default_scaling_factor(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    vae = diffusers.AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=4)
    vae.save_pretrained(tmp_path / "vae")
    ae = load_diffusers_autoencoder(tmp_path / "vae")
    assert ae.scaling_factor == pytest.approx(0.18215)  # diffusers' default, the SD-1.x value
    assert ae.encode(_images(b=1, size=8)).mean.shape == (1, 4, 8, 8)
