"""Real-data round trip through QuPath GeoJSON: MoNuSeg XML -> slide GeoJSON -> tiles == monuseg converter.

1. `benchmarks/make_monuseg_slide.py` stitches the 14 MoNuSeg test images into one pyramidal TIFF
   (mpp 0.25) and writes where each image lies;
2. `ldiffusion data export-geojson` converts their Aperio XML to one QuPath GeoJSON for the
   slide, each nucleus moved to its slide position, plus a "Region*" rectangle per image (the
   image is fully annotated, so pixels outside the nuclei are background);
3. `ldiffusion data prepare qupath` rasterises it back at the slide's native mpp with
   `--tile 1000 --grid region`, so each image becomes exactly one tile; once with the default
   repair of invalid outlines (`shapely.make_valid`) and once with `--no-repair`;
4. `ldiffusion data prepare monuseg` converts the release as usual;
5. every test image is compared: labels pixel by pixel, instance maps up to relabelling, and
   the image pixels.

    python benchmarks/qupath_roundtrip.py [--shared-data ../shared/data] [--work DIR] [--out result.json]

Prints one line per image and a summary per mode; exits 0 when the `--no-repair` label and instance
maps are exact. With the default repair a few pixels differ: `make_valid` computes the vertices
where a self-intersecting outline crosses itself in floating point, so a pixel centre that lay
exactly on the original outline can fall a hair outside the repaired one.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def _default_shared() -> Path:
    for c in (REPO.parent / "shared" / "data", Path("/work/shared/data")):
        if (c / "README.md").is_file():
            return c
    return REPO.parent / "shared" / "data"


def _ldiffusion(*args: str) -> None:
    from ldiffusion.cli import main

    print("$ ldiffusion " + " ".join(args), flush=True)
    rc = main(["--log-level", "ERROR", *args])
    if rc != 0:
        raise SystemExit(f"command failed with exit code {rc}")


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """True when two instance maps are equal up to a relabelling of their ids (0 stays 0)."""
    pairs = np.unique(np.stack([a.ravel().astype(np.int64), b.ravel().astype(np.int64)]), axis=1)
    if ((pairs[0] == 0) != (pairs[1] == 0)).any():
        return False
    return len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1]


def compare(qp_out: Path, ref_out: Path, placement: dict[str, Any]) -> dict[str, Any]:
    """Compare the prepared tiles with the monuseg converter's test images, image by image."""
    from ldiffusion.data.format import read_dataset_info, read_image, read_mask

    qp_ids = set(read_dataset_info(qp_out).ids("all"))
    rows = []
    for stem in read_dataset_info(ref_out).splits["test"]:
        p = placement["images"][stem]
        tid = f"monuseg_test_slide_x{p['x']}_y{p['y']}"
        row: dict[str, Any] = {"image": stem, "tile": tid, "present": tid in qp_ids}
        if tid in qp_ids:
            lab_q = read_mask(qp_out / "labels" / f"{tid}.png")
            lab_r = read_mask(ref_out / "labels" / f"{stem}.png")
            inst_q = read_mask(qp_out / "instances" / f"{tid}.png")
            inst_r = read_mask(ref_out / "instances" / f"{stem}.png")
            img_q = read_image(qp_out / "images" / f"{tid}.png")
            img_r = read_image(ref_out / "images" / f"{stem}.png")
            same_shape = lab_q.shape == lab_r.shape
            row.update(
                label_diff_px=int((lab_q != lab_r).sum()) if same_shape else None,
                nucleus_px=int((lab_r == 1).sum()),
                instances_equal_up_to_relabelling=bool(same_shape and same_partition(inst_q, inst_r)),
                instance_diff_px=int(_partition_diff(inst_q, inst_r)) if same_shape else None,
                image_equal=bool(np.array_equal(img_q, img_r)),
            )
        rows.append(row)
    return {
        "images": rows,
        "n_images": len(rows),
        "n_label_exact": sum(r.get("label_diff_px") == 0 for r in rows),
        "total_label_diff_px": int(sum(r.get("label_diff_px") or 0 for r in rows)),
        "total_nucleus_px": int(sum(r.get("nucleus_px") or 0 for r in rows)),
        "all_instances_equal": all(r.get("instances_equal_up_to_relabelling") for r in rows),
        "all_images_equal": all(r.get("image_equal") for r in rows),
    }


