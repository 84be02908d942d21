"""Device and precision selection, resolved once at the command line."""

from __future__ import annotations

import contextlib
import functools
import platform
from collections.abc import Iterator
from pathlib import Path

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


@functools.cache
def _cpu_flags() -> frozenset[str]:
    """CPU feature flags from /proc/cpuinfo (empty where it cannot be read, e.g. not Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def has_native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 matmuls/convolutions in hardware.

    CUDA: `torch.cuda.is_bf16_supported()` (Ampere and newer). CPU: the `avx512_bf16` or `amx_bf16`
    flag (x86) or `bf16` (aarch64). Elsewhere False.
    """
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        flags = _cpu_flags()
        if platform.machine().lower() in ("aarch64", "arm64"):
            return "bf16" in flags
        return bool({"avx512_bf16", "amx_bf16"} & flags)
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """Turn a config `precision` ("auto" | "fp32" | "bf16" | "fp16") into the one used on `device`.

    "auto" is "bf16" where the device has native bf16 arithmetic (`has_native_bf16`) and "fp32"
    otherwise. On a 2-core AMD EPYC with avx512_bf16, bf16 autocast made a U-Net `small` training
    step 2.3x and its inference 2.4x faster than fp32 (docs/benchmarks.md).
    """
    if precision == "auto":
        return "bf16" if has_native_bf16(device) else "fp32"
    if precision not in ("fp32", "bf16", "fp16"):
        raise ConfigError(
            f"precision={precision!r} is not valid; choose one of ['auto', 'bf16', 'fp16', 'fp32']"
        )
    return precision


def precision_note(precision: str, device: torch.device) -> str | None:
    """Return a one-line note when `precision="auto"` falls back to fp32 on a CPU, else None.

    Training budgets are wall-clock minutes (`--max-minutes`), so a user on such a CPU should know
    that a minute buys fewer steps: a U-Net `small` step took 9.2 s in fp32 on a 2-core AMD EPYC
    without bf16 against 1.0 s in bf16 on a 2-core Intel Xeon with AMX (docs/results.md, eighteenth run).
    """
    if precision != "auto" or device.type != "cpu" or resolve_precision(precision, device) != "fp32":
        return None
    return ("precision auto -> fp32: this CPU has no native bf16 (avx512_bf16 / amx_bf16), so training steps "
            "take several times longer than on a CPU with it and a --max-minutes budget buys fewer steps")


@contextlib.contextmanager
def autocast(device: torch.device, precision: str = "fp32") -> Iterator[None]:
    """Autocast context for "fp32" (no-op), "bf16", "fp16" or "auto" (see `resolve_precision`)."""
    precision = resolve_precision(precision, device)
    if precision == "fp32":
        yield
        return
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is None:
        raise ConfigError(f"precision={precision!r} is not valid; choose one of ['bf16', 'fp16', 'fp32']")
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield
