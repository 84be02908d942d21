"""`train_state.pt`: everything needed to resume a run exactly where it stopped.

Content (a dict saved with `torch.save`, written atomically):
`version`, `method`, `model` (full state dict, incl. modules excluded from inference weights),
`optimizers` (name -> state dict, for the current stage), `stage_index`, `stage_name`, `step`
(optimiser steps done in the stage), `epoch`, `stage_done`, `best_score`, `best_step`, `elapsed_s`,
`seed`, `generator` (state of the loop generator) and `rng` (global Python/NumPy/torch states).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from ldiffusion.core.errors import CheckpointError
from ldiffusion.core.io import save_torch

STATE_FILE = "train_state.pt"
STATE_VERSION = 1


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
               generator: torch.Tensor, rng: dict[str, Any]) -> None:
    """Write `train_state.pt` atomically."""
    save_torch(path, {
        "version": STATE_VERSION, "method": method_name,
        "model": {k: v.detach().cpu() for k, v in model.items()},
        "optimizers": optimizers, **dataclasses.asdict(state),
        "seed": seed, "generator": generator, "rng": rng,
    })


def load_state(path: str | Path) -> dict[str, Any]:
    """Read `train_state.pt` (our own file, so full unpickling is allowed).

    Raises:
        CheckpointError: missing, unreadable or of another version.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: not found; nothing to resume (drop --resume to start a new run)")
    try:
        d = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # corrupt file: any unpickling error
        raise CheckpointError(f"{path}: cannot read the training state ({e})") from e
    if not isinstance(d, dict) or d.get("version") != STATE_VERSION:
        raise CheckpointError(f"{path}: unsupported training-state version {d.get('version')!r}; "
                              f"expected {STATE_VERSION}")
    return d


def counters(d: dict[str, Any]) -> TrainState:
    """Return the `TrainState` counters stored in a loaded state dict."""
    return TrainState(**{f.name: d[f.name] for f in dataclasses.fields(TrainState)})
