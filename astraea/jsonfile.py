"""Versioned JSON files (schedules, cost tables): written atomically, read with clear errors."""

from __future__ import annotations

import json
import os
from typing import Any


def save_json(path: str | os.PathLike, data: Any) -> None:
    """Write through a temporary file, so a reader never sees half a file."""
    tmp = f"{os.fspath(path)}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def load_json(path: str | os.PathLike, what: str, error: type[Exception], hint: str = "") -> Any:
    """The parsed file; `error` naming `what` and the path when it is missing or corrupt."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise error(f"{what} {path!r} does not exist{hint}")
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{what} {path!r} is corrupt: {e}") from e
