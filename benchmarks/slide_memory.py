"""Peak memory of whole-slide prediction on a lazily generated virtual slide (not a timed test).

Runs `predict_slide` on a `VirtualSlide` of SIZE x SIZE pixels (pixels computed on demand, so the
slide itself takes no memory) with a trivial per-pixel model, all outputs enabled, and prints the
peak resident set size (`resource.getrusage`, the whole process including torch) next to the
baseline after imports. Memory should not grow with the slide: compare `--size 4096` and the
default 16384.

    python benchmarks/slide_memory.py                 # 16k x 16k
    python benchmarks/slide_memory.py --size 4096
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from ldiffusion.infer.slide import VirtualSlide, he_pattern
from ldiffusion.infer.slide_predict import predict_slide


class PurpleModel:
    """Trivial segmenter: class 1 where the pixel is purple (low green), else class 0."""

    num_classes = 2
    class_names = ("background", "nucleus")

    def predict_proba(
        self, images: torch.Tensor, *, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        fg = (images[:, 1] < 0.35).float()
        return torch.stack([1 - fg, fg], 1)


def peak_rss_mib() -> float:
    """Peak resident set size of this process in MiB (Linux reports KiB)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024 if sys.platform != "darwin" else r / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=16384, help="slide side in pixels")
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--overlap", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--formats", default="ome-tiff,geojson,png")
    ap.add_argument(
        "--out", type=Path, default=None, help="output folder (default: a temporary one, removed)"
    )
    ap.add_argument("--json", type=Path, default=None,
                    help="also write the figures, the command and the commit to this JSON file")
    args = ap.parse_args()
    torch.set_num_threads(1)
    slide = VirtualSlide(
        args.size, args.size, he_pattern, mpp=0.25, downsamples=(1, 4, 16), path="virtual.tif"
    )
    base = peak_rss_mib()
    out = args.out or Path(tempfile.mkdtemp(prefix="slide_memory_"))
    t0 = time.perf_counter()
    try:
        res = predict_slide(
            PurpleModel(),
            slide,
            out,
            tile_px=args.tile,
            overlap_px=args.overlap,
            batch_size=args.batch_size,
            formats=args.formats,
            progress=True,
        )
        sizes = {p.name: p.stat().st_size for p in (out / res.id).iterdir() if p.is_file()}
    finally:
        if args.out is None:
            shutil.rmtree(out, ignore_errors=True)
    dt = time.perf_counter() - t0
    peak = peak_rss_mib()
    print(
        f"slide {args.size} x {args.size} px ({args.size**2 * 3 / 2**30:.2f} GiB RGB), tile {args.tile}, "
        f"overlap {args.overlap}, batch {args.batch_size}: {res.n_tiles} tiles in {dt:.0f} s"
    )
    print(
        f"peak RSS {peak:.0f} MiB (after imports: {base:.0f} MiB; "
        f"slide prediction added {peak - base:.0f} MiB)"
    )
    print("outputs: " + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in sorted(sizes.items())))
    if args.json is not None:
        write_record(args, res.n_tiles, dt, base, peak, sizes)


def write_record(args: argparse.Namespace, n_tiles: int, wall_s: float, base: float, peak: float,
                 sizes: dict[str, int]) -> None:
    """The run's figures, with the command, commit and versions, written atomically to `args.json`."""
    import datetime
    import platform
    import shlex

    from accuracy import _git_commit  # the benchmarks' one commit lookup (beside this script)

    import ldiffusion
    from ldiffusion.core.io import write_json

    write_json(args.json, {
        "schema": 1, "date": datetime.date.today().isoformat(), "machine": platform.node(),
        "command": "python benchmarks/slide_memory.py " + shlex.join(sys.argv[1:]),
        "git_commit": _git_commit(), "ldiffusion": ldiffusion.__version__, "torch": torch.__version__,
        "threads": torch.get_num_threads(), "size_px": args.size, "tile_px": args.tile,
        "overlap_px": args.overlap, "batch_size": args.batch_size, "formats": args.formats,
        "n_tiles": n_tiles, "wall_s": round(wall_s, 1), "rss_after_imports_mib": round(base, 1),
        "peak_rss_mib": round(peak, 1), "added_by_prediction_mib": round(peak - base, 1),
        "output_bytes": sizes,
    })

if __name__ == "__main__":
    main()
