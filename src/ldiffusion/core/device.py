"""Device and precision selection, resolved once at the command line."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from ldiffusion.core.errors import ConfigError


def resolve_device(name: str = "auto") -> torch.device:
    """Turn "auto" | "cpu" | "cuda" | "cuda:N" | "mps" into a `torch.device`.

    "auto" picks CUDA when available, else CPU. Asking for CUDA without a GPU is an error.
    """
    name = name.strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device={name!r} requested but CUDA is not available; use --device cpu")
        return torch.device(name)
    if name == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError("device='mps' requested but MPS is not available; use --device cpu")
        return torch.device("mps")
    raise ConfigError(f"device={name!r} is not valid; choose one of ['auto', 'cpu', 'cuda', 'cuda:N', 'mps']")


@contextlib.contextmanager
def autocast(device: torch.device, precision: str = "fp32") -> Iterator[None]:
    """Autocast context for "fp32" (no-op), "bf16" or "fp16"."""
    if precision == "fp32":
        yield
        return
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is None:
        raise ConfigError(f"precision={precision!r} is not valid; choose one of ['bf16', 'fp16', 'fp32']")
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield
