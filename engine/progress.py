"""A progress line on stderr: items/s, output tokens/s, store hit ratio, ETA from items done against
an estimated total."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

from engine.metrics import Metrics


def fmt_eta(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds < 0:
        return "--:--:--"
    s = int(seconds)
    return f"{s // 3600:d}:{s // 60 % 60:02d}:{s % 60:02d}"


class Progress:
    """Call `tick()` often; it prints at most every `every_s` seconds. `total` returns the (estimated)
    number of items, or None when unknown; `done` counts items finished or found already done."""

    def __init__(
        self,
        metrics: Metrics,
        total: Callable[[], float | None],
        *,
        every_s: float = 2.0,
        stream: TextIO | None = None,
        enabled: bool = True,
        unit: str = "inst",
        count_kept: bool = True,
    ) -> None:
        self.metrics = metrics
        self.total = total
        self.every_s = every_s
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.unit = unit
        self.count_kept = count_kept
        self.kept_label = "kept"  # e.g. "kept this run" when `done` includes earlier runs' items
        self.done = 0
        self.kept = 0
        self.start = time.monotonic()
        self._last = 0.0
        self._tty = getattr(self.stream, "isatty", lambda: False)()

    def line(self) -> str:
        m = self.metrics
        el = max(time.monotonic() - self.start, 1e-9)
        total = self.total()
        frac = min(1.0, self.done / total) if total else None
        eta = el * (1 - frac) / frac if frac and frac > 0.001 else None
        pct = f"{100 * frac:5.1f}%" if frac is not None else "  ?  "
        hit = m.hits / m.submitted if m.submitted else 0.0
        kept = f" ({self.kept:,} {self.kept_label})" if self.count_kept else ""
        return (
            f"[{pct}] {self.done:,} done{kept} | {self.done / el:,.1f} {self.unit}/s | "
            f"{m.completion_tokens / el:,.0f} out tok/s | in-flight {m.inflight} | "
            f"store hits {100 * hit:.0f}% | ETA {fmt_eta(eta)}"
        )

    def tick(self, force: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not force and now - self._last < self.every_s):
            return
        self._last = now
        end = "\r" if self._tty and not force else "\n"
        print(self.line(), end=end, file=self.stream, flush=True)
