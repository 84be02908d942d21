"""Atomic file writes and the run-folder checkpoint format (config.json + model.safetensors).

Every file is first written to a temporary name in the destination directory and then moved
into place with `os.replace`, so an interrupted write never leaves a half-written file and the
previous version stays intact. The file gets the permissions a plain `open()` would give it
(0o666 minus the process umask), not `mkstemp`'s private 0o600.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from ldiffusion.core.errors import CheckpointError

_UMASK_LOCK = threading.Lock()


def _umask() -> int:
    """Return the process umask (read from /proc where possible, else set and restore it)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[BinaryIO]:
    """Open a temporary file beside `path`; on success move it onto `path`, on error delete it.

    Args:
        path: destination file.
        mode: "wb" (default) or "w" for text.

    Yields:
        The open temporary file object.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            yield f  # type: ignore[misc]
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0o600; honour the umask like open()
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write `data` to `path` atomically."""
    with atomic_write(path, "wb") as f:
        f.write(data)


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write `obj` as indented JSON to `path` atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def read_json(path: str | os.PathLike[str]) -> Any:
    """Read a JSON file, raising `CheckpointError`-free plain errors with the path in the message."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


def save_weights(path: str | os.PathLike[str], state_dict: dict[str, Any]) -> None:
    """Save a tensor state dict as safetensors, atomically (tensors made contiguous, CPU)."""
    from safetensors.torch import save

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    atomic_write_bytes(path, save(tensors))


def load_weights(path: str | os.PathLike[str], device: str = "cpu") -> dict[str, Any]:
    """Load a safetensors file into a dict of tensors on `device`.

    Every model file of the package (`model.safetensors`, pretrained U-Nets, autoencoders) is read
    here, so a missing, empty, truncated or garbage file is one `CheckpointError` naming it.

    Raises:
        CheckpointError: the file is missing or not a readable safetensors file.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file not found")
    try:
        return load_file(str(path), device=device)
    except (SafetensorError, OSError, ValueError) as e:
        size = path.stat().st_size
        why = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: not a readable safetensors weights file ({size} bytes: {why}); "
                              "it may be truncated or corrupt: train again or restore it") from e


def save_torch(path: str | os.PathLike[str], obj: Any) -> None:
    """`torch.save` to `path` atomically (used for `train_state.pt`)."""
    import io

    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())
