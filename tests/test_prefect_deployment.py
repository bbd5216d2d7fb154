"""The Prefect deployment end to end: a real Prefect server and process worker on loopback, `prefect deploy` from a
project checkout, `prefect deployment run flux2-lora/train --watch`, and DVC agreeing with the flow both ways round.

One server and one worker serve the whole module; each test builds its own project and (re)deploys
`flux2-lora/train` from it before running it.
"""

from __future__ import annotations

import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from helpers import make_project, run
from servers import PREFECT, Background, PrefectAPI, api_get, api_post, prefect_env, prefect_server, prefect_worker

pytestmark = pytest.mark.slow

POOL = "flux2lora-local"
DEPLOYMENT = "flux2-lora/train"
STAGES = ["params", "prepare", "encode-text", "encode-latents", "train", "validate", "publish"]
LORA = Path("outputs/lora/pytorch_lora_weights.safetensors")
SKIPPED = "up to date according to dvc.lock"


@dataclass
class PrefectStack:
    api_url: str
    home: Path
    env: dict  # for prefect CLI calls: isolated PREFECT_HOME, PREFECT_API_URL
    api: PrefectAPI
    worker: Background

    def diagnostics(self, flow_run_id: str | None = None) -> str:
        """Worker and server log tails (and the flow run's logs) to append to a failure message."""
        parts = [f"--- worker log ({self.worker.log}) ---\n{self.worker.tail(8000)}",
                 f"--- server log ---\n{(self.home / 'server.log').read_text(errors='replace')[-3000:]}"]
        if flow_run_id:
            try:
                lines = [f"{r.get('level')} {r['message']}" for r in self.api.logs(flow_run_id)]
                parts.append("--- flow run logs ---\n" + "\n".join(lines[-80:]))
            except Exception as exc:  # the server may be the problem
                parts.append(f"(flow run logs unavailable: {exc})")
        return "\n".join(parts)


@pytest.fixture(scope="module")
def prefect_stack(tmp_path_factory) -> PrefectStack:
    """A Prefect server (own PREFECT_HOME and sqlite database) and a process worker on pool flux2lora-local.

    The worker runs in a directory of its own, not in any project: the deployment's pull step has to take the flow
    run to the project it was deployed from."""
    base = tmp_path_factory.mktemp("prefect")
    home = base / "home"
    with prefect_server(home) as api_url:
        env = prefect_env(home, api_url)
        api = PrefectAPI(api_url)
        if not api.work_pool_exists(POOL):
            _prefect(["work-pool", "create", POOL, "--type", "process"], cwd=base, env=env, timeout=120)
        worker_dir = base / "worker"
        worker_dir.mkdir()
        with prefect_worker(POOL, api_url, cwd=worker_dir, env=env, log=base / "worker.log") as worker:
            yield PrefectStack(api_url, home, env, api, worker)


