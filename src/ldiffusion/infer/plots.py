"""Figure-1-style plot of L-Diffusion pixel latent vectors: per class, the value distribution at each step.

`pixel_values_by_class` collects the grey values g_k(p) of labelled pixels per class and step from feature
stacks (B, T, H, W); `plot_step_violins` draws one panel per noise family (e.g. Laplace vs Gaussian side by
side), with one violin per (step, class). Needs matplotlib (the ``plot`` extra); it is imported only here,
with the Agg backend, and a missing install raises an `LDiffusionError` naming the extra.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ldiffusion.core.errors import InputError, LDiffusionError
from ldiffusion.core.io import atomic_write_bytes

logger = logging.getLogger(__name__)

__all__ = ["import_pyplot", "pixel_values_by_class", "plot_step_violins"]


def import_pyplot() -> Any:
    """Return `matplotlib.pyplot` on the Agg backend, or raise naming the ``plot`` extra."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise LDiffusionError(f"plots need the 'plot' extra: pip install \"ldiffusion[plot]\" ({e})") from e
    return plt


def pixel_values_by_class(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    *,
    max_per_class: int = 2000,
    generator: torch.Generator | None = None,
    ignore_index: int = 255,
) -> dict[int, np.ndarray]:
    """Collect pixel-vector values per class.

    Args:
        features: (B, T, H, W) feature stacks.
        labels: (B, H, W) class ids (same H, W; resize nearest-neighbour only).
        num_classes: classes K.
        max_per_class: subsample each class to at most this many pixels (uniform, without replacement).
        generator: generator of the subsampling.
        ignore_index: label value left out.

    Returns:
        class id -> (n_c, T) float array, for the classes present.
    """
    if features.ndim != 4 or labels.shape != (features.shape[0], *features.shape[2:]):
        raise InputError(
            f"expected features (B, T, H, W) and labels (B, H, W), got {tuple(features.shape)} "
            f"and {tuple(labels.shape)}"
        )
    T = features.shape[1]
    vec = features.detach().float().permute(0, 2, 3, 1).reshape(-1, T).cpu()
    lab = labels.reshape(-1).cpu()
    out: dict[int, np.ndarray] = {}
    for c in range(num_classes):
        if c == ignore_index:
            continue
        idx = torch.nonzero(lab == c).flatten()
        if idx.numel() == 0:
            continue
        if idx.numel() > max_per_class:
            idx = idx[torch.randperm(idx.numel(), generator=generator)[:max_per_class]]
        out[c] = vec[idx].numpy()
    return out


def plot_step_violins(
    panels: Mapping[str, Mapping[int, np.ndarray]],
    out_path: str | Path,
    *,
    class_names: Sequence[str] | None = None,
    colors: np.ndarray | None = None,
    title: str = "Pixel latent vectors per diffusion step",
    dpi: int = 110,
) -> Path:
    """Draw per-class violins of the pixel-vector values at each step, one panel per noise family.

    Args:
        panels: panel title (e.g. "Laplace", "Gaussian") -> {class id: (n_c, T) values}.
        out_path: PNG file to write (atomically).
        class_names: names by class id (legend).
        colors: (K, 3) uint8 palette by class id (default: matplotlib's tab10).
        title: figure title.
        dpi: resolution.

    Returns:
        `out_path`.
    """
    plt = import_pyplot()
    if not panels:
        raise InputError("plot_step_violins: no panels to draw")
    classes = sorted({c for p in panels.values() for c in p})
    T = max(v.shape[1] for p in panels.values() for v in p.values())
    n = len(classes)
    cmap = plt.get_cmap("tab10")

    def colour(c: int) -> Any:
        if colors is not None and c < len(colors) and any(colors[c]):
            return tuple(float(x) / 255 for x in colors[c])
        return cmap(c % 10)

    fig, axes = plt.subplots(
        1,
        len(panels),
        figsize=(max(4.0, 0.55 * T * n) * len(panels) / 1.6 + 2, 4.2),
        sharey=True,
        squeeze=False,
    )
    width = 0.8 / max(n, 1)
    for ax, (name, data) in zip(axes[0], panels.items(), strict=True):
        for j, c in enumerate(classes):
            if c not in data or len(data[c]) < 2:
                continue
            vals = data[c]
            pos = [k + 1 + (j - (n - 1) / 2) * width for k in range(vals.shape[1])]
            parts = ax.violinplot(
                [vals[:, k] for k in range(vals.shape[1])],
                positions=pos,
                widths=width * 0.95,
                showmeans=False,
                showmedians=True,
                showextrema=False,
            )
            for body in parts["bodies"]:
                body.set_facecolor(colour(c))
                body.set_edgecolor("black")
                body.set_linewidth(0.4)
                body.set_alpha(0.75)
            parts["cmedians"].set_color("black")
            parts["cmedians"].set_linewidth(0.6)
        ax.set_title(name)
        ax.set_xticks(range(1, T + 1))
        ax.set_xlabel("reverse step k (feature map r_k)")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("grey value of the decoded map")
    names = list(class_names) if class_names is not None else [f"class {c}" for c in classes]
    handles = [plt.Rectangle((0, 0), 1, 1, facecolor=colour(c), alpha=0.75) for c in classes]
    fig.legend(
        handles,
        [names[c] if c < len(names) else str(c) for c in classes],
        loc="lower center",
        ncol=min(n, 6),
        frameon=False,
    )
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, buf.getvalue())
    logger.info("wrote %s", out)
    return out
