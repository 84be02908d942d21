"""Issue 17: seeded random mutations of `dataset.json`, QuPath GeoJSON imports and `--set` overrides.

Every run must end in success or a clear error (exit code 2 / an `LDiffusionError`, one line),
never in a traceback (any other exception type), and never write a file outside the output
folder: the whole parent folder is hashed before and after each run. The mutations are drawn
from fixed seeds, so a failure names the case that reproduces it; set LDIFFUSION_FUZZ_SEED=N to
draw other mutations (the seeds are offset by N).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ldiffusion.cli import main
from ldiffusion.core.errors import LDiffusionError

N_DATASET_JSON = 200
N_GEOJSON = 200
N_GEOJSON_CLI = 20
N_OVERRIDES = 300
SEED = int(os.environ.get("LDIFFUSION_FUZZ_SEED", "0"))

#: values that replace a random value of a document.
JUNK: list[Any] = [
    None, True, False, 0, -1, 1, 255, 256, 10**30, -(10**30), 1.5, -0.0, 1e308, float("nan"), float("inf"),
    "", "x", "../x", "/abs/path", "a\\b", "nul\x00byte", "é漢字🙂", "x" * 3000, "..", ".",
    [], {}, [1, 2], [[1, 2]], {"a": 1}, ["a", None], [0, 0, 0], [300, 0, 0], {"id": 0},
]


def tree(root: Path) -> dict[str, str]:
    """SHA-256 of every file under `root`, by relative path (folders as 'dir')."""
    out: dict[str, str] = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


def paths_of(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path (tuple of keys / indexes) into a JSON document, the root excluded."""
    out: list[tuple[Any, ...]] = []
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else []
    for k, v in items:
        out.append((*prefix, k))
        out.extend(paths_of(v, (*prefix, k)))
    return out


def mutate(doc: Any, rng: random.Random, extra: list[Any] = ()) -> Any:  # type: ignore[assignment]
    """Apply 1-3 random structural mutations to a deep copy of `doc`."""
    doc = copy.deepcopy(doc)
    for _ in range(rng.randint(1, 3)):
        paths = paths_of(doc)
        if not paths:
            return rng.choice(JUNK)
        path = rng.choice(paths)
        parent = doc
        for k in path[:-1]:
            parent = parent[k]
        key = path[-1]
        op = rng.random()
        if op < 0.5:
            parent[key] = copy.deepcopy(rng.choice([*JUNK, *extra]))
        elif op < 0.7:
            del parent[key]
        elif op < 0.8 and isinstance(parent, dict):
            parent[rng.choice(["zzz", "", "__proto__", "é"])] = rng.choice(JUNK)
        elif op < 0.9 and isinstance(parent[key], list):
            parent[key].append(copy.deepcopy(rng.choice([*JUNK, *extra])))
        else:  # the same value under another type
            v = parent[key]
            parent[key] = str(v) if not isinstance(v, str) else [v]
    return doc


def text_mutation(text: str, rng: random.Random) -> str | bytes:
    """Damage the JSON text itself."""
    op = rng.randrange(6)
    if op == 0:
        return text[: rng.randrange(len(text))]
    if op == 1:
        i = rng.randrange(len(text))
        return text[:i] + rng.choice(["}", "]", ",", '"', "\\", "\x00"]) + text[i:]
    if op == 2:
        return "[" * 50000 + "]" * 50000
    if op == 3:
        return b"\xff\xfe" + text.encode("utf-16-le")
    if op == 4:
        return text.encode() + b"\xc3\x28"
    return ""


def outcome(fn: Callable[[], Any], what: str) -> str:
    """Run `fn`; return "ok" or "error"; fail the test on any exception that is not an LDiffusionError."""
    try:
        rc = fn()
    except LDiffusionError as e:
        assert "\n" not in str(e).strip(), f"{what}: multi-line error {e!s:.300}"
        return "error"
    except Exception as e:
        pytest.fail(f"{what}: {type(e).__name__}: {e!s:.300}")
    if not isinstance(rc, int) or rc == 0:
        return "ok"
    assert rc == 2, f"{what}: exit code {rc}"
    return "error"


