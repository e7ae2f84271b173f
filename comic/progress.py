"""Progress that suits where the output goes: a tqdm bar on a terminal; in a log file, CI or a Ray worker's captured
stderr, plain lines (`caching train images: 120/679 img (18%), 31 s, 3.9 img/s`) at most every PLAIN_INTERVAL_S and
at the end, with no carriage returns or cursor moves (nested tqdm bars write `\\x1b[A` into such logs).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

from tqdm.auto import tqdm

PLAIN_INTERVAL_S = 30.0


class PlainProgress:
    """tqdm's small surface (iterate, `update`, `set_postfix`, `close`, `with`) as occasional plain lines."""

    def __init__(self, iterable: Iterable[Any] | None, desc: str, total: int | None, unit: str, leave: bool,
                 stream: TextIO, interval_s: float = PLAIN_INTERVAL_S) -> None:
        self.iterable, self.desc, self.unit, self.leave, self.stream = iterable, desc, unit, leave, stream
        self.total = total if total is not None else _length(iterable)
        self.interval_s = interval_s
        self.n, self.postfix = 0, ""
        self.start = self.last = time.monotonic()
        self.closed = False

    def __iter__(self) -> Iterator[Any]:
        try:
            for item in self.iterable or ():
                yield item
                self.update()
        finally:
            self.close()

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.interval_s:
            self.last = now
            self._line(now)

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", " + ", ".join(f"{k}={v}" for k, v in values.items()) if values else ""

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.leave and self.n:
                self._line(time.monotonic())

    def _line(self, now: float) -> None:
        elapsed = now - self.start
        done = f"{self.n}/{self.total} {self.unit} ({100 * self.n / self.total:.0f}%)" if self.total else \
            f"{self.n} {self.unit}"
        rate = f", {self.n / elapsed:.3g} {self.unit}/s" if elapsed > 0 else ""
        self.stream.write(f"{self.desc}: {done}, {elapsed:.0f} s{rate}{self.postfix}\n")
        self.stream.flush()


def _length(iterable: Iterable[Any] | None) -> int | None:
    try:
        return len(iterable)  # type: ignore[arg-type]
    except TypeError:
        return None


def progress(iterable: Iterable[Any] | None = None, *, desc: str, total: int | None = None, unit: str = "it",
             enabled: bool = True, leave: bool = True) -> Any:
    """A tqdm bar on a terminal, `PlainProgress` lines elsewhere, nothing when not `enabled`."""
    stream = sys.stderr
    if not enabled:
        return tqdm(iterable, total=total, disable=True)
    if stream.isatty():
        return tqdm(iterable, desc=desc, total=total, unit=unit, leave=leave)
    return PlainProgress(iterable, desc, total, unit, leave, stream)
