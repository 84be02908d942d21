"""Options and helpers shared by the subcommands."""

from __future__ import annotations

import platform

import typer

import ldiffusion


def version_text() -> str:
    """Return "ldiffusion X (Python Y, torch Z)"."""
    try:
        import torch

        torch_version = torch.__version__
    except ImportError:  # pragma: no cover - torch is a core dependency
        torch_version = "not installed"
    return f"ldiffusion {ldiffusion.__version__} (Python {platform.python_version()}, torch {torch_version})"


DEVICE = typer.Option("auto", "--device", help="Compute device: auto, cpu, cuda or cuda:N.")
SEED = typer.Option(0, "--seed", help="Seed for every random draw of the command.")
PROGRESS = typer.Option(True, "--progress/--no-progress", help="Show progress bars on stderr.")
