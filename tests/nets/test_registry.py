"""Walk the NETS registry (timm style): each registered net builds from small kwargs and trains."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from ldiffusion.core.errors import ConfigError, LDiffusionError
from ldiffusion.nets import NETS, TimeUNet, create_net

HAS_TIMM = importlib.util.find_spec("timm") is not None

# name -> (small constructor kwargs, forward call). Add an entry when registering a new net.
SMALL: dict[str, tuple[dict[str, Any], Callable[[nn.Module], torch.Tensor]]] = {
    "time_unet": (
        {"preset": "tiny", "in_channels": 4, "out_channels": 4},
        lambda m: m(torch.randn(2, 4, 16, 16), torch.tensor([1, 9])),
    ),
    "seg_unet": (
        {"preset": "tiny", "in_channels": 3, "num_classes": 2},
        lambda m: m(torch.randn(2, 3, 32, 32)),
    ),
    "res_unet": (
        {"in_channels": 3, "num_classes": 2},
        lambda m: m(torch.randn(2, 3, 64, 64)),
    ),
    "autoencoder": ({"preset": "tiny"}, lambda m: m.loss(torch.rand(2, 3, 32, 32) * 2 - 1)["total"]),
    "convnext_seg": (
        {"preset": "tiny", "in_chans": 3, "num_classes": 2},
        lambda m: m(torch.randn(2, 3, 32, 32)),
    ),
    "timm_seg": (
        {"backbone_name": "resnet18", "in_chans": 3, "num_classes": 2, "decoder_dim": 8},
        lambda m: m(torch.randn(1, 3, 64, 64)),
    ),
}


def test_expected_names_registered():
    assert {"time_unet", "seg_unet", "autoencoder", "convnext_seg", "timm_seg"} <= set(NETS.names())


@pytest.mark.parametrize("name", NETS.names())
def test_every_registered_net_builds_and_trains(name):
    assert name in SMALL, (
        f"net {name!r} is registered but tests/nets/test_registry.py::SMALL has no entry for it"
    )
    kwargs, run = SMALL[name]
    if name == "timm_seg" and not HAS_TIMM:
        with pytest.raises(LDiffusionError, match="ldiffusion\\[timm\\]"):
            create_net(name, **kwargs)
        return
    torch.manual_seed(0)
    net = create_net(name, **kwargs)
    assert isinstance(net, nn.Module)
    out = run(net)
    assert torch.isfinite(out).all()
    out.float().mean().backward()
    assert any(p.grad is not None for p in net.parameters())


def test_unknown_name_lists_choices():
    with pytest.raises(ConfigError, match=r"choose one of \[.*'time_unet'.*\].*did you mean 'time_unet'"):
        create_net("time_unett")


def test_none_kwargs_are_dropped_and_kwargs_override_preset():
    net = create_net(
        "time_unet", preset="small", in_channels=1, out_channels=2, base=8, dropout=None, mult=None
    )
    assert isinstance(net, TimeUNet)
    assert net.base == 8 and net.mult == (1, 2, 4)  # base overridden, mult from the preset (None dropped)
    with pytest.raises(ConfigError, match="choose one of"):
        create_net("convnext_seg", preset="huge", in_chans=3, num_classes=2)