def _prefect(args: list[str], cwd: Path, env: dict, timeout: float, diagnostics=None) -> subprocess.CompletedProcess:
    """Run the prefect CLI; on failure (or timeout) raise with its output and, when given, diagnostics()."""
    try:
        proc = subprocess.run([PREFECT, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"prefect {' '.join(args)} timed out after {timeout}s:\n{exc.stdout}\n{exc.stderr}\n"
                             f"{diagnostics() if diagnostics else ''}") from None
    if proc.returncode != 0:
        raise AssertionError(f"prefect {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-4000:]}\n{diagnostics() if diagnostics else ''}")
    return proc


def deploy(stack: PrefectStack, project: Path, pwd: Path) -> None:
    """`prefect --no-prompt deploy -n train` from the project folder, with the PWD environment variable `pwd`."""
    _prefect(["--no-prompt", "deploy", "-n", "train"], cwd=project, env=dict(stack.env, PWD=str(pwd)), timeout=180)


def run_deployment(stack: PrefectStack, project: Path) -> str:
    """`prefect deployment run flux2-lora/train --watch`: returns the flow run id once it is COMPLETED."""
    proc = _prefect(["deployment", "run", DEPLOYMENT, "--watch", "--watch-timeout", "360"], cwd=project,
                    env=stack.env, timeout=420, diagnostics=stack.diagnostics)
    match = re.search(r"UUID: ([0-9a-f-]{36})", proc.stdout)
    assert match, f"no flow run id in:\n{proc.stdout}"
    flow_run_id = match.group(1)
    state = stack.api.flow_run(flow_run_id)["state"]
    assert state["type"] == "COMPLETED", f"flow run {flow_run_id} is {state}\n{stack.diagnostics(flow_run_id)}"
    return flow_run_id


def stage_logs(stack: PrefectStack, flow_run_id: str, expect: str, timeout: float = 60) -> dict[str, list[str]]:
    """Each task run's log messages by stage name, once every stage has a message containing `expect` (run logs are
    shipped to the API in batches, possibly after the run's final state)."""
    deadline = time.monotonic() + timeout
    while True:
        task_runs = stack.api.task_runs(flow_run_id)
        names = {tr["id"]: tr["name"] for tr in task_runs}
        by_stage: dict[str, list[str]] = {name: [] for name in names.values()}
        for record in stack.api.logs(flow_run_id):
            if record.get("task_run_id") in names:
                by_stage[names[record["task_run_id"]]].append(record["message"])
        missing = [s for s in STAGES if not any(expect in m for m in by_stage.get(s, []))]
        if not missing:
            assert sorted(by_stage) == sorted(STAGES), f"task runs: {sorted(by_stage)}"
            states = {tr["name"]: tr["state"]["type"] for tr in task_runs}
            assert set(states.values()) == {"COMPLETED"}, states
            return by_stage
        if time.monotonic() > deadline:
            raise AssertionError(f"no {expect!r} in the logs of {missing}; logs by stage: {by_stage}\n"
                                 f"{stack.diagnostics(flow_run_id)}")
        time.sleep(1)


def mlflow_runs(project: Path) -> int:
    """How many MLflow runs (any lifecycle state) the project's sqlite store holds."""
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    assert (project / "mlflow.db").exists(), "no mlflow.db in the project"
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    experiments = client.search_experiments(view_type=ViewType.ALL)
    return sum(len(client.search_runs([e.experiment_id], run_view_type=ViewType.ALL, max_results=10_000))
               for e in experiments)


def snapshot(project: Path) -> dict:
    """What a re-run would change: dvc.lock, the LoRA file's bytes and mtime, the MLflow run count."""
    lora = project / LORA
    return {"dvc.lock": (project / "dvc.lock").read_text(), "lora": (lora.read_bytes(), lora.stat().st_mtime_ns),
            "mlflow runs": mlflow_runs(project)}


def assert_dvc_up_to_date(project: Path) -> None:
    """dvc.lock records all six stages, `dvc status` is clean and `dvc repro` runs nothing."""
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert sorted(lock["stages"]) == sorted(STAGES)
    status = run(["dvc", "status"], project).stdout
    assert "Data and pipelines are up to date" in status, status
    repro = run(["dvc", "repro"], project, timeout=300)
    output = repro.stdout + repro.stderr
    assert "Running stage" not in output, output
    assert "Data and pipelines are up to date" in output, output
    for stage in STAGES:
        assert f"Stage '{stage}' didn't change, skipping" in output, output


def library_messages(messages: list[str]) -> list[str]:
    """A task run's messages less the task's own ("NAME: running", ...) and Prefect's ("Finished in state ...")."""
    own = (": running", ": done, recorded in dvc.lock", SKIPPED)
    return [m for m in messages if not any(o in m for o in own) and not m.startswith("Finished in state")]


def assert_all_skipped(stack: PrefectStack, flow_run_id: str) -> None:
    logs = stage_logs(stack, flow_run_id, SKIPPED)
    for stage, messages in logs.items():
        assert not any(m.endswith(": running") for m in messages), (stage, messages)
        assert not library_messages(messages), f"{stage} ran library code although skipped: {messages}"
    flow_logs = [r["message"] for r in stack.api.logs(flow_run_id) if not r.get("task_run_id")]
    assert any("ran nothing (everything up to date)" in m for m in flow_logs), flow_logs


def test_deployment_then_dvc(prefect_stack: PrefectStack, tmp_path: Path) -> None:
    """Deploy and run: all six stages run in the worker and land in dvc.lock, `dvc repro` then has nothing to do,
    and a second deployment run skips every stage without a new MLflow run."""
    stack = prefect_stack
    project = make_project(tmp_path / "project")
    started = time.monotonic()
    deploy(stack, project, pwd=project)

    first = run_deployment(stack, project)
    print(f"\nfirst deployment run {first}: {time.monotonic() - started:.0f}s")
    assert (project / LORA).is_file()
    logs = stage_logs(stack, first, "done, recorded in dvc.lock")
    for stage in ("prepare", "encode-latents", "train"):
        # the library's own `logging` records (flux2lora.*) reach the task run's log, each once
        library = library_messages(logs[stage])
        assert library, f"no flux2lora log records in the {stage} task run's log: {logs[stage]}"
        assert len(set(library)) == len(library), f"{stage}: library records forwarded twice: {library}"
    assert any("LoRA" in m for m in library_messages(logs["train"])), logs["train"]
    assert mlflow_runs(project) == 1

    assert_dvc_up_to_date(project)
    before = snapshot(project)

    started = time.monotonic()
    second = run_deployment(stack, project)
    print(f"second deployment run {second}: {time.monotonic() - started:.0f}s")
    assert_all_skipped(stack, second)
    assert snapshot(project) == before


def test_dvc_then_deployment(prefect_stack: PrefectStack, repro_project: Path) -> None:
    """The other way round: after `dvc repro` (conftest's demo project, this module's copy), a deployment run redoes
    nothing. Deployed with a stale PWD environment variable (as under `make -C` or subprocess(cwd=...)): the
    deployment must still point at the folder `prefect deploy` ran in."""
    stack = prefect_stack
    project = repro_project
    before = snapshot(project)
    assert before["mlflow runs"] == 1

    from tasks.params import form_defaults

    deploy(stack, project, pwd=stack.home)
    # the run form opens on params.yaml's values; made stale here (as by an edit of params.yaml after deploying),
    # a flow run sets them back to what params.yaml holds
    deployment = api_get(stack.api_url, f"deployments/name/{DEPLOYMENT}")
    schema = deployment["parameter_openapi_schema"]
    current = form_defaults(project / "params.yaml")
    assert {name: schema["properties"][name]["default"] for name in current} == current
    schema["properties"]["steps"]["default"] = current["steps"] + 1
    api_post(stack.api_url, f"deployments/{deployment['id']}", {"parameter_openapi_schema": schema}, method="PATCH")
    started = time.monotonic()
    flow_run_id = run_deployment(stack, project)
    print(f"deployment run after dvc repro {flow_run_id}: {time.monotonic() - started:.0f}s")
    assert_all_skipped(stack, flow_run_id)
    assert snapshot(project) == before
    schema = api_get(stack.api_url, f"deployments/name/{DEPLOYMENT}")["parameter_openapi_schema"]
    assert {name: schema["properties"][name]["default"] for name in current} == current
    status = run(["dvc", "status"], project).stdout
    assert "Data and pipelines are up to date" in status, status
