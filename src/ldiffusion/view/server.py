"""The viewer's HTTP server: a Starlette app over a `Catalog`, run by uvicorn (extra `view`).

Routes (every id is looked up in the catalog; no request path is joined to a file path):

- `/` — the list of slides and image sets (redirects to the only one when there is one);
- `/slide/{sid}` — the deep-zoom page; `/api/slide/{sid}` — its JSON description;
- `/tiles/{sid}/{layer}/{level}/{col}_{row}.png` — one tile of layer slide | labels | uncertainty | objects;
- `/api/slide/{sid}/at?x=&y=` — class, uncertainty and object under a level-0 point;
- `/files/{sid}/{name}` — a file of that output folder (names listed at start-up only);
- `/images/{set}` — image + class map + uncertainty side by side; `/api/images/{set}`,
  `/picture/{set}/{id}/{kind}.png` (kind: image | labels | uncertainty | overlay);
- `/static/{name}` — the page's own files (a fixed list: viewer page, OpenSeadragon).

Safety: a request whose path has a `..` segment, a backslash, a NUL, an empty segment (`//`) or
an encoded slash is answered 400 before routing; unknown ids and file names are 404. By default the
server binds 127.0.0.1 only (`check_host` refuses other addresses without `allow_remote`) and
answers only requests whose Host header is a loopback name (no DNS rebinding).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import numpy as np

from ldiffusion.core.errors import InputError, LDiffusionError
from ldiffusion.view.sources import SLIDE_LAYERS, Catalog
from ldiffusion.view.tiles import TileCache, encode_png

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1", "[::1]")
MEDIA = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".png": "image/png",
    ".txt": "text/plain; charset=utf-8",
    ".md": "text/plain; charset=utf-8",
    ".json": "application/json",
    ".geojson": "application/geo+json",
    ".tif": "image/tiff",
}


def require_server() -> tuple[Any, Any]:
    """Import starlette and uvicorn or raise an error naming the `view` extra."""
    try:
        import starlette
        import uvicorn
    except ImportError as e:
        raise InputError(
            f"ldiffusion view needs the 'view' extra ({e.name} is missing): pip install \"ldiffusion[view]\""
        ) from e
    return starlette, uvicorn


def is_loopback(host: str) -> bool:
    """True for `localhost` and loopback IP addresses (127.0.0.0/8, ::1)."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_host(host: str, allow_remote: bool) -> None:
    """Refuse to bind a non-loopback address unless `allow_remote`.

    Raises:
        InputError: `host` is not loopback and `allow_remote` is False.
    """
    if not is_loopback(host) and not allow_remote:
        raise InputError(
            f"--host {host} is not a loopback address and the viewer has no authentication; pass "
            "--allow-remote to serve the slides to the network anyway (or keep 127.0.0.1 and use an "
            "SSH tunnel: ssh -L 8765:127.0.0.1:8765 HOST)"
        )


def static_files() -> dict[str, Path]:
    """The fixed map of `/static/` names to files (built from the package folder, no symlinks)."""
    out: dict[str, Path] = {}
    root = STATIC_DIR.resolve()
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink() and p.suffix in MEDIA:
            out[p.relative_to(root).as_posix()] = p
    return out


def unsafe_path(raw_path: str) -> bool:
    """True when a request path could address something outside what is meant to be served."""
    lowered = raw_path.lower()
    if any(t in lowered for t in ("%2f", "%5c", "%00", "\\", "\x00")):
        return True
    path = unquote(raw_path)
    segments = path.split("/")[1:]
    return any(s in ("..", ".") for s in segments) or "//" in path or not path.startswith("/")


