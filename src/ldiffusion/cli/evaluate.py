"""`ldiffusion evaluate` (placeholder until the evaluation module lands)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add the `evaluate` command to `app`."""
