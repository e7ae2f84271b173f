"""Threads that fit the machine: `engine.threads=0` means the CPUs this process owns, less its DataLoader workers."""

from __future__ import annotations

import logging
import os

import pytest

from comic.config import load_config
from comic.device import owned_cpus, set_threads


def test_threads_follow_the_cpus_the_process_owns(monkeypatch, caplog, restore_torch_globals):
    engine = load_config("synthetic").engine
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # what Ray sets in a trial with cpus_per_trial=1
    with caplog.at_level(logging.INFO, logger="comic.device"):
        assert set_threads(engine, workers=0) == 1
    assert "torch threads: 1 (1 CPUs from OMP_NUM_THREADS" in caplog.text
    monkeypatch.delenv("OMP_NUM_THREADS")
    cpus, source = owned_cpus()
    assert cpus == min(len(os.sched_getaffinity(0)), cpus) and source
    assert set_threads(engine, workers=1) == max(1, cpus - 1)  # a DataLoader worker takes a CPU
    assert set_threads(engine, workers=cpus + 5) == 1
    explicit = load_config("synthetic", ["engine.threads=3"]).engine
    assert set_threads(explicit, workers=2) == 3


@pytest.mark.parametrize("text, cpus", [("50000 100000", 1), ("150000 100000", 2), ("max 100000", None)])
def test_a_cgroup_quota_limits_the_cpus(text, cpus, monkeypatch, tmp_path):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    quota = tmp_path / "cpu.max"
    quota.write_text(text)
    monkeypatch.setattr("comic.device.CGROUP_CPU_MAX", quota)
    affinity = len(os.sched_getaffinity(0))
    assert owned_cpus()[0] == min(affinity, cpus or affinity)
