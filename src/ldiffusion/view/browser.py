"""Drive a headless Chromium over the DevTools pipe: load the viewer, wait for tiles, click, screenshot.

Used by the real-browser test and to take the documentation screenshot. Only the distribution's
`chromium` is used (nothing is downloaded); the DevTools protocol runs over `--remote-debugging-pipe`
(NUL-terminated JSON on file descriptors 3 and 4), so no websocket library is needed.

    python -m ldiffusion.view.browser SLIDE_OUT_DIR --png viewer.png --query "labels=1&opacity=0.6"

prints the time to the first tile and to a fully loaded view (real time, the server started in the
same process), and writes the screenshot.
"""

from __future__ import annotations

import argparse
import base64
import fcntl
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from ldiffusion.core.errors import LDiffusionError

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")

#: JavaScript returning the page's tile state (set by static/viewer.js)
STATE_JS = """(() => {
  const v = window.ldvViewer, b = document.body.dataset;
  let full = false, n = 0;
  if (v && v.world) {
    n = v.world.getItemCount();
    full = n > 0 && b.ready === '1';
    for (let i = 0; i < n; i++) {
      const it = v.world.getItemAt(i);
      if (it.getOpacity() > 0 && !it.getFullyLoaded()) full = false;
    }
  }
  return {items: n, ready: b.ready === '1', full: full, tiles: Number(b.tilesLoaded || 0),
          failed: Number(b.tilesFailed || 0),
          firstTileMs: b.firstTileMs === undefined ? null : Number(b.firstTileMs)};
})()"""


def find_chromium() -> str | None:
    """Path of a Chromium/Chrome executable on PATH, or None."""
    for name in CHROMIUM_NAMES:
        p = shutil.which(name)
        if p:
            return p
    return None


