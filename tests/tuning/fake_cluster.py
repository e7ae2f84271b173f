"""`ray_cluster.yaml`'s node types on this one machine: Ray's real autoscaler with its `fake_multinode` provider
(Ray's "Testing Autoscaling Locally"), each worker node a local raylet with fake GPUs.

The config is derived from the YAML itself, so the two cannot drift apart: the same node type names, the head's
resources (`CPU: 0`), every type's min / max workers, the cluster's max workers and upscaling speed. Shrunk to fit a
laptop: each worker's resources (`{CPU: 1, GPU: 1}` by default) and the idle timeout. The head starts on a free port,
which the provider is told (`gcs_address`: without it the fake workers dial port 6379). Every process of the cluster
lives under one temporary Ray folder and is stopped by pid, so nothing else of the machine's Ray is touched.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))
FAKE_HEAD_TYPE = "ray.head.default"  # the type the fake provider gives its head node
ENV = {"RAY_FAKE_CLUSTER": "1", "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


def fake_config(cluster_yaml: Path, gcs_address: str, worker_resources: dict[str, float],
                idle_timeout_minutes: float) -> dict[str, Any]:
    """The autoscaling config of `cluster_yaml` for the fake provider: its node types, head and limits, with each
    worker's resources replaced by `worker_resources` and the idle timeout shortened."""
    real = yaml.safe_load(cluster_yaml.read_text())
    types = {}
    for name, node in real["available_node_types"].items():
        if name == real["head_node_type"]:
            types[FAKE_HEAD_TYPE] = {"resources": dict(node["resources"]), "node_config": {}, "max_workers": 0}
        else:
            types[name] = {"resources": dict(worker_resources), "node_config": {},
                           "min_workers": node.get("min_workers", 0), "max_workers": node["max_workers"]}
    empty_lists = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
                   "head_start_ray_commands", "worker_start_ray_commands", "cluster_synced_files", "rsync_exclude",
                   "rsync_filter")
    return {"cluster_name": real["cluster_name"], "max_workers": real["max_workers"],
            "upscaling_speed": real["upscaling_speed"], "idle_timeout_minutes": idle_timeout_minutes,
            "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                         "disable_launch_config_check": True, "gcs_address": gcs_address},
            "available_node_types": types, "head_node_type": FAKE_HEAD_TYPE, "auth": {}, "docker": {},
            "file_mounts": {}, "file_mounts_sync_continuously": False, **{k: [] for k in empty_lists}}


class FakeCluster:
    """`with FakeCluster(config_fn) as cluster:` a head (no CPUs, as in the YAML) with the autoscaler running; on exit
    every process under its Ray folder is stopped by pid and the folder removed."""

    def __init__(self, config_fn: Callable[[str], dict[str, Any]], head_cpus: int = 0) -> None:
        self.config_fn, self.head_cpus = config_fn, head_cpus
        self.temp = Path(tempfile.mkdtemp(prefix="rf", dir="/tmp"))  # short: Ray's socket paths have a length limit
        self.address = f"{socket.gethostbyname(socket.gethostname())}:{_free_port()}"
        self.env = {**os.environ, **ENV}

    def __enter__(self) -> FakeCluster:
        config = self.temp / "autoscaling.yaml"
        config.write_text(yaml.safe_dump(self.config_fn(self.address)))
        port = self.address.rsplit(":", 1)[1]
        try:
            subprocess.run([RAY, "start", "--head", f"--port={port}", f"--num-cpus={self.head_cpus}",
                            "--num-gpus=0", f"--autoscaling-config={config}", f"--temp-dir={self.temp}",
                            "--include-dashboard=false", "--object-store-memory=100000000", "--disable-usage-stats"],
                           env=self.env, check=True, capture_output=True, text=True, timeout=120, cwd=REPO)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def pids(self) -> list[int]:
        """Every live process of this cluster: its Ray folder is on the command line or in the environment (the head's
        and each node's Ray processes), and every process under one of them (the workers a raylet starts)."""
        mark = str(self.temp).encode()
        parents, roots = {}, set()
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit() and int(proc.name) != os.getpid():
                pid = int(proc.name)
                parents[pid] = _parent(pid)
                try:
                    if mark in (proc / "cmdline").read_bytes() or mark in (proc / "environ").read_bytes():
                        roots.add(pid)
                except OSError:  # ended meanwhile, or not ours to read
                    continue
        return sorted(_descendants(roots, parents))

    def raylet_of(self, node_id: str) -> int:
        """The pid of the raylet of worker node `node_id` (the fake provider names its nodes by that id)."""
        for pid in self.pids():
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes()
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"raylet" in cmdline.split(b"\0")[0] and f"RAY_OVERRIDE_NODE_ID_FOR_TESTING={node_id}".encode() in \
                    environ:
                return pid
        raise LookupError(f"no raylet of node {node_id} under {self.temp}")

    def kill_node(self, node_id: str) -> list[int]:
        """A spot worker preempted: SIGKILL to the raylet of node `node_id` and every process under it (its workers
        and agents) at once; returns their pids."""
        parents = {int(p.name): _parent(int(p.name)) for p in Path("/proc").iterdir() if p.name.isdigit()}
        doomed = _descendants({self.raylet_of(node_id)}, parents)
        for pid in doomed:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return sorted(doomed)

    def stop(self) -> None:
        """SIGTERM to every process of the cluster, SIGKILL to what is left after 10 s; then the folder."""
        for signum, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            for pid in self.pids():
                try:
                    os.kill(pid, signum)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + wait
            while self.pids() and time.monotonic() < deadline:
                time.sleep(0.2)
        shutil.rmtree(self.temp, ignore_errors=True)


def _descendants(roots: set[int], parents: dict[int, int]) -> set[int]:
    """`roots` and every process under them, from a {pid: parent pid} table."""
    found, grew = set(roots), True
    while grew:
        more = {pid for pid, parent in parents.items() if parent in found} - found
        found |= more
        grew = bool(more)
    return found


def _parent(pid: int) -> int:
    try:  # field 4 of /proc/PID/stat, after the command name in parentheses
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]
