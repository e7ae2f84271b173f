"""The operating-system idioms every part of the library shares: atomic writes, stable hashes, temporary build
folders, an advisory file lock, and SIGTERM. One definition each, so "written atomically", "content hash" and "what a
SIGTERM does" mean the same everywhere.

SIGTERM, in the main thread: `GUARD` marks sections a SIGTERM must not cut (an MLflow store call inside its SQLite
transaction, a checkpoint being written; the signal is handled when the outermost one ends), and `SigtermHandler` runs
an action, then passes the signal on to the handler installed before it, so that handlers stack: the checkpoint writes
the last finished epoch, the MLflow run is marked KILLED, and the process still dies of SIGTERM as it would without
either.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)

HASH_LENGTH = 16  # hex digits of a stable hash: 64 bits, ample for names of runs, cells and caches


class UserError(Exception):
    """Something the user can fix (a bad flag, key, file or folder): scripts print its message as one `error:` line,
    never a traceback. Every such error of the library derives from it."""


def stable_hash(obj: Any, length: int = HASH_LENGTH) -> str:
    """sha256 hex digest (first `length` digits) of `obj` as canonical JSON: sorted keys, str() for other types."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def absolute_path(path: str | os.PathLike[str]) -> Path:
    """`path` with `~` expanded, made absolute and resolved (Ray trials and MLflow run in other directories)."""
    return Path(path).expanduser().resolve()


def file_digest(path: Path) -> str:
    """sha256 hex digest of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], Any]) -> Path:
    """Call `write(tmp)` on a temporary sibling of `path`, then rename it into place: a crash never leaves half a file.

    The temporary name carries the pid, so concurrent writers of the same file never share one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write `text` to `path` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def make_temp_dir(parent: Path, name: str) -> Path:
    """A fresh `.{name}.tmp-<pid>-*` folder in `parent` (the pid lets later runs spot leftovers of dead builds)."""
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-{os.getpid()}-", dir=parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the published folder should be readable as usual
    return tmp


def remove_stale_temps(parent: Path, name: str) -> None:
    """Delete `.{name}.tmp-<pid>-*` leftovers of interrupted builds whose process is gone."""
    for path in parent.glob(f".{name}.tmp-*"):
        match = re.match(rf"\.{re.escape(name)}\.tmp-(\d+)-", path.name)
        if match and not pid_alive(int(match.group(1))):
            log.info("removing %s, left by an interrupted build", path)
            shutil.rmtree(path, ignore_errors=True)


def publish_dir(tmp: Path, final: Path, marker: str) -> bool:
    """Rename a finished temporary folder to `final`; False (and `tmp` removed) when a concurrent builder won the
    race and `final/marker` already exists; other failures raise."""
    try:
        os.rename(tmp, final)
        return True
    except OSError:
        if not (final / marker).is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        log.info("a concurrent build produced %s first; using it", final)
        return False


def pid_alive(pid: int) -> bool:
    """True while process `pid` exists (ours included)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def file_lock(path: str | os.PathLike[str]) -> Iterator[None]:
    """Exclusive advisory lock on `path` (created if missing) for a block: concurrent processes take turns.

    A no-op where `fcntl` is unavailable (not POSIX).
    """
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; concurrent builders then race on the final rename only
        yield
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# ------------------------------------------------------------------------------------------------ SIGTERM


class CallGuard:
    """Counts guarded sections in progress in the main thread; a SIGTERM arriving during one waits for its end.

    The signal handler runs in the main thread between bytecodes, possibly inside an open SQLite write transaction of
    that same thread (writing the KILLED status from the handler would then wait on our own lock) or halfway through
    copying a checkpoint.
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


GUARD = CallGuard()  # one per process: every handler and guarded section shares it


class SigtermHandler:
    """`action()` on SIGTERM (after any guarded section in progress), then the previous handler's turn.

    Installed in the main thread only (Python delivers signals there; a Ray trial's thread cannot install one), and
    not over SIG_IGN (a process that ignores SIGTERM keeps running). `uninstall` restores the previous handler if ours
    is still on top; otherwise ours stays and only passes the signal on once `action` has run.
    """

    def __init__(self, action: Callable[[int], None]) -> None:
        self.action = action
        self.previous: Any = None
        self.installed = False
        self.done = False

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        previous = signal.getsignal(signal.SIGTERM)
        if previous is signal.SIG_IGN:
            return
        self.previous, self.installed = previous, True
        signal.signal(signal.SIGTERM, self)

    def uninstall(self) -> None:
        self.done = True  # a handler left in place passes signals on without acting
        if not self.installed or threading.current_thread() is not threading.main_thread():
            return
        self.installed = False
        if signal.getsignal(signal.SIGTERM) is self:
            signal.signal(signal.SIGTERM, self.previous)

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        if GUARD.depth:
            GUARD.deferred.append(lambda: self._handle(signum, None))
        else:
            self._handle(signum, frame)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if not self.done:
            self.done = True
            try:
                self.action(signum)
            except Exception:
                log.exception("could not complete the SIGTERM action %s", self.action)
        previous = self.previous
        if callable(previous):
            previous(signum, frame)
            return
        # SIG_DFL (or a handler installed from C): let the default action end the process, as it would without us.
        signal.signal(signum, signal.SIG_DFL)
        signal.raise_signal(signum)
