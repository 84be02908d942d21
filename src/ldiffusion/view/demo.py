"""A small synthetic slide and its `slide predict` output, to try `ldiffusion view` without a model.

    python -m ldiffusion.view.demo /tmp/view_demo       # writes slide.tif and out/slide/
    ldiffusion view /tmp/view_demo/out/slide

The slide (default 1600 x 1000 px, 0.5 µm/px, levels 1 and 4 as SubIFDs) has pink "tissue" on its
left part with dark purple "nuclei" discs, and grey glass on the right; a rule-based colour model
(`ColourModel`: no weights) labels stroma and nuclei through the real `predict_slide`, and an
uncertainty map (`uncertainty.ome.tif`, high at class borders) is written beside the class map.
All draws use `numpy.random.default_rng(seed)`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from ldiffusion.infer.writers import write_ome_tiff

MPP = 0.5
GLASS = (236, 236, 240)
TISSUE = (232, 150, 190)
NUCLEUS = (110, 50, 150)
#: class colours far from the slide's own colours (green stroma, yellow nuclei)
PALETTE = np.array([(0, 0, 0), (0, 200, 0), (255, 230, 0)], dtype=np.uint8)
CLASS_NAMES = ("background", "stroma", "nucleus")


def synthetic_slide(width: int = 1600, height: int = 1000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Return `(rgb (H, W, 3) uint8, truth (H, W) uint8)`: tissue on the left 5/8, nuclei discs, glass.

    Truth classes: 0 glass, 1 stroma, 2 nucleus.
    """
    rng = np.random.default_rng(seed)
    truth = np.zeros((height, width), np.uint8)
    truth[:, : width * 5 // 8] = 1
    yy, xx = np.mgrid[:height, :width]
    for _ in range(max(1, width * height // 12000)):
        cx, cy = rng.integers(16, width * 5 // 8 - 16), rng.integers(16, height - 16)
        r = rng.integers(5, 12)
        y0, y1, x0, x1 = cy - r, cy + r + 1, cx - r, cx + r + 1
        disc = (xx[y0:y1, x0:x1] - cx) ** 2 + (yy[y0:y1, x0:x1] - cy) ** 2 <= r * r
        truth[y0:y1, x0:x1][disc] = 2
    colours = np.array([GLASS, TISSUE, NUCLEUS], dtype=np.int16)
    rgb = colours[truth] + rng.integers(-8, 9, size=(height, width, 3), dtype=np.int16)
    return np.clip(rgb, 0, 255).astype(np.uint8), truth


def write_slide(path: str | Path, rgb: np.ndarray, mpp: float = MPP, factors: tuple[int, ...] = (4,)) -> None:
    """Write `rgb` as a tiled (256 px), zlib, pyramidal BigTIFF with levels `factors` as SubIFDs."""
    import tifffile

    opts: dict[str, Any] = {
        "tile": (256, 256),
        "photometric": "rgb",
        "compression": "zlib",
        "resolutionunit": "CENTIMETER",
    }
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        tif.write(rgb, subifds=len(factors), resolution=(1e4 / mpp, 1e4 / mpp), metadata=None, **opts)
        for m in factors:
            small = rgb.reshape(rgb.shape[0] // m, m, rgb.shape[1] // m, m, 3).mean((1, 3))
            tif.write(
                np.rint(small).astype(np.uint8),
                subfiletype=1,
                resolution=(1e4 / mpp / m, 1e4 / mpp / m),
                metadata=None,
                **opts,
            )


class ColourModel:
    """A weightless tile model: nucleus where the pixel is dark, stroma where pink, else background.

    `predict_proba(x (B, 3, H, W) in [0, 1]) -> (B, 3, H, W)` one-hot probabilities.
    """

    num_classes = 3
    class_names = CLASS_NAMES
    palette = PALETTE

    def predict_proba(
        self, images: torch.Tensor, *, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """One-hot class probabilities (B, 3, H, W) from colour rules."""
        r, g = images[:, 0], images[:, 1]
        nucleus = r < 0.6
        stroma = (~nucleus) & (g < 0.78)
        cls = torch.where(nucleus, 2, torch.where(stroma, 1, 0))
        return torch.nn.functional.one_hot(cls, 3).permute(0, 3, 1, 2).float()


def border_uncertainty(labels: np.ndarray, width_px: float = 4.0) -> np.ndarray:
    """Uncertainty (H, W) uint8: 255 on class borders, decaying over `width_px` (0 far from borders)."""
    edge = np.zeros(labels.shape, bool)
    edge[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    edge[1:, :] |= labels[1:, :] != labels[:-1, :]
    dist = ndimage.distance_transform_edt(~edge)
    return np.clip(np.rint(255 * np.exp(-dist / width_px)), 0, 255).astype(np.uint8)


def make_demo(root: str | Path, width: int = 1600, height: int = 1000, seed: int = 0) -> Path:
    """Write `root/slide.tif` and its prediction `root/out/slide/` (+ uncertainty); return that folder."""
    import tifffile

    from ldiffusion.infer.slide_predict import predict_slide

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rgb, _ = synthetic_slide(width, height, seed)
    slide = root / "slide.tif"
    write_slide(slide, rgb)
    res = predict_slide(
        ColourModel(),
        slide,
        root / "out",
        tile_px=512,
        overlap_px=64,
        batch_size=4,
        progress=False,
        tissue=False,
    )
    out = Path(res.out_dir)
    if not (out / "uncertainty.ome.tif").is_file():  # `slide predict` without an uncertainty output
        with tifffile.TiffFile(out / "labels.ome.tif") as tif:
            levels = [lv.asarray() for lv in tif.series[0].levels]
        unc = [border_uncertainty(levels[0])]
        for lv in levels[1:]:
            r = round(levels[0].shape[1] / lv.shape[1])
            unc.append(np.ascontiguousarray(unc[0][::r, ::r]))
        write_ome_tiff(out / "uncertainty.ome.tif", unc, mpp=MPP, uuid="demo", name="uncertainty")
    return out


def main() -> None:
    """Command line: `python -m ldiffusion.view.demo ROOT [--width W --height H --seed S]`."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", type=Path)
    ap.add_argument("--width", type=int, default=1600)
    ap.add_argument("--height", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    out = make_demo(a.root, a.width, a.height, a.seed)
    print(f"wrote {a.root / 'slide.tif'} and {out}; view it with: ldiffusion view {out}")  # noqa: T201


if __name__ == "__main__":
    main()
