"""Options and helpers shared by the subcommands."""

from __future__ import annotations

import platform

import typer

import ldiffusion
from ldiffusion.core.errors import ConfigError
from ldiffusion.core.registry import suggest


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


METHOD_NAMES = ("unet", "ldiffusion", "ldseg", "cdal", "autoencoder")
"""The names in `ldiffusion.methods.METHODS`, in the order `--help` lists them (a test keeps the two equal;
listed here so that `--help` does not import every method)."""


def check_method(value: str | None) -> str | None:
    """Option callback: return `value` if it names a method, else raise `ConfigError` with a suggestion."""
    if value is not None and value not in METHOD_NAMES:
        raise ConfigError(f"--method {value!r} is not a method; choose one of {', '.join(METHOD_NAMES)}"
                          f"{suggest(value, list(METHOD_NAMES))}")
    return value


METHOD = typer.Option(
    ..., "--method", metavar="<" + "|".join(METHOD_NAMES) + ">", callback=check_method,
    help="Method: unet (U-Net baseline), ldiffusion (L-Diffusion), ldseg (LDSeg), cdal (cDAL) or autoencoder "
    "(L-Diffusion's stage 0 on its own).",
)