def create_app(catalog: Catalog, *, allow_remote: bool = False, cache_mb: int = 256) -> Any:
    """Build the Starlette application serving `catalog`.

    Args:
        catalog: slide outputs and image sets to serve.
        allow_remote: accept any Host header (needed when serving a non-loopback address).
        cache_mb: size of the tile cache in MiB.
    """
    require_server()
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.middleware.trustedhost import TrustedHostMiddleware
    from starlette.requests import Request
    from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
    from starlette.routing import Route

    statics = static_files()
    cache = TileCache(cache_mb * 2**20)
    first_tile: dict[str, float] = {}
    started = time.perf_counter()

    def not_found(what: str) -> Response:
        return PlainTextResponse(f"not found: {what}", status_code=404)

    def png(arr: np.ndarray) -> Response:
        return Response(encode_png(arr), media_type="image/png", headers={"Cache-Control": "max-age=300"})

    def static_response(name: str) -> Response:
        p = statics.get(name)
        if p is None:
            return not_found(name)
        return FileResponse(p, media_type=MEDIA[p.suffix], headers={"Cache-Control": "no-cache"})

    async def index(request: Request) -> Response:
        items = [*(f"/slide/{s}" for s in catalog.slides), *(f"/images/{s}" for s in catalog.image_sets)]
        if len(items) == 1:
            return RedirectResponse(items[0], status_code=307)
        return static_response("index.html")

    async def api_index(request: Request) -> Response:
        return JSONResponse(
            {
                "slides": [{"id": s, "slide": o.slide_path.name} for s, o in catalog.slides.items()],
                "image_sets": [{"id": s, "n": len(o.ids)} for s, o in catalog.image_sets.items()],
            }
        )

    async def slide_page(request: Request) -> Response:
        if request.path_params["sid"] not in catalog.slides:
            return not_found("slide")
        return static_response("viewer.html")

    def slide_info(request: Request) -> Response:
        s = catalog.slides.get(request.path_params["sid"])
        if s is None:
            return not_found("slide")
        return JSONResponse(s.info())

    def tile(request: Request) -> Response:
        p = request.path_params
        s = catalog.slides.get(p["sid"])
        if s is None or p["layer"] not in SLIDE_LAYERS:
            return not_found("tile")
        key = (p["sid"], p["layer"], p["level"], p["col"], p["row"])
        try:
            data = cache.get(key, lambda: encode_png(s.tile(p["layer"], p["level"], p["col"], p["row"])))
        except InputError as e:
            return PlainTextResponse(str(e), status_code=404)
        if p["sid"] not in first_tile:
            first_tile[p["sid"]] = time.perf_counter() - started
            logger.info("%s: first tile served %.3f s after start", p["sid"], first_tile[p["sid"]])
        return Response(data, media_type="image/png", headers={"Cache-Control": "max-age=300"})

    def point(request: Request) -> Response:
        s = catalog.slides.get(request.path_params["sid"])
        if s is None:
            return not_found("slide")
        try:
            x, y = float(request.query_params["x"]), float(request.query_params["y"])
        except (KeyError, ValueError):
            return PlainTextResponse("expected query parameters x and y (level-0 pixels)", status_code=400)
        if not (np.isfinite(x) and np.isfinite(y)):
            return PlainTextResponse("x and y must be finite", status_code=400)
        return JSONResponse(s.object_at(x, y))

    def files(request: Request) -> Response:
        s = catalog.slides.get(request.path_params["sid"])
        name = request.path_params["name"]
        p = s.files.get(name) if s is not None else None
        if s is None or p is None:
            return not_found("file")
        resolved = p.resolve()
        if resolved.parent != s.folder or not resolved.is_file():  # stays inside the output folder
            return not_found("file")
        return FileResponse(resolved, media_type=MEDIA.get(resolved.suffix, "application/octet-stream"))

    async def images_page(request: Request) -> Response:
        if request.path_params["sid"] not in catalog.image_sets:
            return not_found("image set")
        return static_response("images.html")

    def images_info(request: Request) -> Response:
        s = catalog.image_sets.get(request.path_params["sid"])
        if s is None:
            return not_found("image set")
        info = s.info()
        case = request.query_params.get("id")
        if case is not None:
            if case not in s.ids:
                return not_found("image id")
            info["shares"] = s.class_shares(case)
        return JSONResponse(info)

    def picture(request: Request) -> Response:
        p = request.path_params
        s = catalog.image_sets.get(p["sid"])
        if s is None or p["case"] not in s.ids:
            return not_found("image")
        try:
            return png(s.render(p["case"], p["kind"]))
        except InputError as e:
            return PlainTextResponse(str(e), status_code=404)

    async def static(request: Request) -> Response:
        return static_response(request.path_params["name"])

    async def health(request: Request) -> Response:
        return JSONResponse({"ok": True, "first_tile_s": first_tile, "cache_tiles": len(cache)})

    routes = [
        Route("/", index),
        Route("/api/index", api_index),
        Route("/api/health", health),
        Route("/slide/{sid}", slide_page),
        Route("/api/slide/{sid}", slide_info),
        Route("/api/slide/{sid}/at", point),
        Route("/tiles/{sid}/{layer}/{level:int}/{col:int}_{row:int}.png", tile),
        Route("/files/{sid}/{name}", files),
        Route("/images/{sid}", images_page),
        Route("/api/images/{sid}", images_info),
        Route("/picture/{sid}/{case}/{kind}.png", picture),
        Route("/static/{name:path}", static),
    ]

    class PathGuard:
        """Answer 400 to request paths with `..`, `.`, `//`, backslashes, NULs or encoded slashes."""

        def __init__(self, app: Any) -> None:
            self.app = app

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] == "http":
                raw = scope.get("raw_path") or scope.get("path", "").encode()
                raw_text = raw.decode("latin-1").split("?", 1)[0]
                if unsafe_path(raw_text) or unsafe_path(scope.get("path", "")):
                    await PlainTextResponse("bad request path", status_code=400)(scope, receive, send)
                    return
            await self.app(scope, receive, send)

    middleware = [Middleware(PathGuard)]
    if not allow_remote:
        middleware.insert(0, Middleware(TrustedHostMiddleware, allowed_hosts=list(LOOPBACK_NAMES)))
    def build_indexes() -> None:  # the GeoJSON index in the background, before the first outline tile
        for s in catalog.slides.values():
            try:
                if s.objects is not None:
                    s.objects.get()
            except LDiffusionError as e:
                logger.warning("%s: objects not shown: %s", s.sid, e)

    threading.Thread(target=build_indexes, name="ldiffusion-view-objects", daemon=True).start()
    app = Starlette(routes=routes, middleware=middleware)
    app.state.catalog = catalog
    app.state.cache = cache
    app.state.first_tile = first_tile
    return app


def free_port(host: str = "127.0.0.1") -> int:
    """A port that is free on `host` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def serve(app: Any, host: str = "127.0.0.1", port: int = 8765, *, allow_remote: bool = False) -> None:
    """Run `app` with uvicorn until interrupted (refusing a non-loopback host without `allow_remote`)."""
    check_host(host, allow_remote)
    _, uvicorn = require_server()
    uvicorn.run(app, host=host, port=port, log_level="warning")


@contextlib.contextmanager
def running(
    app: Any, host: str = "127.0.0.1", port: int | None = None, timeout_s: float = 20.0
) -> Iterator[str]:
    """Run `app` in a background thread; yield its base URL (`http://host:port`); stop it on exit."""
    _, uvicorn = require_server()
    check_host(host, allow_remote=False)
    port = port or free_port(host)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="ldiffusion-view", daemon=True)
    thread.start()
    t0 = time.monotonic()
    while not server.started:
        if not thread.is_alive() or time.monotonic() - t0 > timeout_s:
            raise LDiffusionError(f"the viewer did not start on {host}:{port}")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout_s)


__all__ = [
    "check_host",
    "create_app",
    "free_port",
    "is_loopback",
    "require_server",
    "running",
    "serve",
    "static_files",
    "unsafe_path",
]
