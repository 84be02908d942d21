"""HTTP-level tests against a real server on 127.0.0.1 serving the demo slide's `slide predict` output.

Tiles are compared with the files themselves, read independently with tifffile: the slide's own
pyramid levels and `labels.ome.tif` / `uncertainty.ome.tif`.
"""

from __future__ import annotations

import http.client
import io
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
tifffile = pytest.importorskip("tifffile")

from ldiffusion.cli import main  # noqa: E402
from ldiffusion.view.demo import PALETTE  # noqa: E402
from ldiffusion.view.tiles import UNCERTAINTY_LUT, TileGrid  # noqa: E402

GRID = TileGrid(1600, 1000, 256)
TOP = GRID.max_level  # downsample 1


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def raw_get(base: str, path: str, host: str | None = None) -> int:
    """Send `path` byte for byte (no client-side normalisation) and return the status."""
    hostport = base.split("//", 1)[1]
    conn = http.client.HTTPConnection(hostport, timeout=60)
    conn.putrequest("GET", path, skip_host=True)
    conn.putheader("Host", host or hostport)
    conn.endheaders()
    status = conn.getresponse().status
    conn.close()
    return status


def png(url: str) -> np.ndarray:
    status, data = get(url)
    assert status == 200, data[:200]
    return np.asarray(Image.open(io.BytesIO(data)))


def levels(path: Path) -> list[np.ndarray]:
    with tifffile.TiffFile(path) as tif:
        return [lv.asarray() for lv in tif.series[0].levels]


