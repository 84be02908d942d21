"""`ldiffusion view`: a local, offline browser viewer for prediction outputs.

- `sources`: what is shown (slide outputs of `slide predict`, image sets of `predict`), found on disk;
- `tiles`: deep-zoom tile geometry, rendering from pyramids, colour maps, LRU tile cache;
- `objects`: the GeoJSON objects (spatial index, outline tiles, object under a point);
- `server`: the Starlette app (extra `view`), host checks, request path guard.

The page uses OpenSeadragon 6.1.1, vendored under `static/openseadragon/` (BSD-3-Clause).
"""

from __future__ import annotations
