"""The scaling harness: measure real runs, simulate 1 -> 1000 nodes, report (`hpcembed scaling --help`)."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import ConfigError


def read_json(path, what: str):
    """A study's or benchmark's JSON file, or a ConfigError that names it (never a traceback)."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{what} {path} cannot be read: {exc}") from None
