"""One job at a time per output directory: `_lock`, held by the job's rank 0 from opening the directory to the end.

The lock is a file created with O_CREAT | O_EXCL, which is atomic on local file systems, Lustre, GPFS and NFSv3+,
unlike flock, which some of them do not pass between clients. It names its holder (host, pid, the process's start
time, Slurm job id) so that a refused job can say who holds it, and the holder touches it every HEARTBEAT_SECONDS.

A lock is taken over only when its holder is provably gone: on the same host, when its pid is not running (or is
another process than the one that took it); from another host, when it has not been touched for STALE_SECONDS,
which a live holder never lets happen. Taking over renames the stale file away first and checks that it renamed
the one it judged stale, so two jobs that find the same stale lock cannot both win.

An object store has neither an exclusive create nor a rename (ObjectLock). There a job that finds no lock, or a
stale one, writes its own, waits SETTLE_SECONDS and reads it back: with the read-after-write consistency that S3
and its peers give, of two jobs that start together the one whose write came last finds its own lock and goes on,
and the other finds the winner's and is refused. A job whose write comes later than that would have found the
first job's lock before writing. The heartbeat rewrites the lock, and a job that finds someone else's lock in place
of its own stops at the next heartbeat rather than write beside it.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path

from ..errors import ConfigError
from ..world import process_start_ticks

log = logging.getLogger("hpcembed")

LOCK = "_lock"
HEARTBEAT_SECONDS = 10.0
STALE_SECONDS = 120.0
SETTLE_SECONDS = 2.0


def _alive(pid: int) -> bool:
    """Whether `pid` runs. A zombie does not: a rank killed outright stays one until something reaps it, which an
    init that reaps late (containers, microVMs) can leave for seconds, and a rerun must not be refused for that."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True                 # someone else's process
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return True                 # no /proc here: the signal's answer stands


def describe(holder: dict) -> str:
    slurm = f", Slurm job {holder['slurm_job']}" if holder.get("slurm_job") else ""
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("acquired", 0)))
    return f"pid {holder.get('pid')} on {holder.get('host')}{slurm}, since {since}"


def output_lock(store):
    """The lock of an output directory's store (io/store.py)."""
    return OutputLock(store.path) if store.appendable else ObjectLock(store)


def _me() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": process_start_ticks(os.getpid()),
            "slurm_job": os.environ.get("SLURM_JOB_ID"), "acquired": time.time(), "token": os.urandom(8).hex()}


def _same_host_gone(holder: dict | None, me: dict) -> str | None:
    """Why a holder on this host is gone ("" if it is alive; None if it is on another host)."""
    if holder is None or holder.get("host") != me["host"] or not isinstance(holder.get("pid"), int):
        return None
    pid = holder["pid"]
    if not _alive(pid):
        return f"pid {pid} is not running"
    started = process_start_ticks(pid)      # tells a reused pid apart
    if holder.get("started") is not None and started is not None and started != holder["started"]:
        return f"pid {pid} is now another process"
    return ""


def _refused(directory, holder: dict | None, path) -> ConfigError:
    who = describe(holder) if holder else "a job whose lock cannot be read"
    return ConfigError(f"output directory {directory} is in use by another hpcembed job ({who}); wait for it, or "
                       f"choose another --output. If that job is gone, remove {path}")


