"""A guard around MLflow calls of the main thread, so that a SIGTERM arriving during one is handled after it."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator


class CallGuard:
    """Counts MLflow calls in progress in the main thread; a SIGTERM arriving during one waits for its end.

    The signal handler runs in the main thread between bytecodes, possibly inside an open SQLite write
    transaction of that same thread; writing the KILLED status from the handler then would wait on our own lock.
    """

    def __init__(self) -> None:
        self.depth = 0
        self.deferred: list[Callable[[], None]] = []

    @contextlib.contextmanager
    def call(self) -> Iterator[None]:
        main = threading.current_thread() is threading.main_thread()
        if main:
            self.depth += 1
        try:
            yield
        finally:
            if main:
                self.depth -= 1
                while self.depth == 0 and self.deferred:
                    self.deferred.pop(0)()


GUARD = CallGuard()  # one per process: signal handlers and MLflow calls of every RunTracker share it
