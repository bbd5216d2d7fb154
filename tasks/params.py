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

from flux2lora.config import PARAMS_FILE, ParamsError, load_params, parse_params
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


def form_defaults(params_path: Path) -> dict[str, Any]:
    """The run form's defaults (the flow's parameters by name): the values of `params_path` (params.yaml), or the
    library's defaults where the file is missing or invalid. dataset "" stands for a params.yaml without a single
    `prepare.instance_data_dir` (a `datasets:` list)."""
    try:
        params = load_params(params_path)
    except (OSError, ParamsError):
        params = parse_params({}, source="flux2lora defaults")
    return {"flavour": params.model.model_flavour, "dataset": params.prepare.instance_data_dir or "",
            "steps": params.train.max_train_steps, "learning_rate": params.train.learning_rate,
            "lora_rank": params.train.lora_rank}


def refresh_form_defaults(project_dir: str) -> dict[str, Any]:
    """In a deployment's flow run, after the params stage: set the deployment's run form defaults (the `default`s of
    its parameter_openapi_schema) to params.yaml's current values, so that the next run from the form starts from
    what this run left (or what was edited and committed since `prefect deploy`), not from the values of deploy
    time, which the form would send and write back. Returns the defaults it changed ({} outside a deployment)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import DeploymentUpdate
    from prefect.runtime import deployment

    if not deployment.id:
        return {}
    defaults = form_defaults(Path(project_dir) / PARAMS_FILE)
    with get_client(sync_client=True) as client:
        schema = client.read_deployment(deployment.id).parameter_openapi_schema or {}
        properties = schema.get("properties") or {}
        changed = {name: value for name, value in defaults.items()
                   if name in properties and properties[name].get("default") != value}
        if changed:
            for name, value in changed.items():
                properties[name]["default"] = value
            client.update_deployment(deployment.id, DeploymentUpdate(parameter_openapi_schema=schema))
    return changed
