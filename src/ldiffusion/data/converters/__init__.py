"""Converters from public pathology data sets to the ldiffusion data set format.

`CONVERTERS` maps a format name to `convert(src, out, *, seed=0, progress=True, **options) -> DatasetInfo`:

| name | module | task | classes |
|---|---|---|---|
| `adp` | `adp.py` | semantic | ADP functional (6) or morphological (34) tissue types |
| `bcss` | `bcss.py` | semantic | BCSS codes (22) or 5 main classes + unused background |
| `consep-tiles` | `consep.py` | semantic | HoVer-Net 4 nucleus classes + background |
| `folder` | `folder.py` | semantic | user-given value or colour map |
| `glas` | `glas.py` | instance | gland |
| `monuseg` | `monuseg.py` | instance | nucleus |
| `pannuke` | `pannuke.py` | instance | 5 nucleus classes |
| `wsss4luad` | `wsss4luad.py` | semantic | tumour epithelium, stroma, normal |

Example:
    >>> from ldiffusion.data.converters import CONVERTERS
    >>> CONVERTERS.names()[:3]
    ['adp', 'bcss', 'consep-tiles']
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ldiffusion.data.converters import adp, bcss, consep, folder, glas, monuseg, pannuke, wsss4luad  # noqa: F401
from ldiffusion.data.converters._common import CONVERTERS, effective_options, option_names
from ldiffusion.data.format import DatasetInfo

__all__ = ["CONVERTERS", "convert", "effective_options", "option_names"]


def convert(name: str, src: str | Path, out: str | Path, *, seed: int = 0, progress: bool = True,
            force: bool = False, **options: Any) -> DatasetInfo:
    """Run converter `name`, checking option names first (unknown ones raise `ConfigError`).

    `out` changes only when the conversion succeeds; `force` allows replacing a data set written
    by another command (see `ldiffusion.data.staging`).
    """
    fn = CONVERTERS.get(name)
    effective_options(fn, seed, **options)
    return fn(Path(src), Path(out), seed=seed, progress=progress, force=force, **options)