def cli(args: list[Any], capsys: pytest.CaptureFixture[str], what: str) -> int:
    """`main(args)` in-process; exit 2 must come with exactly one `error:` line (or problem lines)."""
    rc = main([str(a) for a in args])
    err = capsys.readouterr().err
    assert "Traceback" not in err, f"{what}: {err[-500:]}"
    if rc == 2 and "error:" in err:
        assert len([ln for ln in err.splitlines() if ln.startswith("error: ")]) == 1, f"{what}: {err[-500:]}"
    return rc


# ------------------------------------------------------------------ dataset.json


@pytest.fixture(scope="module")
def small_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fuzz") / "set"
    assert main(["data", "synth", str(root), "--n", "4", "--size", "16"]) == 0
    return root


def test_fuzz_dataset_json(small_set: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ldiffusion.data.dataset import SegmentationDataset
    from ldiffusion.data.format import read_dataset_info

    base_text = (small_set / "dataset.json").read_text()
    base = json.loads(base_text)
    extra = ["synth_0000", "../../outside/victim", "/etc/passwd", "ghost"]
    parent = small_set.parent
    rng = random.Random(17 + SEED)
    counts = {"ok": 0, "error": 0}
    for case in range(N_DATASET_JSON):
        if case % 10 == 9:
            text: str | bytes = text_mutation(base_text, rng)
        else:
            text = json.dumps(mutate(base, rng, extra), ensure_ascii=rng.random() < 0.5)
        path = small_set / "dataset.json"
        path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
        before = tree(parent)
        what = f"dataset.json case {case}: {text[:200]!r}"
        res = outcome(lambda w=what: cli(["data", "check", small_set], capsys, w), what)
        counts[res] += 1
        if outcome(lambda: read_dataset_info(small_set), what) == "ok":
            for split in read_dataset_info(small_set).splits:
                outcome(lambda s=split: SegmentationDataset(small_set, s, cache=False)[0]
                        if len(SegmentationDataset(small_set, s)) else None, f"{what} split {split!r}")
        assert tree(parent) == before, what
    (small_set / "dataset.json").write_text(base_text)
    assert counts["ok"] >= 1 and counts["error"] > 100, counts


# ------------------------------------------------------------------ QuPath GeoJSON import


def _feature(geom: dict[str, Any], cls: str, otype: str = "annotation") -> dict[str, Any]:
    return {"type": "Feature", "id": f"id-{cls}", "geometry": geom,
            "properties": {"objectType": otype, "classification": {"name": cls, "color": [200, 0, 0]}}}


def _square(x: float, y: float, s: float) -> dict[str, Any]:
    return {"type": "Polygon", "coordinates": [[[x, y], [x + s, y], [x + s, y + s], [x, y + s], [x, y]]]}


BASE_GEOJSON = {
    "type": "FeatureCollection",
    "features": [
        _feature(_square(0, 0, 120), "Region*"),
        _feature(_square(10, 10, 40), "Tumor"),
        _feature({"type": "MultiPolygon", "coordinates": [_square(60, 60, 20)["coordinates"],
                                                          _square(90, 20, 15)["coordinates"]]}, "Stroma"),
        _feature(_square(30, 80, 10), "Ignore*"),
        _feature({"type": "Polygon", "coordinates": [[[5, 5], [50, 50], [50, 5], [5, 50], [5, 5]]]}, "Tumor",
                 "detection"),
    ],
}
GEO_EXTRA: list[Any] = [
    [float("nan"), 3.0], [1e300, 1e300], ["a", "b"], [1.0], [1.0, 2.0, 3.0], [[[1, 2], [3, 4]]],
    {"type": "Point", "coordinates": [1, 2]}, {"type": "LineString", "coordinates": [[0, 0], [5, 5]]},
    {"type": "Polygon", "coordinates": []}, {"type": "Polygon", "coordinates": [[[0, 0], [1, 1]]]},
    {"type": "GeometryCollection", "geometries": [_square(0, 0, 5)]}, {"type": "Nope"},
    {"name": "Tumor"}, {"names": ["A", "B"], "color": -16711936}, "tile", "cell",
    [[-1e9, -1e9], [1e9, -1e9], [1e9, 1e9], [-1e9, 1e9], [-1e9, -1e9]],
]


@pytest.fixture(scope="module")
def qupath_project(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tifffile = pytest.importorskip("tifffile")
    pytest.importorskip("tiffslide")
    pytest.importorskip("shapely")
    root = tmp_path_factory.mktemp("fuzzqp")
    (root / "slides").mkdir()
    y, x = np.mgrid[0:128, 0:128]
    img = np.stack([(x * 7) % 251, (y * 5) % 241, ((x + y) * 3) % 239], -1).astype(np.uint8)
    tifffile.imwrite(root / "slides" / "case1.tif", img, photometric="rgb", tile=(64, 64),
                     resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER", metadata=None)
    (root / "ann").mkdir()
    (root / "work").mkdir()
    return {"root": root, "slides": root / "slides", "ann": root / "ann", "work": root / "work"}


def test_fuzz_geojson(qupath_project: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    from ldiffusion.data.qupath import read_geojson

    root, ann, work = qupath_project["root"], qupath_project["ann"], qupath_project["work"]
    gj = ann / "case1.geojson"
    rng = random.Random(1717 + SEED)
    counts = {"ok": 0, "error": 0}
    for case in range(N_GEOJSON):
        doc = mutate(BASE_GEOJSON, rng, GEO_EXTRA)
        text = json.dumps(doc) if case % 20 != 19 else text_mutation(json.dumps(BASE_GEOJSON), rng)
        gj.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
        what = f"geojson case {case}: {text[:300]!r}"
        counts[outcome(lambda: read_geojson(gj), what)] += 1
        if case % (N_GEOJSON // N_GEOJSON_CLI) == 0:
            out = work / f"out{case}"
            before = tree(root)
            rc = outcome(lambda o=out, w=what: cli(
                ["data", "prepare", "qupath", o, "--annotations", ann, "--slides", qupath_project["slides"],
                 "--tile", "32", "--split-by", "tile", "--val-fraction", "0.2", "--test-fraction", "0.2",
                 "--no-progress"], capsys, w), what)
            after = tree(root)
            outside = {k: v for k, v in after.items() if not k.startswith(f"work/out{case}")}
            assert outside == before, f"{what}: files changed outside the output folder"
            if rc == "ok":
                assert (out / "manifest.json").is_file() and not list(out.glob(".ldiffusion-*")), what
            else:
                assert not out.exists(), f"{what}: a failed preparation left {out}"
            shutil.rmtree(out, ignore_errors=True)
    assert counts["ok"] > 10 and counts["error"] > 10, counts


# ------------------------------------------------------------------ --set overrides


OVERRIDE_VALUES = [
    "NaN", "Infinity", "-Infinity", "nan", "1e999", "-1", "0", "1", "0.5", "3", "1" * 400, "true", "null", "",
    "[]", "{}", "[1,2", "[1, 2, 3]", '{"a": 1}', "x", "é漢字", "../../etc", "x" * 2000, "-0.0", "1e-320",
    "[" * 3000 + "]" * 3000, '"quoted"', "[[64, 64]]", "adam", "tiny", "0x10", " 2 ",
]


def test_fuzz_config_overrides() -> None:
    from ldiffusion.methods import METHODS, resolve_config

    rng = random.Random(4242 + SEED)
    counts = {"ok": 0, "error": 0}
    keys: dict[str, list[str]] = {}
    for name in METHODS.names():
        flat = [".".join(str(k) for k in p) for p in paths_of(resolve_config(name, preset="tiny").to_dict())
                if all(isinstance(k, str) for k in p)]
        keys[name] = [*flat, "", ".", "a..b", "seed.x", "__class__", "nope", "é"]
    for case in range(N_OVERRIDES):
        name = rng.choice(sorted(keys))
        items = []
        for _ in range(rng.randint(1, 3)):
            k = rng.choice(keys[name])
            items.append(f"{k}={rng.choice(OVERRIDE_VALUES)}" if rng.random() < 0.95 else k)
        what = f"override case {case}: {name} {[i[:80] for i in items]}"
        res = outcome(lambda n=name, it=items: resolve_config(n, preset="tiny", overrides=it), what)
        counts[res] += 1
        if res == "ok":
            cfg = resolve_config(name, preset="tiny", overrides=items).to_dict()
            floats = [v for p in paths_of(cfg) if isinstance(v := _get(cfg, p), float)]
            assert all(math.isfinite(v) for v in floats), f"{what}: a non-finite number was accepted"
    assert counts["ok"] >= 1 and counts["error"] > 100, counts


def _get(doc: Any, path: tuple[Any, ...]) -> Any:
    for k in path:
        doc = doc[k]
    return doc
