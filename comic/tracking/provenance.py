"""Provenance of a run: git commit and dirty flag, package versions, host, and the version of the library's
computing code (what decides whether an ablation cell's stored result still holds)."""

from __future__ import annotations

import hashlib
import importlib.metadata
import platform
import shlex
import socket
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

_PACKAGE = Path(__file__).resolve().parents[1]  # the `comic` package folder
_PACKAGE_ROOT = _PACKAGE.parent
_VERSIONED = {"comic": "comic-lab", "torch": "torch", "ray": "ray", "mlflow": "mlflow", "optuna": "optuna"}
# What computes a run's numbers: the core modules and packages. The rooms above it (tracking, tuning, studies) and
# the reports only record, schedule or draw; the scripts, README and tests are outside the package.
COMPUTING = ("*.py", "models/*.py", "losses/*.py", "data/*.py")
NOT_COMPUTING = ("cli.py", "data/__main__.py", "progress.py")  # flags, the builder CLI, progress display


def code_version() -> str:
    """`code-<sha256[:16]>` over the names and bytes of the library's computing code (COMPUTING): a README, CLI,
    report or orchestration edit keeps it, any change of a model, loss, data or engine module changes it."""
    digest = hashlib.sha256()
    files = sorted({p for pattern in COMPUTING for p in _PACKAGE.glob(pattern)})
    for path in files:
        relative = path.relative_to(_PACKAGE).as_posix()
        if relative not in NOT_COMPUTING:
            digest.update(relative.encode() + b"\0" + path.read_bytes() + b"\0")
    return f"code-{digest.hexdigest()[:16]}"


def git(*args: str) -> str:
    """stdout of `git <args>` run in the checkout holding this package (raises OSError / SubprocessError)."""
    done = subprocess.run(
        ["git", "-C", str(_PACKAGE_ROOT), *args], capture_output=True, text=True, timeout=30, check=True
    )
    return done.stdout.strip()


def _git_state() -> tuple[str | None, bool | None]:
    """(commit, dirty) of the repository holding this package; (None, None) without git or outside a checkout."""
    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() != _PACKAGE_ROOT:
            return None, None  # installed inside some other repository (e.g. a venv in a checkout)
        commit = git("rev-parse", "HEAD")
        # Untracked files (outputs, caches) do not make the code dirty.
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None, None
    return commit, dirty


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def executable(name: str) -> str:
    """This environment's own `name` command (a venv's bin folder is often not on PATH), else the bare name."""
    local = Path(sys.executable).parent / name
    return str(local) if local.is_file() else name


def command_line() -> str:
    """The command that started this process, as a user would retype it (for run descriptions)."""
    return "python " + shlex.join(sys.argv)


def run_tags(extra: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Provenance tags for a run: git commit / dirty flag, package versions, host; `extra` (device name, dataset
    card hash, ...) is merged last. Never imports the packages it reports on."""
    tags = {"host": socket.gethostname(), "version.python": platform.python_version()}
    tags.update({f"version.{label}": _version(dist) for label, dist in _VERSIONED.items()})
    commit, dirty = _git_state()
    if commit is None:
        tags["git.commit"] = "unknown"
    else:
        tags.update({"git.commit": commit, "git.dirty": str(dirty).lower(), "mlflow.source.git.commit": commit})
    tags.update({key: str(value) for key, value in (extra or {}).items()})
    return tags
