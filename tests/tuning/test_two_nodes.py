"""(c) A real two-node Ray cluster on one machine: trials land on both nodes when the storage is flagged as shared,
and a plain local storage path is refused with a message saying what to use instead.

Shuts the session's local Ray instance down first: two Ray clusters at once would fight over 2 cores. The next test
that asks for `ray_local` starts it again.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow import MlflowClient

from comic.config import load_config
from comic.tracking.store import LogTarget
from comic.tuning.cluster import Resources, TuneError
from comic.tuning.runner import run_configs

pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated:DeprecationWarning")
MB = 2**20


@pytest.fixture
def two_nodes():
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 100 * MB,
                                                            "include_dashboard": False})
    cluster.add_node(num_cpus=1, object_store_memory=100 * MB)
    try:
        ray.init(address=cluster.address, logging_level="WARNING")
        cluster.wait_for_nodes()
        yield {node["NodeID"] for node in ray.nodes() if node["Alive"]}
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.mark.ray
def test_trials_spread_over_two_nodes_with_shared_storage(two_nodes, smoke_overrides, tmp_path: Path):
    assert len(two_nodes) == 2
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    configs = [load_config("synthetic", smoke_overrides | {"seed": s}) for s in (0, 1)]
    common = {"names": ["seed0", "seed1"], "storage_path": str(tmp_path / "rr"),
              "log_to": LogTarget.at(uri, "two-nodes"), "resources": Resources(1, 0, 2)}
    with pytest.raises(TuneError, match="2 nodes") as refused:
        run_configs(configs, name="refused", **common)
    assert "s3://" in str(refused.value) and "--shared-storage" in str(refused.value)
    assert not (tmp_path / "rr" / "refused").exists()  # refused before Tune wrote anything
    metrics = run_configs(configs, name="spread", shared_storage=True, **common)
    assert [m["epoch"] for m in metrics] == [2, 2]
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("two-nodes").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["seed0", "seed1"]
    assert {r.data.tags["ray.node_id"] for r in runs} == two_nodes  # one trial on each node
    assert {r.info.status for r in runs} == {"FINISHED"}
