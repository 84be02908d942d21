"""Device and precision resolution, and the inference autocast of segmenters."""

from __future__ import annotations

import pytest
import torch

from ldiffusion.core import device as dev
from ldiffusion.core.errors import ConfigError
from ldiffusion.methods import create_method, resolve_config


def test_resolve_precision_auto_follows_the_hardware(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    monkeypatch.setattr(dev, "has_native_bf16", lambda d: True)
    assert dev.resolve_precision("auto", cpu) == "bf16"
    monkeypatch.setattr(dev, "has_native_bf16", lambda d: False)
    assert dev.resolve_precision("auto", cpu) == "fp32"
    assert dev.resolve_precision("bf16", cpu) == "bf16"
    assert dev.resolve_precision("fp32", cpu) == "fp32"


def test_precision_note_only_when_auto_falls_back_to_fp32_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    monkeypatch.setattr(dev, "has_native_bf16", lambda d: False)
    assert "no native bf16" in dev.precision_note("auto", cpu)
    assert dev.precision_note("fp32", cpu) is None  # asked for by name: nothing to tell
    monkeypatch.setattr(dev, "has_native_bf16", lambda d: True)
    assert dev.precision_note("auto", cpu) is None


def test_resolve_precision_rejects_unknown_names() -> None:
    with pytest.raises(ConfigError, match=r"precision='fp8'.*auto"):
        dev.resolve_precision("fp8", torch.device("cpu"))


def test_cpu_flags_are_read_on_linux() -> None:
    flags = dev._cpu_flags()
    assert isinstance(flags, frozenset)


def test_bf16_inference_is_float32_out_and_close_to_fp32() -> None:
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    probs = {}
    for precision in ("fp32", "bf16"):
        cfg = resolve_config("unet", None, "tiny", [f"precision={precision}"])
        method = create_method("unet", cfg, num_classes=3).eval()
        with torch.no_grad():
            probs[precision] = method.predict_proba(x)
    assert probs["bf16"].dtype == torch.float32
    assert torch.allclose(probs["bf16"].sum(1), torch.ones(2, 64, 64), atol=1e-5)
    diff = (probs["bf16"] - probs["fp32"]).abs().max()
    assert 0 < diff < 0.1  # bf16 really ran (not identical) and stays close
