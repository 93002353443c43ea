"""Resumable evaluations: each finished system's rows are saved under `<out>/systems/`.

A CPU evaluation runs for hours, one system after another over the same workload. Rerun the
same command after an interruption and the systems already finished are read back instead of
run again; the interrupted one restarts from its first query (a system's latencies depend on
the load its own queries create, so a half-run is never stitched to a new one).

A saved run is reused only when its key matches: the dataset, model, engine, sample (query ids
and arrival offsets), corpus subset, filters, rate and the system's name. With `--rate auto`
the calibrated rate is saved too (`calibration.json`) so a resumed run replays the same
arrivals. `--no-resume` ignores what is saved (and overwrites it).
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Any

from ragserve.fileio import atomic_write

logger = logging.getLogger(__name__)

DIR = "systems"
CALIBRATION = "calibration.json"


def workload_key(parts: dict[str, Any]) -> str:
    """A stable digest of everything that makes two runs comparable (JSON-serializable `parts`)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _path(out: Path, name: str) -> Path:
    return out / DIR / (re.sub(r"[^A-Za-z0-9_.+-]", "_", name) + ".json")


def _read(path: Path, key: str) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        payload = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        logger.warning("ignoring unreadable checkpoint %s (%s); the system runs again", path, exc)
        return None
    if payload.get("key") != key:
        logger.info("checkpoint %s is from another workload or settings; the system runs again", path)
        return None
    return payload


def save_system(out: Path, key: str, name: str, rows: list[dict[str, Any]], wall_s: float,
                extra: dict[str, Any]) -> None:
    payload = {"key": key, "system": name, "wall_s": wall_s, "extra": extra, "rows": rows}
    atomic_write(_path(out, name), json.dumps(payload).encode())


def load_system(out: Path, key: str, name: str) -> dict[str, Any] | None:
    """The saved run of system `name` under `key`: {rows, wall_s, extra}, or None."""
    return _read(_path(out, name), key)


def save_calibration(out: Path, key: str, info: dict[str, Any]) -> None:
    atomic_write(out / DIR / CALIBRATION, json.dumps({"key": key, **info}).encode())


def load_calibration(out: Path, key: str) -> dict[str, Any] | None:
    payload = _read(out / DIR / CALIBRATION, key)
    return None if payload is None else {k: v for k, v in payload.items() if k != "key"}
