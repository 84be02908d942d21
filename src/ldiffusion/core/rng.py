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
    """Seed NumPy and `random` in a DataLoader worker from torch's per-worker seed.

    The worker also ignores SIGINT: Ctrl-C reaches the whole process group, and the main process
    alone decides when to stop (it finishes the current step and checkpoints it, see `train.loop`).
    """
    import signal

    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)  # noqa: NPY002 (per-worker global state)
    random.seed(seed)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def rng_state() -> dict[str, Any]:
    """Capture global RNG states (for `train_state.pt`) as tensors and plain Python values only.

    The result loads with `torch.load(..., weights_only=True)`: the NumPy state tuple
    `(name, keys uint32 (624,), pos, has_gauss, cached_gaussian)` is stored as a dict with the keys
    as an int64 tensor.
    """
    kind, keys, pos, has_gauss, gauss = np.random.get_state()  # noqa: NPY002
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore global RNG states captured by `rng_state`."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npst = state["numpy"]
    if isinstance(npst, dict):
        npst = (npst["kind"], np.asarray(npst["keys"], dtype=np.int64).astype(np.uint32), npst["pos"],
                npst["has_gauss"], npst["gauss"])
    np.random.set_state(npst)  # noqa: NPY002
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
