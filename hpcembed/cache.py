"""The directory where what start-up computes is kept between runs, so that a warm start-up skips it: compiled
kernels, digests of large files (io/digest.py) and the budtiktok probe (tokenize/budtiktok_backend.py).

Triton caches its kernels, and torch.compile's Inductor its compiled graphs, under directories named by
TRITON_CACHE_DIR and TORCHINDUCTOR_CACHE_DIR. hpcembed points both into one directory of its own: --cache-dir,
else HPCEMBED_CACHE_DIR, else $XDG_CACHE_HOME/hpcembed (~/.cache/hpcembed). Variables the user set themselves win.
Both libraries write an entry to a temporary file and rename it into place, and key entries by the torch,
Triton and CUDA versions and the GPU, so ranks and jobs on shared storage may use one directory at once, and a
cache from another machine or version is never taken for this one. CUDA graphs live in GPU memory and cannot be
kept across processes; each run captures them again (engine/varlen.py keeps that short).
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

from .errors import ConfigError

log = logging.getLogger("hpcembed")

ENV = "HPCEMBED_CACHE_DIR"


def cache_dir(option: str = "") -> Path:
    """--cache-dir, else HPCEMBED_CACHE_DIR, else $XDG_CACHE_HOME/hpcembed (~/.cache/hpcembed)."""
    if option:
        return Path(option)
    if os.environ.get(ENV):
        return Path(os.environ[ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "hpcembed"


def use_cache_dir(option: str = "") -> Path:
    """Point the compilers' caches at the cache directory (creating it) and return it. A directory named by
    --cache-dir or HPCEMBED_CACHE_DIR that cannot be written is the user's mistake; an unwritable default
    (a read-only home on compute nodes) falls back to a fresh temporary directory, so nothing is kept."""
    named = bool(option or os.environ.get(ENV))
    path = cache_dir(option)
    try:
        path.mkdir(parents=True, exist_ok=True)
        if not os.access(path, os.W_OK | os.X_OK):
            raise PermissionError(f"{path} is not writable")
    except OSError as exc:
        if named:
            where = "--cache-dir" if option else ENV
            raise ConfigError(f"{where} {path}: cannot use it as the kernel cache ({exc})") from None
        path = Path(tempfile.mkdtemp(prefix="hpcembed-cache-"))
        log.warning("kernel cache: %s; compiling into %s instead, which is not kept", exc, path)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(path / "inductor"))
    os.environ.setdefault("TRITON_CACHE_DIR", str(path / "triton"))
    return path


def read_entry(path: Path) -> dict | None:
    """A JSON entry of the cache, or None where it is missing or unreadable (then it is computed again)."""
    try:
        entry = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return entry if isinstance(entry, dict) else None


def write_entry(path: Path, entry: dict) -> None:
    """Write an entry under a temporary name and rename it into place, so a rank or job reading it at the same
    time sees all of it or none. An unwritable cache is not an error: the entry is computed again next time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(entry))
        os.replace(tmp, path)
    except OSError as exc:
        log.debug("cache entry %s not written: %s", path, exc)
