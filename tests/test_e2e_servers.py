"""End to end with real processes on loopback, started the way a user starts them: `flux2lora services up` (Prefect
server, process worker, MLflow tracking server), `prefect deploy`, `prefect deployment run flux2-lora/train` on the
tiny model, then MLflow's HTTP API must show the run's metrics, validation images, the LoRA artifact and a registry
version; `flux2lora services down` stops every process.

One stack serves the module; the tests run in order (up -> run -> down).
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers import VENV_BIN, make_project
from servers import PREFECT, LOOPBACK, PrefectAPI, api_get, api_post, http_ok, log_tail, prefect_env

from flux2lora.tracking import EVAL_LOSS_METRIC, GRID_IMAGE_KEY, LOSS_METRIC

pytestmark = pytest.mark.slow

FLUX2LORA = str(VENV_BIN / "flux2lora")
DEPLOYMENT = "flux2-lora/train"
LORA = Path("outputs/lora/pytorch_lora_weights.safetensors")
STEPS = 12


@dataclass
class Stack:
    project: Path
    env: dict  # for CLI calls: PREFECT_API_URL / MLFLOW_TRACKING_URI from `services up`, own PREFECT_HOME
    prefect_api: str
    mlflow: str
    up_output: str

    def logs(self) -> str:
        """The services' log tails, for failure messages."""
        return "\n".join(f"--- {p.name} ---\n{log_tail(p, 4000)}"
                         for p in sorted((self.project / ".services" / "logs").glob("*.log")))


def services(project: Path, *args: str, env: dict, timeout: float = 300, check: bool = True):
    proc = subprocess.run([FLUX2LORA, "services", *args], cwd=project, env=env, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"flux2lora services {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n"
                             f"{proc.stderr}")
    return proc


def recorded_pids(project: Path) -> dict[str, int]:
    state = project / ".services" / "state.json"
    if not state.exists():
        return {}
    return {name: s["pid"] for name, s in json.loads(state.read_text())["services"].items()}


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Stack:
    """`flux2lora services up` on free ports in a fresh project; whatever happens, `services down` at the end and
    every recorded process group killed if it survived that."""
    import psutil

    base = tmp_path_factory.mktemp("e2e")
    project = make_project(base / "project", **{"train.max_train_steps": STEPS})
    env = prefect_env(base / "cli-home", PREFECT_WORKER_QUERY_SECONDS="2")
    pids: dict[str, int] = {}
    try:
        up = services(project, "up", "--prefect-port", "0", "--mlflow-port", "0", "--timeout", "240", env=env,
                      timeout=400)
        pids = recorded_pids(project)
        exports = dict(re.findall(r"^export (\w+)=(\S+)$", up.stdout, re.M))
        assert set(exports) == {"PREFECT_API_URL", "MLFLOW_TRACKING_URI"}, up.stdout
        yield Stack(project, dict(env, **exports), exports["PREFECT_API_URL"], exports["MLFLOW_TRACKING_URI"],
                    up.stdout)
    finally:
        pids = pids or recorded_pids(project)
        services(project, "down", env=env, timeout=120, check=False)
        for pid in pids.values():  # safety net: a failed `down` must not leave servers behind
            try:
                for child in psutil.Process(pid).children(recursive=True):
                    child.kill()
                psutil.Process(pid).kill()
            except psutil.Error:
                pass


# --- MLflow's REST API -----------------------------------------------------------------------------------------


def mlflow_get(base: str, endpoint: str, **query):
    return api_get(base, f"api/2.0/mlflow/{endpoint}?{urllib.parse.urlencode(query)}")


def artifact_paths(base: str, run_id: str, path: str = "") -> list[str]:
    """Every artifact file of a run, listed over HTTP, recursively."""
    out = []
    for entry in mlflow_get(base, "artifacts/list", run_id=run_id, path=path).get("files", []):
        out += artifact_paths(base, run_id, entry["path"]) if entry["is_dir"] else [entry["path"]]
    return out


