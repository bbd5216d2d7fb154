"""`flux2lora services`: refusing a taken port, reporting and cleaning stale state, MLflow's artifacts on S3, and
infra/docker-compose.yml giving the team the same settings as the local services.

The full local stack (Prefect server + worker + MLflow) is started and stopped by tests/test_e2e_servers.py.
"""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path

import pytest
import yaml

from flux2lora import services
from helpers import REPO, VENV_BIN, project_env
from servers import LOOPBACK, S3_TEST_ENV, http_ok, moto_server

FLUX2LORA = str(VENV_BIN / "flux2lora")
COMPOSE = REPO / "infra" / "docker-compose.yml"


def flux2lora_services(cwd: Path, *args: str, timeout: float = 300, **env) -> subprocess.CompletedProcess:
    return subprocess.run([FLUX2LORA, "services", *args], cwd=cwd, env=project_env(**env), capture_output=True,
                          text=True, timeout=timeout)


def test_up_refuses_a_port_in_use_and_starts_nothing(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind((LOOPBACK, 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = flux2lora_services(tmp_path, "up", "--only", "prefect", "--prefect-port", str(port))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"port {port} on {LOOPBACK} is in use" in proc.stderr and "--prefect-port 0" in proc.stderr
    assert not (tmp_path / ".services" / "state.json").exists()


def test_status_and_down_without_services(tmp_path: Path) -> None:
    status = flux2lora_services(tmp_path, "status")
    assert status.returncode == 3 and "no services recorded" in status.stdout
    down = flux2lora_services(tmp_path, "down")
    assert down.returncode == 0 and "nothing was running" in down.stdout


def test_stale_state_is_reported_and_cleared(tmp_path: Path) -> None:
    """A state file whose processes are gone (machine rebooted, killed by hand): status says not running, down
    clears it, and a pid reused by another process is never signalled."""
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        folder = tmp_path / ".services"
        folder.mkdir()
        (folder / "state.json").write_text(json.dumps({"project": str(tmp_path), "services": {"mlflow": {
            "name": "mlflow", "pid": sleeper.pid, "create_time": 1.0,  # not the sleeper's start time
            "url": "http://127.0.0.1:9", "health_url": "http://127.0.0.1:9/health", "log": str(folder / "x.log"),
            "cmd": ["mlflow", "server"], "port": 9, "extra": {}}}}))
        status = flux2lora_services(tmp_path, "status")
        assert status.returncode == 1 and "not running" in status.stdout, status.stdout
        down = flux2lora_services(tmp_path, "down")
        assert "nothing was running" in down.stdout, down.stdout
        assert sleeper.poll() is None, "down signalled a process that is not a service"
        assert not (folder / "state.json").exists()
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.mark.slow
def test_mlflow_service_keeps_artifacts_on_s3(tmp_path: Path) -> None:
    """`services up --only mlflow --mlflow-artifacts s3://...`: a client logs through the server, the file lands in
    the bucket (moto on loopback standing in for MinIO), the server serves it back; `down` stops it."""
    import boto3
    from mlflow import MlflowClient

    with moto_server(buckets=("flux2lora",)) as endpoint:
        up = flux2lora_services(tmp_path, "up", "--only", "mlflow", "--mlflow-port", "0", "--mlflow-artifacts",
                                "s3://flux2lora/mlflow", "--s3-endpoint-url", endpoint, **S3_TEST_ENV)
        try:
            assert up.returncode == 0, up.stdout + up.stderr
            url = services.read_state(tmp_path / ".services")["mlflow"].url
            assert f"export MLFLOW_TRACKING_URI={url}" in up.stdout and "PREFECT_API_URL" not in up.stdout
            client = MlflowClient(tracking_uri=url)
            experiment = client.create_experiment("s3-artifacts")
            run = client.create_run(experiment)
            (tmp_path / "lora.safetensors").write_bytes(b"weights")
            client.log_artifact(run.info.run_id, str(tmp_path / "lora.safetensors"), artifact_path="lora")

            s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing",
                              aws_secret_access_key="testing", region_name="us-east-1")
            keys = [o["Key"] for o in s3.list_objects_v2(Bucket="flux2lora", Prefix="mlflow/")["Contents"]]
            assert keys == [f"mlflow/{experiment}/{run.info.run_id}/artifacts/lora/lora.safetensors"], keys
            back = client.download_artifacts(run.info.run_id, "lora/lora.safetensors", str(tmp_path / "back"))
            assert Path(back).read_bytes() == b"weights"
        finally:
            down = flux2lora_services(tmp_path, "down")
        assert "stopped: mlflow" in down.stdout, down.stdout + down.stderr
        assert not http_ok(f"{url}/health", timeout=1)



# --- a lean MLflow server ----------------------------------------------------------------------------------------

JOB_PROCESSES = ("mlflow.server.jobs", "huey_consumer")  # MLflow's job runner and its huey consumers


def job_processes(pid: int, watch: float = 14.0, until_found: bool = False) -> list[str]:
    """Command lines of MLflow job processes under `pid`, watched for `watch` seconds: the job runner starts with
    the server, its huey consumers about 10 s later. until_found: stop at the first one seen (a positive control
    need not wait for, and pay the CPU of, the consumers)."""
    import time

    import psutil

    seen: set[str] = set()
    deadline = time.monotonic() + watch
    while time.monotonic() < deadline:
        for child in psutil.Process(pid).children(recursive=True):
            try:
                line = " ".join(child.cmdline())
            except psutil.Error:
                continue
            if any(marker in line for marker in JOB_PROCESSES):
                seen.add(line)
        if seen and until_found:
            break
        time.sleep(1)
    return sorted(seen)


@pytest.mark.slow
def test_mlflow_service_runs_without_job_execution(tmp_path: Path) -> None:
    """`services up` starts MLflow without its job runner and huey consumers (nothing of this project submits MLflow
    jobs); exporting MLFLOW_SERVER_ENABLE_JOB_EXECUTION=true brings them back, which also shows the check sees them."""
    for exported, expect_jobs in ((None, False), ("true", True)):
        env = {} if exported is None else {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": exported}
        folder = tmp_path / f"jobs-{exported}"
        folder.mkdir()
        up = flux2lora_services(folder, "up", "--only", "mlflow", "--mlflow-port", "0", **env)
        try:
            assert up.returncode == 0, up.stdout + up.stderr
            service = services.read_state(folder / ".services")["mlflow"]
            assert http_ok(f"{service.url}/health")
            jobs = job_processes(service.pid, until_found=expect_jobs)
            assert bool(jobs) == expect_jobs, (exported, jobs)
        finally:
            flux2lora_services(folder, "down")


@pytest.mark.slow
def test_readme_mlflow_ui_command_runs_without_job_execution(tmp_path: Path) -> None:
    """The README's `mlflow ui` command, as written (the venv and $PWD filled in, a free port added): one web worker
    and no job processes."""
    import shlex

    import psutil

    from servers import background, free_port

    line = next(li for li in (REPO / "README.md").read_text().splitlines() if "mlflow ui " in li and
                li.startswith("MLFLOW_"))
    words = shlex.split(line.replace(".venv/bin/", f"{VENV_BIN}/").replace("$PWD", str(tmp_path)))
    env = dict(w.split("=", 1) for w in words if "=" in w and not w.startswith("-") and w.split("=")[0].isupper())
    cmd = [w for w in words if w.split("=")[0] not in env]
    assert env == {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"} and cmd[0].endswith("/mlflow"), line
    url = f"http://{LOOPBACK}:{(port := free_port())}"
    with background("mlflow ui", [*cmd, "--port", str(port)], cwd=tmp_path, env=project_env(**env),
                    log=tmp_path / "mlflow.log") as server:
        server.wait_until(lambda: http_ok(f"{url}/health"), 120, f"{url}/health")
        assert job_processes(server.proc.pid) == []
        workers = [c for c in psutil.Process(server.proc.pid).children(recursive=True)
                   if "multiprocessing.spawn" in " ".join(c.cmdline())]
        assert len(workers) <= 1, [c.cmdline() for c in workers]

# --- the team setup ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def published(service: dict) -> list[str]:
    """"HOST_PORT:CONTAINER_PORT" of each published port (the bind address left out)."""
    return [":".join(str(p).split(":")[-2:]) for p in service.get("ports", [])]


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    return dict(e.split("=", 1) for e in env) if isinstance(env, list) else {k: str(v) for k, v in env.items()}


def test_compose_has_the_team_services_with_health_checks(compose: dict) -> None:
    stack = compose["services"]
    assert {"postgres", "minio", "minio-buckets", "mlflow", "prefect-server", "prefect-worker"} <= set(stack)
    for name in ("postgres", "minio", "mlflow", "prefect-server"):
        assert "test" in stack[name].get("healthcheck", {}), f"{name} has no health check"
    for name, needs in {"mlflow": {"postgres", "minio-buckets"}, "prefect-server": {"postgres"},
                        "prefect-worker": {"prefect-server", "mlflow"}}.items():
        assert needs <= set(stack[name]["depends_on"]), (name, stack[name]["depends_on"])


def test_compose_uses_the_settings_of_the_local_services(compose: dict) -> None:
    """Same ports, work pool, MLflow artifact proxying (to MinIO's bucket, as .dvc/config's s3 remote), and the
    worker's flow runs pointed at the tracking server, as `flux2lora services up` does on loopback."""
    stack = compose["services"]
    assert f"{services.PREFECT_PORT}:4200" in published(stack["prefect-server"])
    assert f"{services.MLFLOW_PORT}:5000" in published(stack["mlflow"])
    assert "9000:9000" in published(stack["minio"])  # .dvc/config's endpointurl

    mlflow_cmd = " ".join(stack["mlflow"]["command"])
    assert "--backend-store-uri postgresql://" in mlflow_cmd
    assert "--artifacts-destination s3://flux2lora/mlflow" in mlflow_cmd
    assert environment(stack["mlflow"])["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert environment(stack["mlflow"])["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"  # as services up
    assert environment(stack["prefect-server"])["PREFECT_API_DATABASE_CONNECTION_URL"].startswith(
        "postgresql+asyncpg://")

    worker_cmd = " ".join(stack["prefect-worker"]["command"])
    prefect_yaml = yaml.safe_load((REPO / "prefect.yaml").read_text())
    pool = prefect_yaml["deployments"][0]["work_pool"]["name"]
    assert pool == services.WORK_POOL and f"--pool {pool}" in worker_cmd and "--type process" in worker_cmd
    worker_env = environment(stack["prefect-worker"])
    assert worker_env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert worker_env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"

    dvc_config = (REPO / ".dvc" / "config").read_text()
    assert "url = s3://flux2lora/dvc" in dvc_config and "endpointurl = http://127.0.0.1:9000" in dvc_config
    buckets = " ".join(stack["minio-buckets"]["entrypoint"] if isinstance(stack["minio-buckets"]["entrypoint"], list)
                       else [stack["minio-buckets"]["entrypoint"]])
    assert "flux2lora" in buckets

