"""Shared checks for the net tests (timm/smp style contract): gradients, save/load round trip, determinism."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from ldiffusion.core.io import load_weights, save_weights


def unzero(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every all-zero parameter (zero-init convs/projections) small random values, so that every
    parameter gets a non-zero gradient in a single backward pass."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() and not p.any():
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
    return model


def assert_all_params_get_grad(model: nn.Module, loss: Tensor) -> None:
    """Backward ``loss`` and check every parameter has a finite, not-all-zero gradient."""
    model.zero_grad(set_to_none=True)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters without gradient: {missing}"
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite gradients: {bad}"
    dead = [n for n, p in model.named_parameters() if not p.grad.any()]
    assert not dead, f"all-zero gradients: {dead}"


def assert_save_load_roundtrip(
    make: Callable[[], nn.Module], run: Callable[[nn.Module], Tensor], tmp_path: Path
) -> None:
    """Save ``make()``'s weights as safetensors, load them into a differently seeded ``make()``,
    and check ``run`` gives identical outputs (eval mode)."""
    torch.manual_seed(1)
    a = make().eval()
    path = tmp_path / "model.safetensors"
    save_weights(path, a.state_dict())
    torch.manual_seed(2)
    b = make().eval()
    with torch.no_grad():
        before = run(b)
        b.load_state_dict(load_weights(path), strict=True)
        out_a, out_b = run(a), run(b)
    assert torch.equal(out_a, out_b)
    assert not torch.equal(before, out_b), "differently seeded models should differ before loading"


def assert_deterministic(make: Callable[[], nn.Module], run: Callable[[nn.Module], Tensor]) -> None:
    """Same init seed -> same weights -> same outputs."""
    outs = []
    for _ in range(2):
        torch.manual_seed(0)
        m = make().eval()
        with torch.no_grad():
            outs.append(run(m))
    assert torch.equal(outs[0], outs[1])


def n_params(model: nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in model.parameters())
