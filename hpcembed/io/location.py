"""Where inputs live: local paths, or URLs that pyarrow's filesystems resolve (s3://bucket/key, gs://, hdfs://,
with pyarrow's query options such as `?endpoint_override=host:9000&scheme=http`).

For s3:// URLs without an endpoint in the URL, AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL names an S3-compatible
store (MinIO, Ceph, a site's object store), as the AWS command-line tools read them. Credentials come from the
environment and the usual AWS files, never from the URL: a URL is printed in messages and kept in the manifest,
so one that holds a secret is refused.

Every reader opens inputs here: `open_input` gives a buffered binary file (lines, seeks, gzip), `open_arrow` what
pyarrow's Parquet and CSV readers take. A URL's file is read in ranges; a local path is opened as ever.
"""
from __future__ import annotations

import functools
import gzip
import io
import os
from urllib.parse import parse_qs, urlsplit

from ..errors import ConfigError

_SECRETS = ("access_key", "secret_key", "session_token")
READ_BUFFER = 4 << 20


def is_url(path: str) -> bool:
    return "://" in path


def display(url: str) -> str:
    """The URL without its query: its name, for formats and generated ids."""
    return url.split("?", 1)[0]


@functools.lru_cache(maxsize=None)
def _filesystem(scheme: str, netloc: str, query: str):
    import pyarrow.fs as pafs
    options = parse_qs(query)
    if any(key in options for key in _SECRETS):
        raise ConfigError(f"{scheme}://{netloc}: credentials in a URL would be printed and kept in the manifest; "
                          "give them in the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) instead")
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if scheme == "s3" and endpoint and "endpoint_override" not in options:
        parts = urlsplit(endpoint)
        return pafs.S3FileSystem(endpoint_override=parts.netloc or parts.path, scheme=parts.scheme or "https")
    try:
        return pafs.FileSystem.from_uri(f"{scheme}://{netloc}/" + (f"?{query}" if query else ""))[0]
    except (ValueError, OSError) as exc:
        raise ConfigError(f"{scheme}://{netloc}: {exc}") from None


def resolve(url: str):
    """(pyarrow filesystem, its path) of a URL."""
    parts = urlsplit(url)
    fs = _filesystem(parts.scheme, parts.netloc, parts.query)
    path = parts.path if fs.type_name in ("hdfs", "local") else parts.netloc + parts.path
    return fs, path.rstrip("/") or path


def child(url: str, path: str) -> str:
    """The URL of `path`, a path of the filesystem `url` resolves to (a file found under it)."""
    parts = urlsplit(url)
    base = f"{parts.scheme}://{parts.netloc}{path}" if path.startswith("/") else f"{parts.scheme}://{path}"
    return base + (f"?{parts.query}" if parts.query else "")


def is_dir(url: str) -> bool:
    import pyarrow.fs as pafs
    fs, path = resolve(url)
    return fs.get_file_info(path).type == pafs.FileType.Directory


def exists(url: str) -> bool:
    import pyarrow.fs as pafs
    fs, path = resolve(url)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def list_files(url: str) -> list[str]:
    """Every file under a directory URL (recursively), as URLs, in name order."""
    import pyarrow.fs as pafs
    fs, path = resolve(url)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    return sorted(child(url, info.path) for info in infos if info.type == pafs.FileType.File)


def stat(path: str) -> tuple[int, int] | None:
    """(size, modification time in ns) of a path or URL; None where it does not exist."""
    if not is_url(path):
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        return st.st_size, st.st_mtime_ns
    import pyarrow.fs as pafs
    fs, fs_path = resolve(path)
    info = fs.get_file_info(fs_path)
    if info.type == pafs.FileType.NotFound:
        return None
    return info.size, info.mtime_ns or 0


class _RawRange(io.RawIOBase):
    """A pyarrow random-access file as a Python raw file, so io.BufferedReader gives lines and seeks."""

    def __init__(self, native):
        self._native = native

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self._native.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._native.seek(offset, whence)

    def tell(self) -> int:
        return self._native.tell()

    def close(self) -> None:
        if not self.closed:
            self._native.close()
        super().close()


class _GzipOwning(gzip.GzipFile):
    """A GzipFile that closes the file it reads (gzip leaves a file object it was given open)."""

    def close(self) -> None:
        source = self.fileobj
        try:
            super().close()
        finally:
            if source is not None:
                source.close()


def open_input(path: str, gzipped: bool = False):
    """A buffered binary file of a path or URL (`gzipped`: its content, decompressed)."""
    if not is_url(path):
        return gzip.open(path, "rb") if gzipped else open(path, "rb")
    raw = io.BufferedReader(_RawRange(open_arrow(path)), READ_BUFFER)
    return _GzipOwning(fileobj=raw, mode="rb") if gzipped else raw


def open_arrow(path: str):
    """What pyarrow's readers take: the path itself, or a URL's file opened for random access."""
    if not is_url(path):
        return path
    fs, fs_path = resolve(path)
    return fs.open_input_file(fs_path)
