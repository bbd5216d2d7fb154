"""Run parameters into params.yaml, so that dvc.lock stays the truth.

A flow run's parameters (flavour, dataset, steps, ...) are written into the project's params.yaml before any stage
runs: validated first (an invalid value changes nothing), comments and order kept, the change logged as a diff.
The stages, `dvc repro` and dvc.lock then all see the same values, and the change is there to commit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from flux2lora.config import PARAMS_FILE
from flux2lora.params_file import write_overrides  # also `flux2lora train --set`

from .retries import RETRY


@task(name="params", task_run_name="params", cache_policy=NO_CACHE, **RETRY)
def apply_run_parameters(project_dir: str, overrides: dict[str, Any]) -> str:
    """Write the flow run's parameters into params.yaml (validated); returns the diff."""
    logger = get_run_logger()
    path = Path(project_dir) / PARAMS_FILE
    diff = write_overrides(path, overrides)
    if diff:
        logger.info("params.yaml updated with this run's parameters (commit it to keep the run reproducible):\n%s",
                    diff)
    else:
        logger.info("params.yaml already holds this run's parameters")
    return diff
