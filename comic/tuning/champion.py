"""The sweep's champion: the confirmed best configuration's model, registered in the MLflow Model Registry.

The confirmed best configuration is the one with the best mean `best/val/map` over its confirmation seeds (test
never selects); of its seeds, the run with the best `best/val/map` gives the model. Every confirmation trial logs
its model (`TrialJob.log_models`), so the champion's is already in MLflow; it becomes a new version of the
registered model with the alias `champion` and tags saying where it came from and how it scored.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

from comic.tracking.client import PARENT_TAG, RUN_NAME_TAG, RunTracker
from comic.tracking.model import DEFAULT_ALIAS, MODEL_URI_TAG, register_model
from comic.tracking.store import client, search_all_runs

log = logging.getLogger(__name__)

SELECT = "best/val/map"
REGISTERED_TAG = "registered_model"


def champion_cell(summary: Sequence[Mapping[str, Any]], ranks: Sequence[int],
                  metrics: Sequence[Mapping[str, float]]) -> int | None:
    """Index of the champion's cell: the rank with the best mean `best/val/map`, then its seed with the best
    `best/val/map`; None when no confirmation cell finished."""
    done = [e for e in summary if e["n"] and math.isfinite(e[f"{SELECT}/mean"])]
    if not done:
        return None
    rank = max(done, key=lambda e: e[f"{SELECT}/mean"])["rank"]
    cells = [i for i, (r, m) in enumerate(zip(ranks, metrics, strict=True)) if r == rank and SELECT in m]
    return max(cells, key=lambda i: metrics[i][SELECT]) if cells else None


def register_champion(parent: RunTracker, experiment_id: str, run_name: str, metrics: Mapping[str, float],
                      name: str, sweep: str) -> str | None:
    """Register the model that the confirmation run `run_name` (a child of `parent`) logged as a new version of
    `name` with alias `champion`; returns `models:/name@champion`, or None (with a warning) when it logged none."""
    query = (f"tags.`{PARENT_TAG}` = '{parent.run_id}' and tags.`{RUN_NAME_TAG}` = '{run_name}' "
             "and attributes.status = 'FINISHED'")
    runs = [r for r in search_all_runs(client(parent.tracking_uri), [experiment_id], query)
            if MODEL_URI_TAG in r.data.tags]
    if not runs:
        log.warning("confirmation run %s logged no model: nothing registered as %s", run_name, name)
        return None
    run = max(runs, key=lambda r: r.info.start_time)
    tags = {"sweep": sweep, "sweep_run_id": parent.run_id, "source_run_id": run.info.run_id,
            **{key.replace("/", "_"): f"{metrics[key]:.4f}" for key in (SELECT, "best/test/map") if key in metrics}}
    registered = register_model(parent.tracking_uri, run.data.tags[MODEL_URI_TAG], name, DEFAULT_ALIAS, tags)
    parent.set_tags({REGISTERED_TAG: registered})
    return registered
