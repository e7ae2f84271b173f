"""What a script shows and how it ends, the same for every script.

Progress that suits where the output goes (`progress`): a tqdm bar on a terminal; in a log file, CI or a Ray worker's
captured stderr, plain lines (`caching train images: 120/679 img (18%), 31 s, 3.9 img/s`) at most every
PLAIN_INTERVAL_S and at the end, with no carriage returns or cursor moves (nested tqdm bars write `\\x1b[A` into such
logs). And the contract every script keeps from its first log line to its exit status (`script_main`): one log
format, SIGTERM as Ctrl-C, a user's mistake as one `error:` line, an interruption that says how to resume, and a
signal after the work was recorded that changes nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TextIO

from tqdm.auto import tqdm

from comic._io import UserError

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


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"  # every script's, and `comic.data build`'s
INTERRUPTED = 130  # the shell's status for a process stopped by Ctrl-C (128 + SIGINT)


def script_main(body: Callable[[], int], *, verbose: Sequence[str] = ("comic",), level: int = logging.INFO,
                interrupted: Callable[[], str] = lambda: "interrupted") -> int:
    """A script's whole life under the one contract every script keeps:

    - logging: LOG_FORMAT; warnings from every library, `level` and above from the loggers in `verbose`;
    - SIGTERM is Ctrl-C (`sigterm_as_interrupt`): the work stops as it does on Ctrl-C, saved and resumable;
    - a UserError (a bad flag, key, file, folder or model): one `error:` line that says what to do, status 2;
    - Ctrl-C / SIGTERM: the `interrupted()` text (how to resume) on stderr, status 130;
    - once `body` returned, its record is complete: a later signal is said to be too late and changes nothing
      (`finished`; the script's own `finished(None)` call marks that point earlier, before its summary).
    """
    _FINISHED.code, _FINISHED.signalled = None, False
    logging.basicConfig(level=logging.WARNING, format=LOG_FORMAT, datefmt="%H:%M:%S")
    for name in verbose:
        logging.getLogger(name).setLevel(level)
    try:
        with sigterm_as_interrupt():
            code = body()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if _FINISHED.code is not None:  # arrived between the script's finished() and here: the record is whole
            return _FINISHED.code
        print(interrupted(), file=sys.stderr)
        return INTERRUPTED
    return finished(code)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (`kill`, a stopped container, a killed `make demo`) stops the work as Ctrl-C does: inside Ray Tune's
    loop it becomes Tune's own graceful stop (SIGUSR1: its state is saved, running trials end KILLED), elsewhere a
    KeyboardInterrupt. The library's SIGTERM safety nets (`comic._io.SigtermAction`: a run marked KILLED, the last
    epoch written) run first and chain to this."""
    def on_sigterm(signum: int, frame: Any) -> None:
        if signal.getsignal(signal.SIGUSR1) not in (signal.SIG_DFL, signal.SIG_IGN, None):
            os.kill(os.getpid(), signal.SIGUSR1)  # Tune is running: its handler takes it from here
        else:
            raise KeyboardInterrupt("terminated (SIGTERM)")

    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers belong to the main thread
        return
    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        if _FINISHED.code is None:
            signal.signal(signal.SIGTERM, previous)


class _Finished:
    """The exit status a script settled on once its record was complete (None: still working), and whether a signal
    has come since."""

    code: int | None = None
    signalled: bool = False


_FINISHED = _Finished()


def finished(code: int | None) -> int:
    """Mark the script's work as complete and recorded: from here on Ctrl-C or SIGTERM is said to be too late and
    ignored (a second one exits at once with the same status), so a complete record never ends with status 130.
    `code` None: the status is not known yet (0 until the script returns)."""
    _FINISHED.code = 0 if code is None else code
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, _too_late)
    return _FINISHED.code


def _too_late(signum: int, frame: Any) -> None:
    if _FINISHED.signalled:
        os._exit(_FINISHED.code or 0)
    _FINISHED.signalled = True
    print(f"({signal.Signals(signum).name} arrived after the work was finished and recorded; nothing to stop)",
          file=sys.stderr, flush=True)
