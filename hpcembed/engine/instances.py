"""Several model instances behind one rank: each instance has its own thread (and, on CUDA, its own stream),
batches go round-robin (a server may reserve instances for its low-latency lane), and results come back in
submission order. An instance's thread keeps up to its encoder's `launch_ahead` batches queued on the GPU, so the
GPU does not wait for a thread to wake up.

Small encoders leave an H100 idle between kernels of one stream; a second instance fills those gaps (the
seed's multi-instance). The role loop stays the only thread that talks to the transport.
"""
from __future__ import annotations

import queue
import threading
import time
from collections import deque

import numpy as np

from ..tokenize.batch import TokenBatch
from .base import Encoder, Pending


class InstancePool:
    def __init__(self, encoders: list[Encoder], depth: int | None = None, on_done=None, reserved: int = 0):
        """`depth`: batches handed to each instance at a time; by default one more than it launches ahead, so
        that when a result comes back the next batch is already waiting to be launched behind the running one.
        `on_done()`: called from an instance thread whenever a batch finishes (a waiting driver's wake-up).
        `reserved`: the last that many instances take only the batches submitted with reserved=True (a server's
        low-latency lane), the others the rest."""
        if not 0 <= reserved < len(encoders):
            raise ValueError(f"{reserved} reserved instances of {len(encoders)}: at least one must be shared")
        self.encoders = encoders
        self.reserved, self._shared = reserved, len(encoders) - reserved
        self._next_reserved = 0
        self._on_done = on_done
        self.depth = depth or max(2, max(e.launch_ahead for e in encoders) + 1)
        self._inboxes = [queue.SimpleQueue() for _ in encoders]
        self._order: deque[tuple[int, dict]] = deque()
        self._next = 0
        # Busy time: an instance is busy while it has a batch launched and not finished; the stage is busy while
        # any instance is (the instances overlap, so their sum can exceed the wall clock).
        self._launched = [0] * len(encoders)
        self._last_end = [0.0] * len(encoders)
        self._busy = [0.0] * len(encoders)
        self._since = [0.0] * len(encoders)
        self._active = 0
        self._active_since = 0.0
        self._union_busy = 0.0
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._serve, args=(k,), daemon=True, name=f"instance-{k}")
                         for k in range(len(encoders))]
        for th in self._threads:
            th.start()

    @property
    def capacity(self) -> int:
        return self.depth * len(self.encoders) - len(self._order)

    @property
    def in_flight(self) -> int:
        return len(self._order)

    @property
    def busy_seconds(self) -> float:
        """The instances' busy times, summed."""
        with self._lock:
            now = time.perf_counter()
            return sum(b + (now - s if n else 0.0) for b, s, n in zip(self._busy, self._since, self._launched))

    @property
    def stage_busy_seconds(self) -> float:
        with self._lock:
            return self._union_busy + (time.perf_counter() - self._active_since if self._active else 0.0)

    def _mark(self, k: int, delta: int) -> None:
        with self._lock:
            now = time.perf_counter()
            before = self._launched[k]
            self._launched[k] += delta
            if before == 0:
                self._since[k] = now
                if self._active == 0:
                    self._active_since = now
                self._active += 1
            elif self._launched[k] == 0:
                self._busy[k] += now - self._since[k]
                self._active -= 1
                if self._active == 0:
                    self._union_busy += now - self._active_since

    def describe(self) -> dict:
        first = self.encoders[0]
        build: dict[str, float] = {}
        for encoder in self.encoders:
            for step, seconds in encoder.build_seconds.items():
                build[step] = build.get(step, 0.0) + seconds
        return {"engine": first.engine, "device": first.device_name, "dtype": first.dtype_name,
                "attention": getattr(first, "attention_name", ""), "fused_ops": getattr(first, "fused_ops", ""),
                "instances": len(self.encoders), "fp8_min_cosine": getattr(first, "fp8_min_cosine", None),
                "build_seconds": build}

    def submit(self, batch: TokenBatch, reserved: bool = False) -> None:
        """Hand `batch` to the next instance in turn: a reserved one if asked for and there are any."""
        slot = {"batch": batch, "done": threading.Event()}
        if reserved and self.reserved:
            k = self._shared + self._next_reserved
            self._next_reserved = (self._next_reserved + 1) % self.reserved
        else:
            k = self._next
            self._next = (self._next + 1) % self._shared
        self._order.append((k, slot))
        self._inboxes[k].put(slot)

    def finished(self) -> list[tuple[TokenBatch, np.ndarray, float]]:
        """Every batch finished so far, whatever was submitted before it (a server's small batch need not wait
        for a large one on another instance), with the seconds its instance spent on it alone; no waiting."""
        done = [entry for entry in self._order if entry[1]["done"].is_set()]
        for entry in done:
            self._order.remove(entry)
            if "error" in entry[1]:
                raise entry[1]["error"]
        return [(slot["batch"], slot["embeddings"], slot["seconds"]) for _, slot in done]

    def completed(self, wait: float = 0.0) -> list[tuple[TokenBatch, np.ndarray]]:
        """Finished batches, oldest first; waits up to `wait` seconds for the oldest one."""
        out = []
        while self._order:
            _, slot = self._order[0]
            if not slot["done"].wait(wait if not out else 0):
                break
            self._order.popleft()
            if "error" in slot:
                raise slot["error"]
            out.append((slot["batch"], slot["embeddings"]))
        return out

    def _serve(self, k: int) -> None:
        """Launch batches as they come, up to the encoder's launch_ahead before taking the oldest one's result:
        the next batch is queued on the GPU while this thread waits for the previous one."""
        encoder, inbox = self.encoders[k], self._inboxes[k]
        launched: deque[tuple[dict, Pending]] = deque()
        closing = False
        while launched or not closing:
            if not closing and len(launched) < encoder.launch_ahead:
                try:
                    slot = inbox.get(block=not launched)
                except queue.Empty:
                    slot = False                    # nothing new: take the oldest result
                if slot is None:
                    closing = True
                    continue
                if slot:
                    self._mark(k, +1)
                    slot["launched_at"] = time.perf_counter()
                    try:
                        launched.append((slot, encoder.launch(slot["batch"])))
                    except BaseException as exc:  # noqa: BLE001 - handed to the role loop, which reports it
                        self._finish(k, slot, error=exc)
                    continue
            slot, pending = launched.popleft()
            try:
                embeddings = pending.result()
            except BaseException as exc:  # noqa: BLE001 - handed to the role loop, which reports it
                self._finish(k, slot, error=exc)
            else:
                self._finish(k, slot, embeddings=embeddings)

    def _finish(self, k: int, slot: dict, embeddings: np.ndarray | None = None,
                error: BaseException | None = None) -> None:
        if error is not None:
            slot["error"] = error
        else:
            slot["embeddings"] = embeddings
        # Its own time: from its launch, or from the end of the batch before it on this instance if that ran on.
        now = time.perf_counter()
        slot["seconds"] = now - max(slot.get("launched_at", now), self._last_end[k])
        self._last_end[k] = now
        self._mark(k, -1)
        slot["done"].set()
        if self._on_done is not None:
            self._on_done()

    def close(self) -> None:
        for inbox in self._inboxes:
            inbox.put(None)
        # Joined, not left as daemons: torch aborts the process if its threads are torn down mid-kernel.
        for th in self._threads:
            th.join()
