"""Is the newest successful pipeline run still current? The check behind scheduled (nightly) retraining.

A pipeline run that completes every stage marks the MLflow run of the LoRA it leaves behind (`mark_current`) with
the dataset's DVC hash and a hash of the params it ran with. A scheduled run compares today's dataset and params
with those of the newest marked run (`check`): equal means up to date and nothing runs; otherwise the pipeline
runs and DVC redoes only the stages whose inputs changed, the encoders' stores keeping every unchanged image and
caption.

The marks are the flow's own tags rather than the tags and params train logs, because a run is only current once
validate and publish also ran, and a stage DVC skips logs nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from . import params_table, tracking
from .config import PARAMS_FILE, Params, load_params, parse_params, read_raw_params

log = logging.getLogger(__name__)

DATASET_TAG = "pipeline.dataset_dvc_hash"
PARAMS_TAG = "pipeline.params_hash"
COMPLETED_TAG = "pipeline.completed_at"  # ISO time of the flow run that marked it, UTC


def compared_params(params_path: Path) -> dict[str, Any]:
    """The params a scheduled run compares: every key that computes a stage or publishes
    (flux2lora.params_table), with its validated value; keys that only change how stages run are left out. Paths
    stay as written, so moving the project does not look like a change."""
    params = parse_params(read_raw_params(params_path), source=str(params_path))
    return params_table.compared(params)


def params_hash(params_path: Path) -> str:
    """A short hash of `compared_params`."""
    text = json.dumps(compared_params(params_path), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def dataset_hash(root: Path, params: Params) -> str:
    """The DVC hash (`<md5>.dir`, as dvc.lock and `dvc add` write it) of the image folder as it is now; with edit
    training, the reference folders' hashes follow, joined by '+'."""
    from dvc.repo import Repo
    from dvc_data.hashfile.build import build

    # prepare.data_root holds every dataset and conditioning folder (prepare enforces it): it is what DVC watches
    folders = [params.prepare.data_root]
    hashes = []
    with Repo(str(root)) as repo:
        for folder in folders:
            path = (root / folder).resolve()
            if not path.is_dir():
                raise FileNotFoundError(f"dataset folder {path} does not exist (prepare.data_root)")
            # dry_run: hash only, nothing is copied into the DVC cache
            _, _, obj = build(repo.cache.local, str(path), repo.fs, "md5", ignore=repo.dvcignore, dry_run=True)
            hashes.append(obj.hash_info.value)
    return "+".join(hashes)


@dataclass
class Freshness:
    """Today's dataset and params against the newest successful run's."""

    up_to_date: bool
    dataset_hash: str
    params_hash: str
    last_run_id: str | None = None
    last_completed_at: str | None = None
    reasons: list[str] = field(default_factory=list)  # why not up to date, one line each

    def summary(self) -> str:
        if self.up_to_date:
            return (f"up to date: dataset {self.dataset_hash} and params {self.params_hash} are those of MLflow run "
                    f"{self.last_run_id} (completed {self.last_completed_at})")
        return "retraining: " + "; ".join(self.reasons)


def last_successful_run(params: Params, root: Path):
    """The newest MLflow run (status FINISHED) that a completed pipeline marked, or None."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking.tracking_uri(params, root))
    experiment = client.get_experiment_by_name(params.tracking.experiment_name)
    if experiment is None:
        return None
    runs = client.search_runs([experiment.experiment_id],
                              filter_string=f"attributes.status = 'FINISHED' and tags.`{PARAMS_TAG}` LIKE '%'",
                              order_by=[f"tags.`{COMPLETED_TAG}` DESC"], max_results=1)
    return runs[0] if runs else None


def _changed_keys(run, params_path: Path) -> list[str]:
    """Best effort: the compared keys whose value differs from the params train logged on `run`."""
    from mlflow.tracking import MlflowClient

    from .tracking import logged_params, tracking_uri

    params = load_params(params_path)
    logged = logged_params(MlflowClient(tracking_uri=tracking_uri(params, params_path.parent)), run)
    flat = params.flat()
    return sorted(key for key, value in flat.items() if params_table.kind_of(key) != params_table.RUNS
                  and key in logged and logged[key] != ("" if value is None else str(value)))


def check(root: Path, params_path: Path | None = None) -> Freshness:
    """Compare the dataset's DVC hash and the params with the newest successful run's marks."""
    params_path = Path(params_path or root / PARAMS_FILE)
    params = load_params(params_path)
    now = Freshness(up_to_date=False, dataset_hash=dataset_hash(root, params), params_hash=params_hash(params_path))
    run = last_successful_run(params, root)
    if run is None:
        now.reasons.append(f"no successful run in MLflow experiment {params.tracking.experiment_name!r} yet")
        return now
    tags = run.data.tags
    now.last_run_id, now.last_completed_at = run.info.run_id, tags.get(COMPLETED_TAG)
    if tags.get(DATASET_TAG) != now.dataset_hash:
        now.reasons.append(f"dataset changed: {tags.get(DATASET_TAG)} -> {now.dataset_hash}")
    if tags.get(PARAMS_TAG) != now.params_hash:
        keys = _changed_keys(run, params_path)
        now.reasons.append(f"params changed: {tags.get(PARAMS_TAG)} -> {now.params_hash}"
                           + (f" ({', '.join(keys)})" if keys else ""))
    now.up_to_date = not now.reasons
    return now


def mark_current(root: Path, run_id: str, params_path: Path | None = None) -> dict[str, str]:
    """Tag `run_id` as the result of a completed pipeline on today's dataset and params; returns the tags."""
    from mlflow.tracking import MlflowClient

    params_path = Path(params_path or root / PARAMS_FILE)
    params = load_params(params_path)
    tags = {DATASET_TAG: dataset_hash(root, params), PARAMS_TAG: params_hash(params_path),
            COMPLETED_TAG: datetime.now(timezone.utc).isoformat(timespec="seconds")}
    client = MlflowClient(tracking_uri=tracking.tracking_uri(params, root))
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
    log.info("MLflow run %s is current for dataset %s, params %s", run_id, tags[DATASET_TAG], tags[PARAMS_TAG])
    return tags