class ObjectLock:
    """`_lock` on an object store (see the module's docstring)."""

    def __init__(self, store):
        self.store = store
        self.directory, self.path = store.location, store.file(LOCK)
        self.held = False
        self._touched = 0.0
        self.me = _me()

    def _holder(self) -> dict | None:
        try:
            holder = json.loads(self.store.read(LOCK))
            return holder if isinstance(holder, dict) else None
        except FileNotFoundError:
            return None
        except ValueError:
            return {}

    def _write(self) -> None:
        self.store.write(LOCK, (json.dumps(self.me) + "\n").encode())
        self._touched = time.monotonic()

    def acquire(self) -> None:
        holder = self._holder()
        if holder is not None:
            gone = _same_host_gone(holder, self.me)
            age = self.store.age(LOCK)
            if gone is None and age is not None and age > STALE_SECONDS:
                gone = f"it has not been refreshed for {age:.0f} s"
            if not gone:
                raise _refused(self.directory, holder, self.path)
            log.warning("output %s: took over the lock of %s: %s", self.directory, describe(holder), gone)
        self._write()
        time.sleep(SETTLE_SECONDS)
        found = self._holder()
        if found != self.me:
            raise _refused(self.directory, found, self.path)
        self.held = True

    def refresh(self) -> None:
        now = time.monotonic()
        if not self.held or now - self._touched < HEARTBEAT_SECONDS:
            return
        self._touched = now
        try:
            found = self._holder()
            if found != self.me:
                self.held = False
                raise ConfigError(f"output directory {self.directory}: another job has taken over {self.path} "
                                  f"({describe(found) if found else 'unreadable'}); this job stops")
            self._write()
        except OSError as exc:
            log.warning("output %s: cannot refresh %s: %s", self.directory, self.path, exc)

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        try:
            if self._holder() == self.me:
                self.store.delete(LOCK)
        except OSError as exc:
            log.warning("output %s: cannot remove %s: %s", self.directory, self.path, exc)


class OutputLock:
    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.path = self.directory / LOCK
        self.held = False
        self._touched = 0.0
        self.me = _me()

    def acquire(self) -> None:
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._read(self.path)
                gone = self._gone(holder)
                if gone is None:
                    raise _refused(self.directory, holder, self.path) from None
                self._take_over(holder, gone)
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(json.dumps(self.me) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            self.held, self._touched = True, time.monotonic()
            return
        raise ConfigError(f"output directory {self.directory}: could not take {self.path}, other jobs keep taking it")

    def refresh(self) -> None:
        """The heartbeat: touch the lock if HEARTBEAT_SECONDS have passed (cheap to call often)."""
        now = time.monotonic()
        if self.held and now - self._touched >= HEARTBEAT_SECONDS:
            self._touched = now
            try:
                os.utime(self.path)
            except OSError as exc:
                log.warning("output %s: cannot refresh %s: %s", self.directory, self.path, exc)

    def release(self) -> None:
        """Remove the lock if it is still this process's (never someone else's that took it over)."""
        if not self.held:
            return
        self.held = False
        holder = self._read(self.path)
        if holder is not None and holder.get("pid") == self.me["pid"] and holder.get("host") == self.me["host"]:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass

    @staticmethod
    def _read(path: Path) -> dict | None:
        try:
            holder = json.loads(path.read_text())
            return holder if isinstance(holder, dict) else None
        except (OSError, ValueError):
            return None             # half-written by a holder killed at once, or removed meanwhile

    def _gone(self, holder: dict | None) -> str | None:
        """Why the holder is provably gone, or None if it may be alive."""
        same_host = _same_host_gone(holder, self.me)
        if same_host is not None:
            return same_host or None
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return "it was removed"
        if age > STALE_SECONDS:
            return f"it has not been refreshed for {age:.0f} s"
        return None

    def _take_over(self, holder: dict | None, why: str) -> None:
        aside = self.path.with_name(f".{LOCK}.stale-{self.me['host']}-{self.me['pid']}")
        try:
            os.replace(self.path, aside)
        except FileNotFoundError:
            return                  # another job moved it first: try to create ours again
        moved = self._read(aside)
        if moved != holder:
            # Not the lock judged stale: a job that took it over meanwhile. Put it back, unless yet another has
            # been created since (then that one stands, and this job tries again and is refused).
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
            aside.unlink(missing_ok=True)
            return
        aside.unlink(missing_ok=True)
        who = describe(holder) if holder else "an unreadable lock"
        log.warning("output %s: took over the lock of %s: %s", self.directory, who, why)
