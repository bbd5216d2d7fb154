"""Credentials never leak: with a planted HF token and AWS keys in the worker's environment and an AWS session token
in a Prefect Secret block, a deployment run of flux2-lora/train (real Prefect server and process worker, publishing
to a real S3 API on loopback with those keys) leaves none of them in any file of the project (outputs, dvc.lock,
mlflow.db, mlartifacts), in MLflow's params, tags or registered models, in Prefect's logs, parameters, artifacts or
database, nor in the uploaded objects.
"""

from __future__ import annotations

import os
import re
import subprocess
import uuid
from pathlib import Path

import boto3
import pytest
from helpers import make_project
from servers import (PREFECT, PrefectAPI, api_get, api_post, moto_server, prefect_env, prefect_server,
                     prefect_worker)

pytestmark = pytest.mark.slow

POOL = "flux2lora-local"
BUCKET = "loras"
# distinctive values: any occurrence anywhere is a leak
PLANTED_ENV = {
    "HF_TOKEN": f"hf_planted{uuid.uuid4().hex}",
    "AWS_ACCESS_KEY_ID": f"AKIAPLANTED{uuid.uuid4().hex[:12].upper()}",
    "AWS_SECRET_ACCESS_KEY": f"planted-secret-{uuid.uuid4().hex}",
}
PLANTED_BLOCK = {"AWS_SESSION_TOKEN": f"planted-session-{uuid.uuid4().hex}"}
PLANTED = {**PLANTED_ENV, **PLANTED_BLOCK}


def _prefect(args: list[str], cwd: Path, env: dict, timeout: float) -> subprocess.CompletedProcess:
    proc = subprocess.run([PREFECT, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"prefect {' '.join(args)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def _save_secret_block(api_url: str, home: Path, name: str, value: str) -> None:
    from prefect.blocks.system import Secret
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api_url, PREFECT_HOME: str(home)}):
        Secret(value=value).save(name, overwrite=True)


def _all(api_url: str, path: str, body: dict | None = None, page: int = 200) -> list[dict]:
    items: list[dict] = []
    while True:
        batch = api_post(api_url, path, dict(body or {}, limit=page, offset=len(items)))
        items.extend(batch)
        if len(batch) < page:
            return items


def _leaks(text: str | bytes, where: str) -> list[str]:
    data = text if isinstance(text, bytes) else text.encode()
    return [f"{name} in {where}" for name, value in PLANTED.items() if value.encode() in data]


@pytest.fixture(scope="module")
def deployment_run(tmp_path_factory):
    """Deploy flux2-lora/train and run it through the worker with steps/learning-rate parameters; yields what the
    checks need once the run is COMPLETED."""
    base = tmp_path_factory.mktemp("secrets")
    home = base / "home"
    with prefect_server(home) as api_url, moto_server(buckets=(BUCKET,)) as s3_endpoint:
        project = make_project(base / "project", **{"publish.s3_uri": f"s3://{BUCKET}/flux2lora",
                                                     "publish.s3_endpoint_url": s3_endpoint})
        _save_secret_block(api_url, home, "aws-session-token", PLANTED_BLOCK["AWS_SESSION_TOKEN"])
        env = prefect_env(home, api_url, **PLANTED_ENV, AWS_DEFAULT_REGION="us-east-1",
                          AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull)
        for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "HF_HOME"):
            env.pop(name, None)
        _prefect(["work-pool", "create", POOL, "--type", "process"], cwd=base, env=env, timeout=120)
        worker_dir = base / "worker"
        worker_dir.mkdir()
        with prefect_worker(POOL, api_url, cwd=worker_dir, env=env, log=base / "worker.log") as worker:
            _prefect(["--no-prompt", "deploy", "-n", "train"], cwd=project, env=dict(env, PWD=str(project)),
                     timeout=180)
            proc = _prefect(["deployment", "run", "flux2-lora/train", "-p", "steps=12", "-p", "learning_rate=0.02",
                             "--watch", "--watch-timeout", "400"], cwd=project, env=env, timeout=450)
            flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", proc.stdout).group(1)
            api = PrefectAPI(api_url)
            state = api.flow_run(flow_run_id)["state"]
            assert state["type"] == "COMPLETED", f"{state}\n{worker.tail(8000)}"
            yield {"api": api, "flow_run_id": flow_run_id, "project": project, "home": home, "base": base,
                   "s3": s3_endpoint, "worker_log": worker.log}