def download(base: str, run_id: str, path: str) -> bytes:
    url = f"{base}/get-artifact?{urllib.parse.urlencode({'path': path, 'run_uuid': run_id})}"
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read()


# --- tests -----------------------------------------------------------------------------------------------------


def test_services_up_starts_healthy_services_on_loopback(stack: Stack) -> None:
    """Three processes recorded with pids and logs, each healthy, on 127.0.0.1; the env exports are in .services/env
    and `services status` says healthy; a second `up` finds them running and starts nothing."""
    folder = stack.project / ".services"
    pids = recorded_pids(stack.project)
    assert sorted(pids) == ["mlflow", "prefect-server", "prefect-worker"]
    assert stack.prefect_api.startswith(f"http://{LOOPBACK}:") and stack.mlflow.startswith(f"http://{LOOPBACK}:")
    assert http_ok(f"{stack.prefect_api}/health") and http_ok(f"{stack.mlflow}/health")
    assert f"export PREFECT_API_URL={stack.prefect_api}" in (folder / "env").read_text()
    assert f"export MLFLOW_TRACKING_URI={stack.mlflow}" in (folder / "env").read_text()
    for name in pids:
        assert (folder / "logs" / f"{name}.log").stat().st_size > 0, name

    status = services(stack.project, "status", env=stack.env).stdout
    assert len(re.findall(r"^\S+\s+healthy\s", status, re.M)) == 3, status
    again = services(stack.project, "up", "--prefect-port", "0", "--mlflow-port", "0", env=stack.env)
    assert recorded_pids(stack.project) == pids, again.stdout
    # the worker runs flows with the tracking server's address
    workers = PrefectAPI(stack.prefect_api)._all("work_pools/flux2lora-local/workers/filter", {})
    assert [w["status"] for w in workers] == ["ONLINE"], workers


