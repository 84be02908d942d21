"""cDAL nets: FIR resampling, AdaGN, mapping network, generator and discriminator (METHODS Part 3 §2, §7)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ldiffusion.core.errors import ConfigError, InputError
from ldiffusion.nets.cdal import (
    CDAL_PRESETS,
    AdaGN,
    CDALDiscriminator,
    CDALGenerator,
    MappingNetwork,
    cdal_preset,
    fir_downsample2d,
    fir_upsample2d,
    minibatch_stddev,
    upfirdn2d,
)


def _nets(name, cy=1, ci=3, device="cpu"):
    p = cdal_preset(name)
    with torch.device(device):
        g = CDALGenerator(cy, ci, image_size=p["crop_px"], **p["generator"])
        d = CDALDiscriminator(cy, **p["discriminator"])
    return g, d


def _count(m):
    return sum(p.numel() for p in m.parameters())


# ---------------------------------------------------------------------------------------------- FIR
def test_fir_shapes_and_constant_preserved():
    x = torch.ones(2, 3, 8, 8)
    up, down = fir_upsample2d(x), fir_downsample2d(x)
    assert up.shape == (2, 3, 16, 16) and down.shape == (2, 3, 4, 4)
    assert torch.allclose(up[..., 2:-2, 2:-2], torch.ones(1))
    assert torch.allclose(down[..., 1:-1, 1:-1], torch.ones(1))


def test_fir_upsample_of_ramp_is_linear_interpolation():
    # [1,3,3,1] FIR upsampling of a linear function gives samples at half-pixel offsets: up[j] = (j - 0.5) / 2
    x = torch.arange(8, dtype=torch.float32).view(1, 1, 1, 8).expand(1, 1, 8, 8).contiguous()
    up = fir_upsample2d(x)[0, 0, 8]
    j = torch.arange(16, dtype=torch.float32)
    assert torch.allclose(up[2:-2], (j[2:-2] - 0.5) / 2, atol=1e-5)


def test_fir_downsample_matches_separable_average():
    torch.manual_seed(0)
    x = torch.randn(1, 1, 8, 8)
    k = torch.tensor([1.0, 3.0, 3.0, 1.0])
    k2 = torch.outer(k, k) / 64.0
    ref = F.conv2d(F.pad(x, (1, 1, 1, 1)), k2.view(1, 1, 4, 4), stride=2)
    assert torch.allclose(fir_downsample2d(x), ref, atol=1e-6)


def test_upfirdn2d_rejects_bad_input():
    with pytest.raises(InputError):
        upfirdn2d(torch.ones(3, 4, 4), torch.ones(2, 2))


# ---------------------------------------------------------------------------------------------- latent
def test_adagn_starts_as_groupnorm_and_mapping_shapes():
    ada = AdaGN(16, 8)
    torch.nn.init.zeros_(ada.style.weight)
    h, w = torch.randn(2, 16, 4, 4), torch.randn(2, 8)
    ref = F.group_norm(h, 4, eps=1e-6)
    assert torch.allclose(ada(h, w), ref, atol=1e-5)
    mlp = MappingNetwork(16, 32, 2)
    assert mlp(torch.randn(5, 16)).shape == (5, 32)
    assert sum(isinstance(m, torch.nn.Linear) for m in mlp.modules()) == 3


# ---------------------------------------------------------------------------------------------- presets
@pytest.mark.parametrize(("name", "g_m", "d_m"), [("tiny", 0.554, 0.275), ("small", 1.803, 1.736),
                                                   ("paper", 41.667, 27.737)])
def test_preset_parameter_counts(name, g_m, d_m):
    g, d = _nets(name, device="meta")  # no memory, no init cost
    assert _count(g) / 1e6 == pytest.approx(g_m, abs=2e-3)
    assert _count(d) / 1e6 == pytest.approx(d_m, abs=2e-3)
    if name == "paper":  # METHODS §2: image encoder 0.37 M
        assert _count(g.image_encoder) / 1e6 == pytest.approx(0.372, abs=2e-3)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="tiny"):
        cdal_preset("tinny")
    assert set(CDAL_PRESETS) == {"tiny", "small", "paper"}


@pytest.mark.parametrize(("name", "cy", "size"), [("tiny", 1, 64), ("tiny", 3, 32), ("small", 1, 64),
                                                  pytest.param("paper", 1, 64, marks=pytest.mark.slow)])
def test_generator_and_discriminator_shapes(name, cy, size):
    torch.manual_seed(0)
    g, d = _nets(name, cy)
    b = 2
    xt, img = torch.randn(b, cy, size, size), torch.randn(b, 3, size, size)
    t = torch.tensor([0, 1])
    with torch.no_grad():
        x0 = g(xt, t, torch.randn(b, g.nz), img)
        logits = d(x0, xt, t)
        feats = d.get_features(x0, xt, t)
    assert x0.shape == (b, cy, size, size)
    assert bool((x0.abs() < 1).all())  # tanh range
    assert logits.shape == (b, 1) and torch.isfinite(logits).all()
    assert [f.shape[-1] for f in feats] == [size // s for s in d.feature_strides]


def test_tiny_generator_uses_image_and_latent_and_t():
    torch.manual_seed(0)
    g, _ = _nets("tiny")
    with torch.no_grad():  # the zero-initialised convs hide z at init (as in DDGAN); wake them up
        for m in g.modules():
            if isinstance(m, torch.nn.Conv2d) and not bool(m.weight.abs().gt(1e-3).any()):
                m.weight.normal_(0, 0.1)
    xt, img, z = torch.randn(1, 1, 32, 32), torch.randn(1, 3, 32, 32), torch.randn(1, 16)
    t = torch.tensor([0])
    with torch.no_grad():
        base = g(xt, t, z, img)
        assert not torch.allclose(base, g(xt, t, z, torch.randn_like(img)))
        assert not torch.allclose(base, g(xt, t, torch.randn_like(z), img))
        assert not torch.allclose(base, g(xt, torch.tensor([1]), z, img))
        assert torch.equal(base, g(xt, t, z, img))


def test_generator_rejects_bad_size():
    g, _ = _nets("tiny")
    with pytest.raises(InputError, match="divisible by 8"):
        g(torch.randn(1, 1, 60, 60), torch.tensor([0]), torch.randn(1, 16), torch.randn(1, 3, 60, 60))


# ---------------------------------------------------------------------------------------------- discriminator
@pytest.mark.parametrize("b", [1, 2, 3, 5, 6, 8])
def test_minibatch_stddev_any_batch(b):
    x = torch.randn(b, 4, 3, 3)
    y = minibatch_stddev(x)
    assert y.shape == (b, 5, 3, 3) and torch.isfinite(y).all()
    assert torch.equal(y[:, :4], x)
    _, d = _nets("tiny")
    x = torch.randn(b, 1, 64, 64)
    assert d(x, x, torch.zeros(b, dtype=torch.long)).shape == (b, 1)


def test_minibatch_stddev_groups_of_four():
    x = torch.zeros(8, 1, 1, 1)
    x[:, 0, 0, 0] = torch.tensor([0.0, 10.0, 0.0, 10.0, 2.0, 10.0, 2.0, 10.0])
    # groups are interleaved: {0, 2, 4, 6} (values 0, 0, 2, 2, std 1) and {1, 3, 5, 7} (all 10, std 0)
    s = minibatch_stddev(x)[:, 1, 0, 0]
    assert torch.allclose(s[0::2], torch.ones(4), atol=1e-3)
    assert torch.allclose(s[1::2], torch.zeros(4), atol=1e-3)


def test_small_discriminator_feature_resolutions():
    d = CDALDiscriminator(3, ngf=4, t_emb_dim=16, n_down=3, variant="small")
    feats = d.get_features(torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))
    # METHODS §2: small D at 32 px, index -> resolution 0:32, 1:32, 2:16, 3:8, 4:4
    assert [f.shape[-1] for f in feats] == [32, 32, 16, 8, 4]
    assert d.feature_strides == [1, 1, 2, 4, 8]


_R1_UNDER_BF16 = """
import torch
from ldiffusion.nets.cdal import CDALDiscriminator
torch.manual_seed(0)
torch.set_num_threads(1)
disc = CDALDiscriminator(3, ngf=8)
x_prev = torch.randn(4, 3, 256, 256)
xt = torch.randn(4, 3, 256, 256, requires_grad=True)
with torch.autocast("cpu", dtype=torch.bfloat16):
    d = disc(x_prev, xt, torch.zeros(4, dtype=torch.long))
(grad,) = torch.autograd.grad(d.float().sum(), xt, create_graph=True)
grad.pow(2).sum().backward()
print("ok")
"""


def test_discriminator_r1_double_backward_under_bf16_does_not_crash():
    """3 label classes (GlaS with the contour target), ngf 8, batch 4, 256 px: the shape that made oneDNN
    raise SIGFPE on Intel AMX CPUs in the stem's double backward. A child process runs it, so that a
    crash fails the test instead of ending pytest."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _R1_UNDER_BF16], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", (out.returncode, out.stderr[-2000:])


def test_discriminator_stem_runs_in_float32_under_autocast():
    disc = CDALDiscriminator(2, ngf=4, n_down=2)
    x = torch.randn(2, 2, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        feats = disc.get_features(x, x, torch.zeros(2, dtype=torch.long))
    assert feats[0].dtype == torch.float32 and feats[-1].dtype == torch.bfloat16
