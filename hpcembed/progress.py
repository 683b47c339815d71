"""Progress for people: a tqdm bar on a terminal, plain periodic log lines otherwise (batch logs)."""
from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("hpcembed")


class Progress:
    def __init__(self, total_rows: int, mode: str = "auto", interval: float = 10.0, done_rows: int = 0):
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "log"
        self.mode, self.total, self.interval = mode, total_rows, interval
        self.rows, self.tokens = done_rows, 0
        self.resumed = done_rows              # committed by earlier runs: shown, but not in the rates
        self.start = self._last_log = time.monotonic()
        self._bar = None
        if mode == "bar":
            from tqdm import tqdm
            self._bar = tqdm(total=total_rows, initial=done_rows, unit="rows", dynamic_ncols=True,
                             desc="hpcembed (resumed)" if done_rows else "hpcembed", smoothing=0.1)

    def update(self, rows: int, tokens: int) -> None:
        self.rows += rows
        self.tokens += tokens
        if self._bar is not None:
            self._bar.update(rows)
            self._bar.set_postfix_str(f"{self._rate(self.tokens) / 1e3:,.1f}k tok/s", refresh=False)
        self.tick()

    def _rate(self, count: float) -> float:
        return count / max(time.monotonic() - self.start, 1e-9)

    def tick(self) -> None:
        now = time.monotonic()
        if self.mode == "log" and now - self._last_log >= self.interval:
            self._last_log = now
            self.log_line()

    def log_line(self) -> None:
        pct = 100.0 * self.rows / self.total if self.total else 100.0
        resumed = f", {self.resumed:,} of them resumed" if self.resumed else ""
        log.info("progress: %s/%s rows (%.1f%%%s), %s texts/s, %s tokens/s", f"{self.rows:,}", f"{self.total:,}", pct,
                 resumed, f"{self._rate(self.rows - self.resumed):,.0f}", f"{self._rate(self.tokens):,.0f}")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.mode == "log":
            self.log_line()
