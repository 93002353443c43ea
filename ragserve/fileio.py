"""Crash-safe file writes shared by the stores that must never leave a partial file."""
from __future__ import annotations

import os
import threading
from pathlib import Path


def atomic_write(path: Path, data: bytes) -> None:
    """tmp + fsync + os.replace: a crash never leaves a partial file under `path`. The tmp
    name is unique per process and thread, so concurrent writers never share one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
