"""Around flux2lora.nightly: the up-to-date check (a task), and marking a completed run as current (done by the
flow itself once every stage has completed: a run's task runs are its stages)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from flux2lora import nightly, tracking
from flux2lora.config import PARAMS_FILE, load_params
from flux2lora.layout import layout_for

from .retries import RETRY


@task(name="up-to-date check", task_run_name="up-to-date check", cache_policy=NO_CACHE, **RETRY)
def check_training_current(project_dir: str) -> dict:
    """Compare the dataset's DVC hash and the params with the newest successful MLflow run's."""
    logger = get_run_logger()
    freshness = nightly.check(Path(project_dir))
    logger.info("%s", freshness.summary())
    return asdict(freshness)


def mark_run_current(project_dir: str, logger) -> dict:
    """Tag the MLflow run of the LoRA now in outputs/ as current for today's dataset and params; the flow calls it
    once every stage has completed."""
    root = Path(project_dir)
    params = load_params(root / PARAMS_FILE)
    run_id = tracking.read_run_id(layout_for(root, params.output_dir).run_file)
    tags = nightly.mark_current(root, run_id)
    logger.info("MLflow run %s is current for dataset %s and params %s", run_id, tags[nightly.DATASET_TAG],
                tags[nightly.PARAMS_TAG])
    return {"run_id": run_id, **tags}