def test_deployment_parameters_reach_params_and_s3_used_the_planted_keys(deployment_run):
    from flux2lora.config import load_params

    params = load_params(deployment_run["project"] / "params.yaml")
    assert params.train.max_train_steps == 12 and params.train.learning_rate == 0.02
    s3 = boto3.client("s3", endpoint_url=deployment_run["s3"], region_name="us-east-1",
                      aws_access_key_id=PLANTED_ENV["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=PLANTED_ENV["AWS_SECRET_ACCESS_KEY"])
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="flux2lora/").get("Contents", [])]
    assert any(k.endswith("pytorch_lora_weights.safetensors") for k in keys), keys
    messages = [r["message"] for r in deployment_run["api"].logs(deployment_run["flow_run_id"])]
    assert "AWS_SESSION_TOKEN: from Prefect Secret block 'aws-session-token'" in messages


def test_deployed_run_form_has_typed_described_parameters(deployment_run):
    deployment = api_get(deployment_run["api"].url, "deployments/name/flux2-lora/train")
    props = deployment["parameter_openapi_schema"]["properties"]
    assert "anyOf" not in props["flavour"]  # a plain choice in the form, no None/type toggle
    assert {"klein-4b", "klein-9b", "dev"} <= set(props["flavour"]["enum"])
    assert all(p.get("description") for p in props.values())


def test_no_planted_credential_anywhere(deployment_run):
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    project, api = deployment_run["project"], deployment_run["api"]
    leaks: list[str] = []

    # every file the run wrote or touched: outputs, dvc.lock, params.yaml, mlflow.db, mlartifacts, .dvc/cache
    files = [p for p in project.rglob("*") if p.is_file()]
    assert {"dvc.lock", "mlflow.db"} <= {p.name for p in files}
    assert any("mlartifacts" in p.parts for p in files) and any("outputs" in p.parts for p in files)
    # Prefect's database and logs, the worker's log
    files += [p for p in deployment_run["home"].rglob("*") if p.is_file()]
    files.append(deployment_run["worker_log"])
    for path in files:
        leaks += _leaks(path.read_bytes(), str(path))

    # MLflow, through its client: every run's params, tags and metric names, registered models and versions
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    for experiment in client.search_experiments(view_type=ViewType.ALL):
        for run in client.search_runs([experiment.experiment_id], run_view_type=ViewType.ALL):
            leaks += _leaks(repr(run.data.params), f"MLflow params of run {run.info.run_id}")
            leaks += _leaks(repr(run.data.tags), f"MLflow tags of run {run.info.run_id}")
            leaks += _leaks(repr(sorted(run.data.metrics)), f"MLflow metric names of run {run.info.run_id}")
    for model in client.search_registered_models():
        for version in client.search_model_versions(f"name='{model.name}'"):
            leaks += _leaks(repr(version.tags) + repr(version.source), f"registered model {model.name}")

    # Prefect, through its API: logs, flow and task runs (parameters, states), deployments, artifacts
    url = api.url
    leaks += _leaks(repr(_all(url, "logs/filter")), "Prefect logs")
    leaks += _leaks(repr(_all(url, "flow_runs/filter")), "Prefect flow runs")
    leaks += _leaks(repr(_all(url, "task_runs/filter")), "Prefect task runs")
    leaks += _leaks(repr(_all(url, "deployments/filter")), "Prefect deployments")
    artifacts = _all(url, "artifacts/filter")
    assert any(a["key"] == "flux2-lora-run" for a in artifacts)
    leaks += _leaks(repr(artifacts), "Prefect artifacts")

    # what was published to S3
    s3 = boto3.client("s3", endpoint_url=deployment_run["s3"], region_name="us-east-1",
                      aws_access_key_id="reader", aws_secret_access_key="reader")
    for obj in s3.list_objects_v2(Bucket=BUCKET).get("Contents", []):
        leaks += _leaks(s3.get_object(Bucket=BUCKET, Key=obj["Key"])["Body"].read(), f"s3://{BUCKET}/{obj['Key']}")

    assert not leaks, "planted credentials found:\n" + "\n".join(leaks)
