"""Progress outside a terminal: plain lines, never carriage returns or cursor moves (what tqdm writes into logs)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

from comic.progress import PlainProgress, progress

ROOT = Path(__file__).resolve().parents[1]


def test_plain_lines_count_and_rate():
    out = io.StringIO()
    bar = PlainProgress(range(3), "caching train images", None, "img", True, out, interval_s=0.0)
    bar.set_postfix(loss="0.5")
    assert list(bar) == [0, 1, 2]
    lines = out.getvalue().splitlines()
    # one line per step (interval 0), then the closing line; each says n / total and the percentage
    assert [line.split(",")[0] for line in lines] == [
        "caching train images: 1/3 img (33%)", "caching train images: 2/3 img (67%)",
        "caching train images: 3/3 img (100%)", "caching train images: 3/3 img (100%)"]
    assert all("loss=0.5" in line and " img/s" in line for line in lines)


def test_a_bar_that_does_not_stay_and_a_disabled_one_write_nothing_at_the_end(capsys):
    out = io.StringIO()
    with PlainProgress(None, "epoch 1/2", 4, "batch", False, out) as bar:
        bar.update(4)
    assert out.getvalue() == ""  # under the interval and leave=False: silent
    assert list(progress(range(2), desc="off", enabled=False)) == [0, 1]
    assert capsys.readouterr().err == ""


def test_a_script_logged_to_a_file_has_no_escape_codes(tmp_path, smoke_overrides):
    """A real ablation smoke run with its stderr in a file (not a TTY): the cells' progress ends as one plain line."""
    log = tmp_path / "stderr.log"
    cmd = [sys.executable, str(ROOT / "ablations" / "distribution.py"), "--smoke-test", "--seeds", "0",
           "--study-dir", str(tmp_path / "study"), "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db",
           f"data.cache_dir={smoke_overrides['data.cache_dir']}", "engine.threads=1", "engine.progress=true"]
    with open(log, "w") as err:
        done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=err, cwd=tmp_path, timeout=600,
                              env=os.environ | {"PYTHONWARNINGS": "ignore"})
    text = log.read_text()
    assert done.returncode == 0, text[-2000:]
    assert "\r" not in text and "\x1b" not in text
    assert "distribution cells: 2/2 cell (100%)" in text, text[-2000:]