def test_slide_tile_equals_slide_pixels(server_url, demo_out):
    slide = levels(demo_out.parent.parent / "slide.tif")  # level 0 and the 4x level
    # full resolution, an inner tile and a cropped edge tile
    for col, row in ((1, 2), (6, 3)):
        x0, y0, w, h, _ = GRID.tile_region(TOP, col, row)
        tile = png(f"{server_url}/tiles/slide/slide/{TOP}/{col}_{row}.png")
        assert tile.shape == (h, w, 3)
        assert np.array_equal(tile, slide[0][y0 : y0 + h, x0 : x0 + w])
    # downsample 4: served from the slide's own 4x level, pixel for pixel
    x0, y0, w, h, ds = GRID.tile_region(TOP - 2, 1, 0)
    assert ds == 4
    tile = png(f"{server_url}/tiles/slide/slide/{TOP - 2}/1_0.png")
    assert np.array_equal(tile, slide[1][y0 // 4 : y0 // 4 + h, x0 // 4 : x0 // 4 + w])


def test_class_map_tile_equals_labels_ome_tif(server_url, demo_out):
    lab = levels(demo_out / "labels.ome.tif")
    assert len(lab) == 2  # the label pyramid mirrors the slide's levels (1, 4)
    seen = set()
    for level, col, row, k in ((TOP, 3, 1, 0), (TOP, 6, 3, 0), (TOP - 2, 0, 0, 1)):
        x0, y0, w, h, ds = GRID.tile_region(level, col, row)
        tile = png(f"{server_url}/tiles/slide/labels/{level}/{col}_{row}.png")
        truth = lab[k][y0 // ds : y0 // ds + h, x0 // ds : x0 // ds + w]
        assert tile.shape == (h, w, 4)
        assert np.array_equal(tile[..., 3] > 0, truth > 0)  # background transparent
        fg = truth > 0
        assert np.array_equal(tile[..., :3][fg], PALETTE[truth[fg]])
        seen |= set(np.unique(truth).tolist())
    assert seen == {0, 1, 2}  # the tiles hold background, stroma and nuclei


def test_uncertainty_tile_equals_uncertainty_ome_tif(server_url, demo_out):
    unc = levels(demo_out / "uncertainty.ome.tif")[0]
    x0, y0, w, h, _ = GRID.tile_region(TOP, 3, 1)
    tile = png(f"{server_url}/tiles/slide/uncertainty/{TOP}/3_1.png")
    truth = unc[y0 : y0 + h, x0 : x0 + w]
    assert truth.max() > 200 and truth.min() == 0
    assert np.array_equal(tile[..., :3], UNCERTAINTY_LUT[truth])
    assert np.array_equal(tile[..., 3], np.minimum(truth.astype(int) * 3, 255))


def test_info_point_and_objects(server_url, demo_out):
    status, data = get(f"{server_url}/api/slide/slide")
    info = json.loads(data)
    assert status == 200 and (info["width"], info["height"], info["mpp"]) == (1600, 1000, 0.5)
    assert [c["name"] for c in info["classes"]] == ["background", "stroma", "nucleus"]
    assert [c["color"] for c in info["classes"]] == PALETTE.tolist()
    stats = json.loads((demo_out / "stats.json").read_text())
    assert info["classes"][2]["area_mm2"] == pytest.approx(stats["classes"][2]["area_mm2"])
    assert set(info["layers"]) == {"slide", "labels", "uncertainty", "objects"}
    # the point query at the centre of a nucleus of the class map
    lab = levels(demo_out / "labels.ome.tif")[0]
    from scipy import ndimage

    comp, n = ndimage.label(lab == 2)
    sizes = ndimage.sum_labels(np.ones_like(comp), comp, index=range(1, n + 1))
    big = int(np.argmax(sizes)) + 1
    ys, xs = np.nonzero(comp == big)
    cy, cx = int(np.median(ys)), int(np.median(xs))
    assert lab[cy, cx] == 2
    status, data = get(f"{server_url}/api/slide/slide/at?x={cx + 0.5}&y={cy + 0.5}")
    d = json.loads(data)
    assert status == 200 and d["class"] == "nucleus" and d["object"]["class"] == "nucleus"
    assert d["object"]["area_px"] == pytest.approx(sizes[big - 1], abs=0.5)
    assert d["object"]["area_um2"] == pytest.approx(sizes[big - 1] * 0.25, abs=0.2)
    assert 0 < d["object"]["mean_uncertainty"] < 1
    # outline tile: drawn in the class colours near the nucleus, transparent far from every object
    tile = png(f"{server_url}/tiles/slide/objects/{TOP}/{cx // 256}_{cy // 256}.png")
    assert (tile[..., 3] > 0).any()
    assert np.all(tile[..., :3][tile[..., 3] > 0] == PALETTE[2], axis=-1).any()
    assert get(f"{server_url}/api/slide/slide/at?x=abc&y=1")[0] == 400


def test_unknown_ids_layers_and_addresses_are_404(server_url):
    for path in (
        "/tiles/nope/slide/11/0_0.png",
        "/tiles/slide/secret/11/0_0.png",
        f"/tiles/slide/slide/{TOP}/7_0.png",
        f"/tiles/slide/slide/{TOP + 1}/0_0.png",
        "/files/slide/nope.json",
        "/files/slide/.work",
        "/static/nope.js",
        "/slide/nope",
    ):
        assert get(server_url + path)[0] == 404, path
    assert get(server_url + "/files/slide/stats.json")[0] == 200


@pytest.mark.parametrize(
    "path",
    [
        "/files/slide/../../slide.tif",
        "/static/../sources.py",
        "/static/openseadragon/../../server.py",
        "/files/slide/..%2F..%2Fslide.tif",
        "/static/%2e%2e/%2e%2e/%2e%2e/README.md",
        "/files/slide//etc/passwd",
        "//etc/passwd",
        "/static//etc/passwd",
        "/files/slide/%2Fetc%2Fpasswd",
        "/tiles/slide/..%5c..%5cslide/11/0_0.png",
    ],
)
def test_traversal_and_absolute_paths_are_refused(server_url, path):
    assert raw_get(server_url, path) in (400, 404)


def test_traversal_answer_is_400_before_routing(server_url):
    assert raw_get(server_url, "/files/slide/../done.json") == 400
    assert raw_get(server_url, "/files/slide/done.json") == 200


def test_foreign_host_header_is_refused(server_url):
    assert raw_get(server_url, "/api/slide/slide", host="attacker.example:8765") == 400


def test_cli_refuses_non_loopback_without_flag(demo_out, capsys):
    rc = main(["view", str(demo_out), "--host", "0.0.0.0", "--port", "1"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "--allow-remote" in err and "0.0.0.0" in err and len(err.strip().splitlines()) == 1


def test_cli_names_the_extra_when_missing(demo_out, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "starlette", None)
    assert main(["view", str(demo_out)]) == 2
    assert "ldiffusion[view]" in capsys.readouterr().err


def test_cli_bad_folder(tmp_path, capsys):
    assert main(["view", str(tmp_path)]) == 2
    assert "no `slide predict` output" in capsys.readouterr().err


def test_cli_serves_until_stopped(demo_out):
    from ldiffusion.view.server import free_port

    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from ldiffusion.cli import entry; entry()",
            "view",
            str(demo_out),
            "--port",
            str(port),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        t0 = time.monotonic()
        while True:
            try:
                status, data = get(f"http://127.0.0.1:{port}/api/health")
                break
            except urllib.error.URLError:
                assert proc.poll() is None, proc.stdout.read()
                assert time.monotonic() - t0 < 300
                time.sleep(0.2)
        assert status == 200 and json.loads(data)["ok"]
        assert png(f"http://127.0.0.1:{port}/tiles/slide/slide/{TOP}/0_0.png").shape == (256, 256, 3)
    finally:
        proc.terminate()
        proc.wait(30)


def test_image_set_pictures(tmp_path):
    """`predict` outputs of an image folder: image, class map and uncertainty side by side."""
    from ldiffusion.data.format import encode_png
    from ldiffusion.infer.writers import default_palette
    from ldiffusion.view.server import create_app, running
    from ldiffusion.view.sources import Catalog

    rng = np.random.default_rng(0)
    imgs, pred = tmp_path / "imgs", tmp_path / "pred"
    imgs.mkdir()
    pred.mkdir()
    truth = {}
    for case in ("a", "b"):
        img = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
        lab = rng.integers(0, 3, (40, 60)).astype(np.uint8)
        (imgs / f"{case}.png").write_bytes(encode_png(img))
        (pred / f"{case}.png").write_bytes(encode_png(lab))
        (pred / f"{case}_overlay.png").write_bytes(encode_png(img))
        truth[case] = (img, lab)
    (pred / "a_unc.png").write_bytes(encode_png(np.full((40, 60), 128, np.uint8)))
    catalog = Catalog.discover(pred, images_dir=imgs)
    assert list(catalog.image_sets) == ["pred"] and not catalog.slides
    with running(create_app(catalog)) as url:
        assert get(url + "/")[0] == 200  # redirected to the only image set's page
        info = json.loads(get(url + "/api/images/pred?id=a")[1])
        assert info["ids"] == ["a", "b"] and info["with_uncertainty"] == ["a"]
        img, lab = truth["a"]
        assert info["shares"][1] == pytest.approx((lab == 1).mean())
        assert np.array_equal(png(url + "/picture/pred/a/image.png"), img)
        assert np.array_equal(png(url + "/picture/pred/a/labels.png"), default_palette(3)[lab])
        assert png(url + "/picture/pred/a/uncertainty.png")[0, 0].tolist() == UNCERTAINTY_LUT[128].tolist()
        assert get(url + "/picture/pred/b/uncertainty.png")[0] == 404
        assert get(url + "/picture/pred/c/image.png")[0] == 404
        assert raw_get(url, "/picture/pred/../a/image.png") == 400
