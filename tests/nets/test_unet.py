"""Tests for ldiffusion.nets.unet.TimeUNet: shapes per preset, gradients, save/load, determinism, speed."""

from __future__ import annotations

import time

import pytest
import torch

from ldiffusion.core.errors import ConfigError, InputError
from ldiffusion.nets.unet import TimeUNet, unet_preset
from tests.nets._contract import (
    assert_all_params_get_grad,
    assert_deterministic,
    assert_save_load_roundtrip,
    n_params,
    unzero,
)


def _inputs(c=4, size=16, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, size, size, generator=g), torch.tensor([3, 71])[:b]


@pytest.mark.parametrize(("preset", "size"), [("tiny", 16), ("tiny", 64), ("small", 16), ("small", 32)])
def test_output_shape(preset, size):
    # x (2, 4, s, s), t (2,) -> (2, 3, s, s)
    net = TimeUNet(4, 3, **unet_preset(preset))
    x, t = _inputs(size=size)
    assert net(x, t).shape == (2, 3, size, size)


def test_small_preset_has_attention_at_lowest_level_only():
    net = TimeUNet(4, 4, **unet_preset("small"))
    n_attn = sum(type(m).__name__ == "SelfAttention2d" for m in net.modules())
    assert n_attn == 2 + 3 + 1  # 2 down blocks, 3 up blocks at level 2, plus the middle
    assert (
        sum(type(m).__name__ == "SelfAttention2d" for m in TimeUNet(4, 4, **unet_preset("tiny")).modules())
        == 0
    )


def test_paper_preset_parameter_count_on_meta():
    with torch.device("meta"):
        net = TimeUNet(4, 4, **unet_preset("paper"))
    assert 5e8 < n_params(net) < 9e8  # SD-1.5-sized (859.5 M with cross-attention); ours ~673 M


def test_conditioning_channels():
    net = TimeUNet(1, 1, base=8, mult=(1, 2), num_res_blocks=1, attn_levels=(1,), cond_channels=2)
    x = torch.randn(2, 1, 8, 8)
    cond = torch.randn(2, 2, 8, 8)
    out = net(x, torch.tensor([1, 2]), cond)
    assert out.shape == (2, 1, 8, 8)
    unzero(net)
    assert not torch.equal(
        net(x, torch.tensor([1, 2]), cond), net(x, torch.tensor([1, 2]), torch.zeros_like(cond))
    )
    with pytest.raises(InputError, match="pass cond"):
        net(x, torch.tensor([1, 2]))
    with pytest.raises(InputError, match="expected cond of shape"):
        net(x, torch.tensor([1, 2]), cond[:, :1])
    with pytest.raises(InputError, match="cond_channels=0"):
        TimeUNet(1, 1, base=8, mult=(1,), num_res_blocks=1, attn_levels=())(x, 1, cond)


def test_time_changes_output_and_scalar_t_broadcasts():
    net = unzero(TimeUNet(4, 4, **unet_preset("tiny")))
    x, _ = _inputs()
    assert not torch.equal(net(x, torch.tensor([0, 0])), net(x, torch.tensor([50, 50])))
    torch.testing.assert_close(net(x, 5), net(x, torch.tensor([5, 5])))
    torch.testing.assert_close(net(x, 0.5), net(x, torch.tensor([0.5, 0.5])))
    with pytest.raises(InputError, match=r"expected t of shape \(2,\)"):
        net(x, torch.tensor([1, 2, 3]))


def test_divisibility_error_message():
    net = TimeUNet(4, 4, **unet_preset("small"))
    with pytest.raises(InputError, match=r"divisible by 4, got \(1, 4, 30, 30\); pad to \(32, 32\)"):
        net(torch.zeros(1, 4, 30, 30), torch.tensor([1]))
    with pytest.raises(InputError, match="expected x with 4 channels"):
        net(torch.zeros(1, 3, 32, 32), torch.tensor([1]))


def test_bad_config():
    with pytest.raises(ConfigError, match=r"outside 0\.\.1"):
        TimeUNet(4, 4, mult=(1, 2), attn_levels=(2,))
    with pytest.raises(ConfigError, match="choose one of"):
        unet_preset("huge")


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_backward_reaches_every_parameter(preset):
    net = unzero(TimeUNet(4, 4, **unet_preset(preset), cond_channels=1))
    x, t = _inputs()
    out = net(x, t, torch.randn(2, 1, 16, 16))
    assert_all_params_get_grad(net, out.square().mean())


def test_save_load_roundtrip(tmp_path):
    x, t = _inputs()
    assert_save_load_roundtrip(
        lambda: unzero(TimeUNet(4, 4, **unet_preset("small")), seed=int(torch.randint(0, 99, ()))),
        lambda m: m(x, t),
        tmp_path,
    )


def test_deterministic_under_seed():
    x, t = _inputs()
    assert_deterministic(lambda: TimeUNet(4, 4, **unet_preset("small")), lambda m: m(x, t))


@pytest.mark.parametrize(("channels", "size"), [(4, 16), (3, 64)])
def test_tiny_train_step_is_fast(channels, size):
    # forward + backward + Adam step, batch 2: 16x16 latent (the tiny L-Diffusion setting) and 64 px input
    torch.manual_seed(0)
    net = TimeUNet(channels, channels, **unet_preset("tiny"))
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    x, t = _inputs(c=channels, size=size)
    eps = torch.randn_like(x)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = (net(x, t) - eps).square().mean()
        loss.backward()
        opt.step()
        return loss

    step()  # warm-up
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t0)
    assert torch.isfinite(loss)
    print(f"tiny TimeUNet train step, batch 2, {channels}x{size}x{size}: {min(times) * 1e3:.1f} ms")
    assert min(times) < 2.0


def test_res_unet_shapes_parameters_and_divisor():
    from ldiffusion.core.errors import InputError
    from ldiffusion.nets import ResUNet

    net = ResUNet(3, 3, encoder="resnet18")
    n = sum(p.numel() for p in net.parameters())
    assert 13e6 < n < 16e6  # ResNet-18 encoder (11.2 M) + U-Net decoder
    assert net(torch.zeros(1, 3, 96, 64)).shape == (1, 3, 96, 64)
    with pytest.raises(InputError, match="divisible by 32"):
        net(torch.zeros(1, 3, 48, 64))