def _partition_diff(a: np.ndarray, b: np.ndarray) -> int:
    """Pixels whose instance differs after mapping each id of `a` to its most overlapping id of `b`."""
    a64, b64 = a.astype(np.int64).ravel(), b.astype(np.int64).ravel()
    pairs, counts = np.unique(np.stack([a64, b64]), axis=1, return_counts=True)
    best: dict[int, tuple[int, int]] = {}
    for (ia, ib), n in zip(pairs.T.tolist(), counts.tolist(), strict=True):
        if ia not in best or n > best[ia][1]:
            best[ia] = (ib, n)
    lut = np.zeros(int(a64.max(initial=0)) + 1, dtype=np.int64)
    for ia, (ib, _) in best.items():
        lut[ia] = ib
    return int((lut[a64] != b64).sum())


def run(shared: Path, work: Path) -> dict[str, Any]:
    """Run the round trip in `work`; return the comparison with and without geometry repair."""
    monuseg = shared / "monuseg"
    slide_dir, ann_dir, ref_out = work / "slide", work / "annotations", work / "monuseg"
    t0 = time.perf_counter()
    cmd = [sys.executable, str(REPO / "benchmarks" / "make_monuseg_slide.py"), "--src",
           str(monuseg / "test" / "Tissue Images"), "--out", str(slide_dir)]  # fmt: skip
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    placement = json.loads((slide_dir / "monuseg_test_slide.json").read_text())
    _ldiffusion("data", "export-geojson", str(monuseg / "test" / "Annotations"),
                str(ann_dir / "monuseg_test_slide.geojson"), "--placement",
                str(slide_dir / "monuseg_test_slide.json"))  # fmt: skip
    common = ["--slides", str(slide_dir / "monuseg_test_slide.tif"), "--annotations", str(ann_dir),
              "--tile", "1000", "--grid", "region", "--val-fraction", "0", "--test-fraction", "0",
              "--instances", "--no-progress", "--force"]  # fmt: skip
    _ldiffusion("data", "prepare", "qupath", str(work / "qupath_tiles"), *common)
    _ldiffusion("data", "prepare", "qupath", str(work / "qupath_tiles_norepair"), *common, "--no-repair")
    _ldiffusion("data", "prepare", "monuseg", str(monuseg), str(ref_out), "--no-progress")
    return {
        "repair": compare(work / "qupath_tiles", ref_out, placement),
        "no_repair": compare(work / "qupath_tiles_norepair", ref_out, placement),
        "seconds": round(time.perf_counter() - t0, 1),
    }


def _report(title: str, res: dict[str, Any]) -> None:
    print(f"\n{title}")
    print(
        f"{'image':<26} {'label diff px':>13} {'nucleus px':>10} {'instances':>10} "
        f"{'inst diff px':>12} {'image':>6}"
    )
    for r in res["images"]:
        if not r["present"]:
            print(f"{r['image']:<26} tile {r['tile']} missing")
            continue
        inst = "same" if r["instances_equal_up_to_relabelling"] else "differ"
        print(f"{r['image']:<26} {r['label_diff_px']:>13} {r['nucleus_px']:>10} {inst:>10} "
              f"{r['instance_diff_px']:>12} {'same' if r['image_equal'] else 'DIFFER':>6}")  # fmt: skip
    print(f"{res['n_label_exact']} of {res['n_images']} label maps pixel-exact; {res['total_label_diff_px']} "
          f"differing pixels of {res['total_nucleus_px']} nucleus pixels; instance maps "
          f"{'all equal up to relabelling' if res['all_instances_equal'] else 'not all equal'}; images "
          f"{'all equal' if res['all_images_equal'] else 'differ'}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Run the round trip and print the comparison; return 0 when `--no-repair` labels are pixel-exact."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--shared-data", type=Path, default=_default_shared(), help="folder of the public releases"
    )
    ap.add_argument("--work", type=Path, default=None, help="working folder (default: a temporary folder)")
    ap.add_argument("--out", type=Path, default=None, help="write the result as JSON here")
    args = ap.parse_args(argv)
    if not (args.shared_data / "monuseg" / "test" / "Annotations").is_dir():
        print(f"MoNuSeg not found under {args.shared_data}; pass --shared-data", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="qupath_roundtrip_") as tmp:
        result = run(args.shared_data, args.work or Path(tmp))
    _report("default (invalid outlines repaired with shapely.make_valid):", result["repair"])
    _report("--no-repair (outlines filled as they are, like the monuseg converter):", result["no_repair"])
    print(f"\n{result['seconds']} s")
    if args.out is not None:
        from ldiffusion.core.io import write_json

        write_json(args.out, result)
    res = result["no_repair"]
    return 0 if res["n_label_exact"] == res["n_images"] and res["all_instances_equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