def test_deployment_run_is_tracked_on_the_mlflow_server(stack: Stack) -> None:
    """`prefect deploy` + `prefect deployment run flux2-lora/train --watch` completes in the worker; over MLflow's
    HTTP API the run has the loss per step, validation images, the LoRA file (byte-identical) and a registered
    version with alias `candidate`."""
    project = stack.project
    cli = dict(stack.env, PWD=str(project))
    try:
        subprocess.run([PREFECT, "--no-prompt", "deploy", "-n", "train"], cwd=project, env=cli, check=True,
                       capture_output=True, text=True, timeout=240)
        started = time.monotonic()
        proc = subprocess.run([PREFECT, "deployment", "run", DEPLOYMENT, "--watch", "--watch-timeout", "400"],
                              cwd=project, env=cli, capture_output=True, text=True, timeout=450)
    except subprocess.SubprocessError as exc:
        raise AssertionError(f"{exc}\n{getattr(exc, 'stdout', '')}\n{getattr(exc, 'stderr', '')}\n"
                             f"{stack.logs()}") from None
    print(f"\ndeployment run: {time.monotonic() - started:.0f}s")
    flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", proc.stdout)
    assert proc.returncode == 0 and flow_run_id, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}\n{stack.logs()}"
    prefect_run = PrefectAPI(stack.prefect_api).flow_run(flow_run_id.group(1))
    assert prefect_run["state"]["type"] == "COMPLETED", prefect_run["state"]

    run_file = json.loads((project / "outputs/train/mlflow_run.json").read_text())
    run_id = run_file["run_id"]
    base = stack.mlflow
    experiment = mlflow_get(base, "experiments/get-by-name", experiment_name="flux2-lora")["experiment"]
    # created through the server (a local sqlite store would have given it a file: location)
    assert experiment["artifact_location"].startswith("mlflow-artifacts:"), experiment
    mlflow_run = mlflow_get(base, "runs/get", run_id=run_id)["run"]
    assert mlflow_run["info"]["status"] == "FINISHED" and mlflow_run["info"]["experiment_id"] == \
        experiment["experiment_id"]
    assert {m["key"] for m in mlflow_run["data"]["metrics"]} >= {LOSS_METRIC, EVAL_LOSS_METRIC, "learning_rate",
                                                                 "grad_norm", "final_loss"}
    history = mlflow_get(base, "metrics/get-history", run_id=run_id, metric_key=LOSS_METRIC,
                         max_results=1000)["metrics"]

    # one name on both pages, and each links the other: the MLflow run's tags the flow run, the flow run's link
    # artifact the MLflow run's Model metrics page (on the machine-learning pages of MLflow 3's UI)
    assert prefect_run["name"] == mlflow_run["info"]["run_name"] == run_file["run_name"], prefect_run["name"]
    tags = {t["key"]: t["value"] for t in mlflow_run["data"]["tags"]}
    assert tags["prefect.flow_run.id"] == prefect_run["id"] and tags["prefect.flow_run.name"] == prefect_run["name"]
    assert tags["prefect.flow_run.url"].endswith(f"/flow-runs/flow-run/{prefect_run['id']}"), tags
    links = api_post(stack.prefect_api, "artifacts/filter",
                     {"artifacts": {"flow_run_id": {"any_": [prefect_run["id"]]}, "key": {"any_": ["mlflow-run"]}}})
    page = (f"{base}/#/experiments/{experiment['experiment_id']}/runs/{run_id}/model-metrics"
            "?workflowType=machine_learning")
    assert len(links) == 1 and f"]({page})" in links[0]["data"], links  # Prefect's link artifact: markdown [text](url)
    assert sorted(m["step"] for m in history) == list(range(1, STEPS + 1))

    artifacts = artifact_paths(base, run_id)
    images = [p for p in artifacts if p.startswith("images/")]
    assert any(p.startswith(f"images/{GRID_IMAGE_KEY.replace('/', '~')}+step+") for p in images), artifacts
    assert "validation/grid.png" in artifacts, artifacts
    assert download(base, run_id, "validation/grid.png")[:8] == b"\x89PNG\r\n\x1a\n"
    lora = (project / LORA).read_bytes()
    assert download(base, run_id, f"lora/{LORA.name}") == lora
    assert f"publish/{LORA.name}" in artifacts, artifacts

    versions = mlflow_get(base, "model-versions/search", filter=f"run_id='{run_id}'")["model_versions"]
    assert [v["name"] for v in versions] == ["flux2-lora"], versions
    tags = {t["key"]: t["value"] for t in versions[0].get("tags", [])}
    # the published copy: train's file plus the trigger phrase, which publish alone writes into its metadata
    published = (project / "outputs/publish" / LORA.name).read_bytes()
    assert tags.get("lora_sha256") == hashlib.sha256(published).hexdigest(), tags
    candidate = mlflow_get(base, "registered-models/alias", name="flux2-lora", alias="candidate")["model_version"]
    assert candidate["version"] == versions[0]["version"] and candidate["run_id"] == run_id


def test_services_down_stops_every_process(stack: Stack) -> None:
    """`services down` ends the worker, both servers and all their children; the ports close, `status` reports
    nothing, the logs stay."""
    import psutil

    pids = recorded_pids(stack.project)
    family = []
    for pid in pids.values():
        proc = psutil.Process(pid)
        family += [proc, *proc.children(recursive=True)]
    started = time.monotonic()
    down = services(stack.project, "down", env=stack.env, timeout=120)
    print(f"\nservices down: {time.monotonic() - started:.1f}s")
    assert "stopped: prefect-worker, prefect-server, mlflow" in down.stdout, down.stdout
    alive = [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, [(p.pid, p.cmdline()) for p in alive]
    assert not http_ok(f"{stack.prefect_api}/health", timeout=1) and not http_ok(f"{stack.mlflow}/health", timeout=1)
    status = services(stack.project, "status", env=stack.env, check=False)
    assert status.returncode == 3, status.stdout
    assert (stack.project / ".services" / "logs" / "mlflow.log").exists()