class Chromium:
    """A headless Chromium controlled through the DevTools protocol over a pipe.

    Args:
        width, height: viewport size in CSS pixels (device scale factor 1).
        executable: browser binary (default: `find_chromium()`).
    """

    def __init__(self, width: int = 1280, height: int = 800, executable: str | None = None) -> None:
        exe = executable or find_chromium()
        if exe is None:
            raise LDiffusionError("no chromium found on PATH (apt-get install chromium)")
        self._profile = tempfile.mkdtemp(prefix="ldv-chromium-")
        r_cmd, w_cmd = os.pipe()  # we write commands -> chromium reads fd 3
        r_out, w_out = os.pipe()  # chromium writes fd 4 -> we read
        args = [
            exe,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-dev-shm-usage",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            "--mute-audio",
            f"--user-data-dir={self._profile}",
            f"--window-size={width},{height}",
            "--remote-debugging-pipe",
            "about:blank",
        ]

        def child_fds() -> None:  # move the pipe ends to fds 3 and 4 (via high fds: they may be 3 or 4)
            a, b = fcntl.fcntl(r_cmd, fcntl.F_DUPFD, 10), fcntl.fcntl(w_out, fcntl.F_DUPFD, 10)
            os.dup2(a, 3)
            os.dup2(b, 4)

        env = {**os.environ, "DBUS_SESSION_BUS_ADDRESS": "disabled:"}
        self._log = open(Path(self._profile) / "stderr.log", "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._log,
            preexec_fn=child_fds,
            close_fds=False,
            env=env,
        )
        os.close(r_cmd)
        os.close(w_out)
        self._w = os.fdopen(w_cmd, "wb", buffering=0)
        self._r = os.fdopen(r_out, "rb", buffering=0)
        self._buf = b""
        self._id = 0
        self.session: str | None = None
        self.width, self.height = width, height

    # ------------------------------------------------------------------ protocol
    def _read_message(self) -> dict[str, Any]:
        while b"\0" not in self._buf:
            chunk = self._r.read(1 << 16)
            if not chunk:
                log = (Path(self._profile) / "stderr.log").read_text(errors="replace")[-2000:]
                raise LDiffusionError(f"chromium closed the DevTools pipe; its last output:\n{log}")
            self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def send(
        self, method: str, params: dict[str, Any] | None = None, *, session: bool = True
    ) -> dict[str, Any]:
        """Send one DevTools command and return its result (events received meanwhile are dropped)."""
        self._id += 1
        msg: dict[str, Any] = {"id": self._id, "method": method, "params": params or {}}
        if session and self.session:
            msg["sessionId"] = self.session
        self._w.write(json.dumps(msg).encode() + b"\0")
        while True:
            reply = self._read_message()
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise LDiffusionError(f"chromium: {method} failed: {reply['error']}")
                return reply.get("result", {})

    def open(self, url: str) -> None:
        """Open `url` in a new page of the configured size."""
        target = self.send("Target.createTarget", {"url": "about:blank"}, session=False)["targetId"]
        self.session = self.send(
            "Target.attachToTarget", {"targetId": target, "flatten": True}, session=False
        )["sessionId"]
        self.send("Page.enable")
        self.send("Runtime.enable")
        self.send("Page.bringToFront")
        self.send("Emulation.setFocusEmulationEnabled", {"enabled": True})
        self.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": self.width, "height": self.height, "deviceScaleFactor": 1, "mobile": False},
        )
        self.send("Page.navigate", {"url": url})

    def evaluate(self, expression: str) -> Any:
        """Evaluate a JavaScript expression in the page and return its (JSON) value."""
        res = self.send(
            "Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True}
        )
        if "exceptionDetails" in res:
            raise LDiffusionError(f"javascript error: {res['exceptionDetails'].get('text')}")
        return res.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout_s: float = 120.0, poll_s: float = 0.1) -> Any:
        """Poll `expression` until it is truthy; return its value (raise after `timeout_s`)."""
        t0 = time.monotonic()
        while True:
            try:
                value = self.evaluate(expression)
            except LDiffusionError:
                value = None
            if value:
                return value
            if time.monotonic() - t0 > timeout_s:
                raise LDiffusionError(f"timed out after {timeout_s:.0f} s waiting for: {expression[:80]}")
            time.sleep(poll_s)

    def wait_tiles(self, timeout_s: float = 120.0, settle_s: float = 1.0) -> dict[str, Any]:
        """Wait until all visible layers are loaded and no tile came for `settle_s`; return the state."""
        t0 = time.monotonic()
        last, since = -1, time.monotonic()
        while True:
            try:
                state = self.evaluate(STATE_JS) or {}
            except LDiffusionError:
                state = {}
            now = time.monotonic()
            if state.get("tiles") != last:
                last, since = state.get("tiles", -1), now
            if state.get("full") and now - since >= settle_s:
                return state
            if now - t0 > timeout_s:
                raise LDiffusionError(f"timed out after {timeout_s:.0f} s waiting for the tiles ({state})")
            time.sleep(0.1)

    def screenshot(self) -> bytes:
        """PNG bytes of the viewport."""
        return base64.b64decode(self.send("Page.captureScreenshot", {"format": "png"})["data"])

    def close(self) -> None:
        """Close the browser and remove its profile."""
        try:
            if self.proc.poll() is None:
                self.send("Browser.close", session=False)
        except (LDiffusionError, OSError, ValueError):
            pass
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(15)
        for f in (self._w, self._r, self._log):
            f.close()
        shutil.rmtree(self._profile, ignore_errors=True)

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def main() -> None:
    """Command line: serve an output folder, load it in headless Chromium, time the tiles, screenshot."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir", type=Path, help="slide predict output folder")
    ap.add_argument("--png", type=Path, required=True, help="screenshot to write")
    ap.add_argument("--query", default="", help="URL parameters of the page, e.g. labels=1&opacity=0.6")
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=800)
    ap.add_argument("--zoom", type=float, default=None, help="zoom in by this factor from the home view")
    ap.add_argument("--center", default="0.5,0.5", help="zoom centre as fractions of width,height")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the tiles")
    a = ap.parse_args()
    from ldiffusion.view.server import create_app, running
    from ldiffusion.view.sources import Catalog

    t0 = time.perf_counter()
    catalog = Catalog.discover(a.out_dir)
    sid = next(iter(catalog.slides))
    with running(create_app(catalog)) as url, Chromium(a.width, a.height) as browser:
        t_server = time.perf_counter() - t0
        t1 = time.perf_counter()
        browser.open(f"{url}/slide/{sid}?{a.query}")
        browser.wait_for(f"{STATE_JS}.tiles > 0", a.timeout)
        t_first = time.perf_counter() - t1
        state = browser.wait_tiles(a.timeout)
        t_full = time.perf_counter() - t1
        if a.zoom:
            cx, cy = (float(v) for v in a.center.split(","))
            browser.evaluate(
                "(() => { const v = window.ldvViewer, it = v.world.getItemAt(0), s = it.getContentSize();"
                f" const p = it.imageToViewportCoordinates({cx} * s.x, {cy} * s.y);"
                f" v.viewport.zoomTo(v.viewport.getHomeZoom() * {a.zoom}, p, true);"
                " v.viewport.panTo(p, true);"
                " return 1; })()"
            )
            time.sleep(1.0)  # let OpenSeadragon request the new level before asking whether it is loaded
            state = browser.wait_tiles(a.timeout, settle_s=2.0)
        a.png.write_bytes(browser.screenshot())
    catalog.close()
    print(  # noqa: T201
        f"server up {t_server:.2f} s; page open -> first tile {t_first:.2f} s, all visible tiles "
        f"{t_full:.2f} s ({state['tiles']} tiles; first tile in-page {state['firstTileMs']} ms); "
        f"wrote {a.png}"
    )


if __name__ == "__main__":
    main()
