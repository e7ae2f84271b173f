"""(d) ray_cluster.yaml checked offline with Ray's own cluster-config validation (no cloud calls, no boto3): the AWS
config and the on-prem `local` variant in its comments pass; broken copies are rejected."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

CLUSTER_YAML = Path(__file__).resolve().parents[2] / "ray_cluster.yaml"
ONPREM = re.compile(r"^# ----- on-prem variant.*?\n(.*?)^# ----- end of the on-prem variant", re.S | re.M)


def _validate(config: dict) -> dict:
    """What `ray up` does first, offline: merge the provider's defaults, then schema + semantic checks."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


@pytest.fixture(scope="module")
def aws() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_aws_config_is_valid_and_shaped_for_sweeps(aws):
    prepared = _validate(aws)
    nodes = prepared["available_node_types"]
    head = nodes[prepared["head_node_type"]]
    assert head["resources"] == {"CPU": 0} and head["max_workers"] == 0  # the head takes no trials
    gpu_types = [n for n in nodes.values() if n["resources"].get("GPU", 0) >= 1]
    assert gpu_types and all({"min_workers", "max_workers"} <= set(n) for n in gpu_types)
    assert any(n["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot" for n in gpu_types)
    assert prepared["idle_timeout_minutes"] > 0
    start = " ".join(prepared["head_start_ray_commands"])
    assert "--num-cpus=0" in start and "mlflow server" in start and "hostname -I" in start and "0.0.0.0" not in start
    setup = " ".join(prepared["setup_commands"])
    assert "pip install" in setup and "ready ||" in setup and "RAY_AUTH_MODE" in setup  # idempotent data, auth set


def test_onprem_variant_in_the_comments_is_valid():
    block = ONPREM.search(CLUSTER_YAML.read_text())
    assert block, "the on-prem variant block is missing from ray_cluster.yaml"
    text = "\n".join(line[2:] if line.startswith("# ") else line.lstrip("#") for line in block.group(1).splitlines())
    config = yaml.safe_load(text.split("\n\n", 1)[1])  # after the explanatory paragraph
    prepared = _validate(config)
    assert prepared["provider"]["type"] == "local" and len(prepared["provider"]["worker_ips"]) == 2


@pytest.mark.parametrize("breakage, error", [
    (lambda c: c.update(gpu_workers=3), jsonschema.ValidationError),  # unknown top-level key
    (lambda c: c.update(head_node_type="no_such_type"), ValueError),
    (lambda c: c["available_node_types"]["gpu_spot"].update(min_workers=9), ValueError),  # above the cluster max
    (lambda c: c["available_node_types"]["gpu_spot"]["resources"].update(GPU=0.5), jsonschema.ValidationError),
])
def test_broken_copies_are_rejected(aws, breakage, error):
    broken = copy.deepcopy(aws)
    breakage(broken)
    with pytest.raises(error):
        _validate(broken)
