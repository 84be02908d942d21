"""Real-browser test: headless Chromium (the distribution's package) loads the viewer for the demo slide.

The page is driven over the DevTools pipe (`ldiffusion.view.browser.Chromium`): it waits until every
visible layer is fully loaded, screenshots the slide alone, clicks the "Class map" checkbox, sets its
opacity to 1 with the slider, waits again and screenshots. Pixel checks: the image lies where
OpenSeadragon fits it, and each screenshot pixel shows the colour the class map (labels.ome.tif)
says it should: the slide's own colours before the click, the class colours after it.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
tifffile = pytest.importorskip("tifffile")

from ldiffusion.view.browser import Chromium, find_chromium  # noqa: E402
from ldiffusion.view.demo import GLASS, NUCLEUS, PALETTE, TISSUE  # noqa: E402

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        find_chromium() is None, reason="chromium is not installed (apt-get install chromium)"
    ),
]

WIDTH, HEIGHT, SIDEBAR = 1000, 600, 300
REFS = {
    "tissue": TISSUE,
    "nucleus": NUCLEUS,
    "glass": GLASS,
    "green": tuple(PALETTE[1]),
    "yellow": tuple(PALETTE[2]),
    "page": (255, 255, 255),
}


def classify(img: np.ndarray) -> np.ndarray:
    """Name index (into REFS) of the nearest reference colour of each pixel; -1 when none is within 40."""
    refs = np.array(list(REFS.values()), np.float32)
    d = np.linalg.norm(img[..., None, :3].astype(np.float32) - refs, axis=-1)
    out = d.argmin(-1)
    out[d.min(-1) > 40] = -1
    return out


def image_rect(kind: np.ndarray) -> tuple[int, int, int, int]:
    """Bounding box (x0, y0, x1, y1) of the rows and columns mostly showing the slide or a class colour.

    (Counting whole rows and columns ignores stray pixels such as the scale bar's anti-aliased text.)
    """
    names = list(REFS)
    shown = np.isin(kind, [names.index(n) for n in ("tissue", "nucleus", "glass", "green", "yellow")])
    rows = np.nonzero(shown.sum(1) > shown.shape[1] // 3)[0]
    cols = np.nonzero(shown.sum(0) > shown.shape[0] // 3)[0]
    return int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1


def expected(labels: np.ndarray, rect: tuple[int, int, int, int], overlay: bool) -> np.ndarray:
    """Expected REFS index of each screenshot pixel inside `rect` (nearest label pixel)."""
    x0, y0, x1, y1 = rect
    h, w = labels.shape
    rows = np.minimum(((np.arange(y0, y1) - y0 + 0.5) * h / (y1 - y0)).astype(int), h - 1)
    cols = np.minimum(((np.arange(x0, x1) - x0 + 0.5) * w / (x1 - x0)).astype(int), w - 1)
    lab = labels[rows[:, None], cols[None, :]]
    names = list(REFS)
    table = [names.index("glass")] + (
        [names.index("green"), names.index("yellow")]
        if overlay
        else [names.index("tissue"), names.index("nucleus")]
    )
    return np.asarray(table)[lab]


def test_viewer_in_headless_chromium(server_url, demo_out):
    with tifffile.TiffFile(demo_out / "labels.ome.tif") as tif:
        labels = tif.series[0].levels[0].asarray()
    names = list(REFS)
    with Chromium(WIDTH, HEIGHT) as browser:
        browser.open(f"{server_url}/slide/slide?labels=0&objects=0&navigator=0")
        state = browser.wait_tiles(timeout_s=400)
        assert state["items"] == 4 and state["tiles"] > 0 and state["firstTileMs"] is not None
        before = np.asarray(Image.open(io.BytesIO(browser.screenshot())).convert("RGB"))
        browser.evaluate("document.getElementById('chk-labels').click(); 1")
        browser.evaluate(
            "const s = document.getElementById('op-labels'); s.value = 1; "
            "s.dispatchEvent(new Event('input')); 1"
        )
        assert browser.evaluate("document.body.dataset.labels") == "on"
        browser.wait_tiles(timeout_s=400)
        after = np.asarray(Image.open(io.BytesIO(browser.screenshot())).convert("RGB"))
    assert before.shape == after.shape == (HEIGHT, WIDTH, 3)
    kind_before = classify(before[:, : WIDTH - SIDEBAR])
    kind_after = classify(after[:, : WIDTH - SIDEBAR])
    # OpenSeadragon fits the 1600 x 1000 slide into the 700 x 600 view: 700 x 437.5, centred vertically
    for kind in (kind_before, kind_after):
        x0, y0, x1, y1 = image_rect(kind)
        assert abs((x1 - x0) - 700) <= 3 and abs((y1 - y0) - 437.5) <= 3 and abs((y0 + y1) / 2 - 300) <= 3
    # before the click: no class colour anywhere, the slide's colours where the class map puts them
    assert not np.isin(kind_before, [names.index("green"), names.index("yellow")]).any()
    rect = image_rect(kind_before)
    want = expected(labels, rect, overlay=False)
    got = kind_before[rect[1] : rect[3], rect[0] : rect[2]]
    assert (got == want).mean() > 0.95
    # after: class colours exactly where labels.ome.tif has classes (stroma green, nuclei yellow)
    rect = image_rect(kind_after)
    want = expected(labels, rect, overlay=True)
    got = kind_after[rect[1] : rect[3], rect[0] : rect[2]]
    assert (got == want).mean() > 0.95
    yellow = want == names.index("yellow")
    assert yellow.sum() > 500 and (got[yellow] == names.index("yellow")).mean() > 0.8  # the nuclei themselves
