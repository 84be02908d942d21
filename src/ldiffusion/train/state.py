"""`train_state.pt`: everything needed to resume a run exactly where it stopped.

Content (a dict saved with `torch.save`, written atomically):
`version`, `method`, `model` (full state dict, incl. modules excluded from inference weights),
`optimizers` (name -> state dict, for the current stage), `stage_index`, `stage_name`, `step`
(optimiser steps done in the stage), `epoch`, `stage_done`, `best_score`, `best_step`, `elapsed_s`,
`seed`, `generator` (state of the loop generator), `rng` (global Python/NumPy/torch states, see
`core.rng.rng_state`) and `run` (what the run was started with: `num_classes`, the resolved
config as JSON text and the data set fingerprint; compared on resume).

Every value is a tensor or a plain Python value (dict, list, tuple, str, int, float, bool, None),
so the file is read with `torch.load(..., weights_only=True)`: a crafted file cannot run code.
Version 1 files (before this format) held NumPy arrays, need full unpickling and are refused.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from ldiffusion.core.errors import CheckpointError
from ldiffusion.core.io import save_torch

STATE_FILE = "train_state.pt"
STATE_VERSION = 2


@dataclasses.dataclass
class TrainState:
    """Counters of the loop (the tensors live in the method and optimisers)."""

    stage_index: int = 0
    stage_name: str = ""
    step: int = 0
    epoch: int = 0
    stage_done: bool = False
    best_score: float | None = None
    best_step: int | None = None
    elapsed_s: float = 0.0


def save_state(path: str | Path, *, method_name: str, model: dict[str, torch.Tensor],
               optimizers: dict[str, Any], state: TrainState, seed: int,
               generator: torch.Tensor, rng: dict[str, Any], run: dict[str, Any] | None = None) -> None:
    """Write `train_state.pt` atomically.

    Args:
        run: plain values identifying the run (`num_classes`, `config`, `data_fingerprint`).
    """
    save_torch(path, {
        "version": STATE_VERSION, "method": method_name,
        "model": {k: v.detach().cpu() for k, v in model.items()},
        "optimizers": optimizers, **dataclasses.asdict(state),
        "seed": seed, "generator": generator, "rng": rng, "run": dict(run or {}),
    })


def load_state(path: str | Path) -> dict[str, Any]:
    """Read `train_state.pt` with `weights_only=True` (tensors and plain values only; no code runs).

    Raises:
        CheckpointError: missing, unreadable, holding other objects (e.g. a version 1 file) or of
            another version.
    """
    import pickle

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: not found; nothing to resume (drop --resume to start a new run)")
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # objects other than tensors/plain values: never unpickled
        raise CheckpointError(
            f"{path}: holds objects other than tensors and plain values (a training state written "
            f"before ldiffusion's version-{STATE_VERSION} format, or not by ldiffusion); refusing to "
            "unpickle it: start a new run in another --out folder (or pass --overwrite)") from e
    except Exception as e:  # truncated or garbage file
        msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: cannot read the training state ({msg})") from e
    if not isinstance(d, dict) or d.get("version") != STATE_VERSION:
        found = d.get("version") if isinstance(d, dict) else type(d).__name__
        raise CheckpointError(f"{path}: unsupported training-state version {found!r}, expected "
                              f"{STATE_VERSION}; start a new run in another --out folder (or pass "
                              "--overwrite)")
    return d


def counters(d: dict[str, Any]) -> TrainState:
    """Return the `TrainState` counters stored in a loaded state dict."""
    return TrainState(**{f.name: d[f.name] for f in dataclasses.fields(TrainState)})
