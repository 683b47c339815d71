"""Where an output directory's files live: a local directory (LocalDir), or a prefix of an object store
(ObjectDir, s3://bucket/prefix and whatever else pyarrow.fs resolves; io/location.py).

Both give the writer (io/writer.py) and the ledger (io/ledger.py) whole-file writes that a reader sees whole or not
at all. A local file is written under a temporary name, fsynced and renamed. An object store has no rename, and
needs none: a PUT, or a multipart upload once completed, makes the object visible whole, and an upload a crash
interrupts makes nothing visible. What an object store lacks is append and an exclusive create; the ledger
(segments) and the lock (io/lock.py) are built without them.

Every file is named by `file(name)`: a path or a URL, which io/location.py's readers open either way.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from ..errors import ConfigError
from . import location


def open_dir(where: str | Path) -> "LocalDir | ObjectDir":
    return ObjectDir(str(where)) if location.is_url(str(where)) else LocalDir(Path(where))


class LocalDir:
    appendable = True

    def __init__(self, path: Path):
        self.path = Path(path)
        self.location = str(path)

    def make(self) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"output {self.path} exists and is not a directory")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            if isinstance(exc, PermissionError):
                raise                   # the caller names it, with the file
            raise ConfigError(f"cannot create output directory {self.path}: {exc.strerror}") from None

    def is_dir(self) -> bool:
        return self.path.is_dir()

    def names(self) -> list[str]:
        return sorted(p.name for p in self.path.iterdir()) if self.path.is_dir() else []

    def file(self, name: str) -> str:
        return str(self.path / name)

    def size(self, name: str) -> int | None:
        try:
            return (self.path / name).stat().st_size
        except FileNotFoundError:
            return None

    def exists(self, name: str) -> bool:
        return (self.path / name).exists()

    def read(self, name: str) -> bytes:
        return (self.path / name).read_bytes()

    def write(self, name: str, data) -> None:
        final = self.path / name
        tmp = self.path / f".{name}.tmp"
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, final)
        except OSError:
            tmp.unlink(missing_ok=True)
            raise

    def delete(self, name: str) -> None:
        (self.path / name).unlink(missing_ok=True)


class ObjectDir:
    """A prefix of an object store, as a flat directory of objects."""
    appendable = False

    def __init__(self, url: str):
        self.location = url.rstrip("/")
        self.fs, self.root = location.resolve(self.location)

    def make(self) -> None:
        """Objects need no directory; the bucket must exist (it is not created: that is a decision of its owner)."""
        import pyarrow.fs as pafs
        bucket = self.root.split("/", 1)[0]
        try:
            info = self.fs.get_file_info(bucket)
        except OSError as exc:
            raise ConfigError(f"output {self.location}: cannot reach the object store ({exc})") from None
        if info.type == pafs.FileType.NotFound:
            raise ConfigError(f"output {self.location}: bucket {bucket} does not exist; create it first")
        if self.fs.get_file_info(self.root).type == pafs.FileType.File:
            raise ConfigError(f"output {self.location} is an object, not a prefix")

    def is_dir(self) -> bool:
        import pyarrow.fs as pafs
        return self.fs.get_file_info(self.root).type == pafs.FileType.Directory

    def _key(self, name: str) -> str:
        return f"{self.root}/{name}"

    def names(self) -> list[str]:
        import pyarrow.fs as pafs
        infos = self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True))
        return sorted(i.base_name for i in infos if i.type == pafs.FileType.File)

    def file(self, name: str) -> str:
        return location.child(self.location, self._key(name))

    def _info(self, name: str):
        import pyarrow.fs as pafs
        info = self.fs.get_file_info(self._key(name))
        return None if info.type == pafs.FileType.NotFound else info

    def size(self, name: str) -> int | None:
        info = self._info(name)
        return None if info is None else info.size

    def age(self, name: str) -> float | None:
        """Seconds since the object was last written (for ObjectLock); None where there is none."""
        info = self._info(name)
        return None if info is None else time.time() - info.mtime_ns / 1e9

    def exists(self, name: str) -> bool:
        return self._info(name) is not None

    def read(self, name: str) -> bytes:
        try:
            with self.fs.open_input_stream(self._key(name)) as fh:
                return fh.read()
        except OSError:
            if self._info(name) is None:
                raise FileNotFoundError(self.file(name)) from None
            raise

    def write(self, name: str, data) -> None:
        with self.fs.open_output_stream(self._key(name)) as fh:
            fh.write(data)

    def delete(self, name: str) -> None:
        try:
            self.fs.delete_file(self._key(name))
        except FileNotFoundError:
            pass
