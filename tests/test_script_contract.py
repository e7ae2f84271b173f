"""The contract every script keeps (`comic.progress.script_main`), with real signals: a user's mistake is one `error:`
line and status 2; Ctrl-C and SIGTERM stop the work the same way, say how to resume and exit 130; a signal that
arrives after the work was recorded changes nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from comic._io import UserError
from comic.progress import INTERRUPTED, script_main

REPO = Path(__file__).resolve().parents[1]


def test_a_user_error_is_one_line_and_status_2(capsys):
    def body() -> int:
        raise UserError("--data ~/nowhere: folder not found")

    assert script_main(body) == 2
    assert capsys.readouterr().err == "error: --data ~/nowhere: folder not found\n"


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_and_sigterm_stop_the_same_way(signum, capsys):
    """The signal is real, sent to this process while the body works (no Tune run in progress: Python's own Ctrl-C
    handler, no SIGUSR1 one); a bug elsewhere still raises."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGUSR1, signal.SIG_DFL)

    def body() -> int:
        os.kill(os.getpid(), signum)
        raise AssertionError("the signal did not stop the body")

    assert script_main(body, interrupted=lambda: "interrupted; run it again") == INTERRUPTED
    assert capsys.readouterr().err == "interrupted; run it again\n"
    with pytest.raises(ZeroDivisionError):
        script_main(lambda: 1 // 0)


LATE = """
import atexit, sys
from comic.progress import finished, script_main
def body():
    finished(None)
    print("summary: done", flush=True)
    return int(sys.argv[1])
atexit.register(sys.stdin.readline)  # the process lingers after the summary until the test lets it go
sys.exit(script_main(body))
"""


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 0), (signal.SIGTERM, 0), (signal.SIGINT, 1)])
def test_a_signal_after_the_summary_changes_nothing(signum, code):
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(LATE), str(code)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    assert proc.stdout.readline() == "summary: done\n"
    proc.send_signal(signum)
    assert "arrived after the work was finished" in proc.stderr.readline()
    proc.stdin.close()
    proc.wait(timeout=60)
    assert proc.returncode == code
