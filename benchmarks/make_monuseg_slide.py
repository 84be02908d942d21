"""Stitch the 14 MoNuSeg test images into one pyramidal, tiled TIFF "slide" (mpp 0.25) for a real run.

The images (1000 x 1000 px at 40x, ~0.25 um/px) are laid out on a 4 x 4 grid separated by white
glass, so tissue detection has background to skip. Writes:

- `monuseg_test_slide.tif`: BigTIFF, RGB, 256 px tiles, zlib, levels 1, 2, 4 as SubIFDs, with
  resolution tags and `mpp` (readable by tiffslide, QuPath and `ldiffusion slide predict`);
- `monuseg_test_slide.json`: the placement (x, y, w, h in level-0 px) of each image id, to compare
  the slide prediction with the per-image predictions or the ground truth.

    python benchmarks/make_monuseg_slide.py --src "../shared/data/monuseg/test/Tissue Images" --out slides/
    ldiffusion slide predict RUN slides/monuseg_test_slide.tif --out slide_out
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np

from ldiffusion.core.io import write_json
from ldiffusion.data.format import IMAGE_SUFFIXES, read_image
from ldiffusion.infer.writers import atomic_path

MPP = 0.25


def downsample2(img: np.ndarray) -> np.ndarray:
    """Halve an RGB image by 2 x 2 box averaging (odd edges replicated)."""
    h, w = img.shape[:2]
    img = np.pad(img, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge").astype(np.uint16)
    return ((img[0::2, 0::2] + img[1::2, 0::2] + img[0::2, 1::2] + img[1::2, 1::2] + 2) // 4).astype(np.uint8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", type=Path, default=Path("../shared/data/monuseg/test/Tissue Images"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    ap.add_argument("--cols", type=int, default=4)
    ap.add_argument("--gap", type=int, default=256, help="white glass between images (px)")
    ap.add_argument("--levels", type=int, default=3)
    args = ap.parse_args()
    import tifffile

    files = sorted(p for p in args.src.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if len(files) != 14:
        print(f"warning: expected the 14 MoNuSeg test images, found {len(files)} in {args.src}")
    images = [(p.stem, read_image(p)) for p in files]
    cell_w = max(im.shape[1] for _, im in images)
    cell_h = max(im.shape[0] for _, im in images)
    rows = math.ceil(len(images) / args.cols)
    W = args.cols * cell_w + (args.cols + 1) * args.gap
    H = rows * cell_h + (rows + 1) * args.gap
    slide = np.full((H, W, 3), 242, np.uint8)  # glass
    placement = {}
    for i, (name, im) in enumerate(images):
        r, c = divmod(i, args.cols)
        x, y = args.gap + c * (cell_w + args.gap), args.gap + r * (cell_h + args.gap)
        slide[y : y + im.shape[0], x : x + im.shape[1]] = im
        placement[name] = {"x": x, "y": y, "w": int(im.shape[1]), "h": int(im.shape[0])}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "monuseg_test_slide.tif"
    opts = {"tile": (256, 256), "photometric": "rgb", "compression": "zlib", "resolutionunit": "CENTIMETER"}
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=True) as tif:
        # mpp comes from the resolution tags (tiffslide: `tiffslide.mpp-x`); no Aperio description, so
        # readers treat the file as a generic pyramidal TIFF and see the SubIFD levels
        tif.write(slide, subifds=args.levels - 1, resolution=(1e4 / MPP, 1e4 / MPP), metadata=None, **opts)
        level = slide
        for k in range(1, args.levels):
            level = downsample2(level)
            f = 2**k
            tif.write(level, subfiletype=1, resolution=(1e4 / MPP / f, 1e4 / MPP / f), metadata=None, **opts)
    write_json(
        args.out / "monuseg_test_slide.json", {"mpp": MPP, "width": W, "height": H, "images": placement}
    )
    print(f"wrote {path} ({W} x {H} px, {args.levels} levels, mpp {MPP}) and its placement json")


if __name__ == "__main__":
    main()
