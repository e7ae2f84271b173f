"""Every benchmark script still runs: its `--smoke-test`, in this process (the numbers are not checked here)."""

from __future__ import annotations

from pathlib import Path

import pytest

BENCHMARKS = sorted(p.name for p in (Path(__file__).resolve().parents[1] / "benchmarks").glob("*.py"))


@pytest.mark.parametrize("name", BENCHMARKS)
def test_benchmark_smoke(name, script, capsys, monkeypatch, tmp_path, restore_torch_globals):
    monkeypatch.chdir(tmp_path)
    script(f"benchmarks/{name}").main(["--smoke-test"])
    out = capsys.readouterr().out
    assert "device: cpu" in out or "img/s" in out, out[-2000:]
    if name == "frozen_trunk.py":
        assert out.strip().splitlines()[-1].startswith("shared_trunk_speedup=")
