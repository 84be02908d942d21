"""Explicit randomness: generators from seeds, RNG state capture for resume.

Library code never seeds global RNGs; `seed_everything` exists for scripts and the CLI only.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch global RNGs (CLI/scripts only; library code uses generators)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 (global state, for third-party code)
    torch.manual_seed(seed)


def make_generator(seed: int, device: str | torch.device = "cpu") -> torch.Generator:
    """Return a `torch.Generator` on `device` seeded with `seed`."""
    g = torch.Generator(device=device)
    g.manual_seed(int(seed))
    return g


def derive_seed(*parts: Any) -> int:
    """Return a stable 63-bit seed from any printable parts (e.g. slide id, x, y)."""
    h = hashlib.sha256("|".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "little") & (2**63 - 1)


def spawn(generator: torch.Generator, n: int) -> list[torch.Generator]:
    """Derive `n` independent generators from `generator` (advances it)."""
    seeds = torch.randint(0, 2**62, (n,), generator=generator, device=generator.device).tolist()
    return [make_generator(s, generator.device) for s in seeds]


def worker_init_fn(worker_id: int) -> None:
    """Seed NumPy and `random` in a DataLoader worker from torch's per-worker seed."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)  # noqa: NPY002 (per-worker global state)
    random.seed(seed)


def rng_state() -> dict[str, Any]:
    """Capture global RNG states (for `train_state.pt`)."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),  # noqa: NPY002
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore global RNG states captured by `rng_state`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])  # noqa: NPY002
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
