"""A dependency-free progress bar with throughput, written to stderr.

On a terminal it redraws one line in place (``\\r``); elsewhere (log files, CI, pipes) it degrades to a
plain line every ``interval`` seconds and one at the end, so logs stay readable.
"""
from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """Progress over ``total`` units (e.g. images; ``None``: not known in advance) with a rate in units per
    second.

    ``update(n, **values)`` advances by ``n`` units and shows the latest ``values`` (for example the running
    loss); ``close()`` prints the final state. Usable as a context manager. ``enabled=False`` makes every call
    a no-op (ranks other than 0 in distributed training).
    """

    def __init__(self, total: int | None, desc: str = "", unit: str = "img", stream: TextIO | None = None,
                 interval: float | None = None, width: int = 24, enabled: bool = True):
        if total is not None and total < 0:
            raise ValueError(f"total must be non-negative, got {total}")
        self.total = None if total is None else int(total)
        self.desc = desc
        self.unit = unit
        self.stream = sys.stderr if stream is None else stream
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = interval if interval is not None else (0.2 if self.tty else 30.0)
        self.width = width
        self.enabled = enabled
        self.count = 0
        self.values: dict[str, float] = {}
        self.start = time.perf_counter()
        self._last = self.start
        self._closed = False

    @property
    def rate(self) -> float:
        """Units per second since the start."""
        elapsed = time.perf_counter() - self.start
        return self.count / elapsed if elapsed > 0 else 0.0

    def update(self, n: int = 1, **values: float) -> None:
        self.count += n
        self.values.update(values)
        if not self.enabled:
            return
        now = time.perf_counter()
        if now - self._last >= self.interval:
            self._last = now
            self._write(final=False)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.enabled:
            self._write(final=True)

    def line(self) -> str:
        """The status text: description, bar (on a TTY), count, rate, elapsed time and values."""
        elapsed = time.perf_counter() - self.start
        parts = [self.desc] if self.desc else []
        if self.total is None:  # an iterable of unknown length: the count alone
            parts.append(f"{self.count} {self.unit}")
        else:
            frac = min(self.count / self.total, 1.0) if self.total else 1.0
            if self.tty:
                filled = int(round(frac * self.width))
                parts.append("[" + "#" * filled + "." * (self.width - filled) + "]")
            parts.append(f"{self.count}/{self.total} {self.unit} ({100 * frac:.0f}%)")
        parts.append(f"{self.rate:.0f} {self.unit}/s")
        parts.append(f"{elapsed:.1f}s")
        parts.extend(f"{k}={v:.4g}" for k, v in self.values.items())
        return "  ".join(parts)

    def _write(self, final: bool) -> None:
        if self.tty:
            self.stream.write("\r\033[K" + self.line() + ("\n" if final else ""))
        else:
            self.stream.write(self.line() + "\n")
        self.stream.flush()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
