"""`ldiffusion view`: a local browser viewer for `slide predict` and `predict` outputs (extra `view`)."""

from __future__ import annotations

import threading
import webbrowser
from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    """Add the `view` command to `app`."""

    @app.command("view")
    def view(
        out_dir: Path = typer.Argument(
            ...,
            help="A `slide predict` output folder (done.json), a `predict` "
            "output folder, or a parent folder of several.",
        ),
        slide: Path = typer.Option(
            None, "--slide", help="Slide file (default: the one recorded in done.json)."
        ),
        images: Path = typer.Option(
            None, "--images", help="Input images of `predict` outputs: a folder, or a prepared data set."
        ),
        host: str = typer.Option(
            "127.0.0.1", "--host", help="Address to bind (loopback unless --allow-remote)."
        ),
        port: int = typer.Option(8765, "--port", help="Port to listen on."),
        allow_remote: bool = typer.Option(
            False,
            "--allow-remote",
            help="Allow a non-loopback --host (no authentication: anyone who "
            "can reach the port sees the slides).",
        ),
        open_browser: bool = typer.Option(False, "--open", help="Open the page in the default browser."),
        cache_mb: int = typer.Option(256, "--cache-mb", help="Tile cache size in MiB."),
    ) -> None:
        """Serve a page of slide predictions (class map, uncertainty, objects) or image predictions.

        Example: ldiffusion view slide_out/monuseg_test_slide (a `slide predict ... --out slide_out` folder)
        """
        from ldiffusion.core.errors import InputError
        from ldiffusion.view.server import check_host, create_app, require_server, serve
        from ldiffusion.view.sources import Catalog

        check_host(host, allow_remote)
        require_server()
        if not 0 < port < 65536:
            raise InputError(f"--port {port} is out of range; expected 1..65535")
        if cache_mb < 1:
            raise InputError(f"--cache-mb {cache_mb} should be >= 1")
        catalog = Catalog.discover(out_dir, slide=slide, images_dir=images)
        app = create_app(catalog, allow_remote=allow_remote, cache_mb=cache_mb)
        shown = f"[{host}]" if ":" in host else host
        url = f"http://{shown}:{port}/"
        print(
            f"ldiffusion view: {len(catalog.slides)} slide(s), {len(catalog.image_sets)} image set(s) "
            f"at {url} "
            "(Ctrl+C to stop)",
            flush=True,
        )
        if open_browser:
            threading.Timer(1.0, webbrowser.open, args=(url,)).start()
        try:
            serve(app, host, port, allow_remote=allow_remote)
        finally:
            catalog.close()
