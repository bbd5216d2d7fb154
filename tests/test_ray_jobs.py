"""The train stage submitted as a Ray job (runtime.engine: ray, runtime.ray_address a Jobs API URL), on a real Ray
cluster on this machine: a head with its dashboard (the Jobs API) and two worker nodes, each its own `ray start`
process on a loopback address with one CPU (conftest's session-wide `ray_cluster`, shared with the other Ray files).

The Prefect flow runs in this process against a real Prefect server; the train task submits the stage to the
cluster, whose job runs `flux2lora stage train` (engine ray, 2 Ray Train workers) in the project folder.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

import psutil
import pytest
from helpers import copy_project, make_project, run, set_params
from ray_cluster import NODE_IP, ConnectionWatch
from servers import PrefectAPI, prefect_in_process

from flux2lora.config import load_params
from flux2lora.stages import STAGES

pytestmark = pytest.mark.slow
ray = pytest.importorskip("ray", reason="the ray extra (pip install 'flux2lora[ray]') is not installed")

logger = logging.getLogger("test.ray_jobs")
SECRETS = {"AWS_SECRET_ACCESS_KEY": "aws-secret-do-not-log-3141", "HF_TOKEN": "hf_secret_do_not_log_2718"}


@pytest.fixture(scope="module")
def jobs(ray_cluster):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(ray_cluster.jobs_url)


def _ray_job_params(cluster, **extra) -> dict:
    return {"runtime.engine": "ray", "runtime.ray_address": cluster.jobs_url, "runtime.ray_master_addr": NODE_IP,
            "runtime.num_processes": 2, "train.max_train_steps": 2, "train.train_batch_size": 1, **extra}


def test_a_jobs_api_address_submits_and_the_job_itself_trains_on_its_cluster(monkeypatch):
    from flux2lora.config import Params
    from flux2lora.ray_jobs import INSIDE_JOB_ENV, is_jobs_address, job_entrypoint, job_env, submits_job

    def params(**runtime):
        return Params.model_validate({"runtime": {"engine": "ray", **runtime}})

    assert is_jobs_address("http://head:8265") and is_jobs_address("HTTPS://head")
    assert not is_jobs_address("127.0.0.2:6379") and not is_jobs_address("ray://head:10001")
    assert not is_jobs_address(None)
    assert submits_job(params(ray_address="http://head:8265"))
    assert not submits_job(params(ray_address="head:6379")) and not submits_job(params())
    monkeypatch.setenv(INSIDE_JOB_ENV, "1")  # the submitted job's own stage: trains, does not submit again
    assert not submits_job(params(ray_address="http://head:8265"))

    # the project at its path on the cluster, quoted for the job's shell
    on_cluster = params(ray_address="http://head:8265", ray_project_dir="/mnt/shared/my project")
    assert job_entrypoint(Path("/home/me/project"), on_cluster) == \
        "cd '/mnt/shared/my project' && flux2lora stage train --params params.yaml"
    assert job_entrypoint(Path("/home/me/project"), params()).startswith("cd /home/me/project && ")

    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("FLUX2LORA_PROGRESS_SECONDS", "5")
    env = job_env()
    assert env[INSIDE_JOB_ENV] == "1" and env["FLUX2LORA_PROGRESS_SECONDS"] == "5"
    assert not set(SECRETS) & set(env) and not set(SECRETS.values()) & set(env.values())


def test_flow_submits_train_as_a_ray_job_logs_its_output_and_dvc_repro_then_does_nothing(
        ray_cluster, jobs, tmp_path, monkeypatch):
    """All six stages through the flow with no manual step: train as a Ray job whose output is in the train task's
    log; dvc.lock records it, so `dvc repro` afterwards runs nothing. The cluster mounts the project at another path
    (a symlink here: runtime.ray_project_dir). Secrets in this process's environment are in neither the job's
    entrypoint, its runtime env nor the logs. Every connection stays on loopback."""
    from flows.train import flux2_lora

    project = make_project(tmp_path / "project", **_ray_job_params(ray_cluster))
    mounted = tmp_path / "mounted"
    mounted.symlink_to(project)
    set_params(project, **{"runtime.ray_project_dir": str(mounted)})
    run(["git", "commit", "-qam", "engine ray"], project)
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    submitted_before = {job.submission_id for job in jobs.list_jobs()}

    with prefect_in_process(tmp_path / "prefect") as api_url, ConnectionWatch(ray_cluster.processes) as watch:
        state = flux2_lora(project_dir=str(project), return_state=True)
        assert state.is_completed(), state
        flow_run_id = str(state.state_details.flow_run_id)
        result = state.result()
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=30)
        api = PrefectAPI(api_url)
        records = api.logs(flow_run_id)
        train_task = next(tr for tr in api.task_runs(flow_run_id) if tr["name"] == "train")
    assert not watch.not_loopback(), f"connections left loopback: {watch.not_loopback()}"

    stages = result["stages"]
    assert [name for name in STAGES if stages[name]["ran"]] == list(STAGES)
    summary = stages["train"]["summary"]
    assert summary["steps"] == 2 and summary["processes"] == 2
    (job_id,) = {job.submission_id for job in jobs.list_jobs()} - submitted_before
    assert summary["ray_job_id"] == job_id and jobs.get_job_status(job_id) == "SUCCEEDED"
    assert (project / "outputs/publish").is_dir()

    # the job's output, streamed line by line into the train task's log
    train_log = [r["message"] for r in records if r["task_run_id"] == train_task["id"]]
    assert any(f"submitted the train stage as job {job_id}" in m for m in train_log)
    assert any(f"Running entrypoint for job {job_id}" in m for m in train_log)  # Ray's job manager
    assert any("ray: training on 2 workers" in m for m in train_log)  # the stage inside the job
    assert any(f"ray: job {job_id} succeeded" in m for m in train_log)

    info = jobs.get_job_info(job_id)
    assert info.entrypoint == f"cd {mounted} && flux2lora stage train --params params.yaml"
    shown = f"{info.entrypoint} {info.runtime_env} {info.metadata} " + "\n".join(r["message"] for r in records)
    assert not [name for name, value in SECRETS.items() if value in shown]

    dvc = run(["dvc", "repro"], project)
    assert "Data and pipelines are up to date" in dvc.stdout, dvc.stdout
    assert {job.submission_id for job in jobs.list_jobs()} - submitted_before == {job_id}  # nothing submitted again


def test_a_failed_job_is_an_error_with_its_id_and_last_lines(ray_cluster, jobs, tmp_path):
    from flux2lora.launch import launch_train
    from flux2lora.ray_jobs import RayJobFailed

    project = make_project(tmp_path / "project", git=False,
                           **_ray_job_params(ray_cluster,
                                             **{"runtime.ray_project_dir": str(tmp_path / "not-mounted")}))
    with pytest.raises(RayJobFailed) as failed:
        launch_train(project, load_params(project / "params.yaml"), logger)
    message = str(failed.value)
    job_id = re.search(r"ray job (\S+) at", message).group(1)
    assert jobs.get_job_status(job_id) == "FAILED" and "failed" in message
    assert "not-mounted" in message  # the shell's complaint about the folder, from the job's last lines
    # the shell's cd exits 2, the code of a user error: a Prefect retry would fail the same way
    assert failed.value.permanent


def test_an_interrupt_while_waiting_stops_the_job_and_its_workers(ray_cluster, jobs, ray_encoded, tmp_path,
                                                                 monkeypatch):
    """Ctrl-C (or Prefect cancelling, or SIGTERM raised as an exception) while the job trains: the job is stopped and
    its Ray Train workers end. FLUX2LORA_FAULT=train:step=1:hold holds a worker after step 1 (its pid in the marker);
    the interrupt comes in the wait's next poll of the job's status."""
    from flux2lora import faults, ray_jobs
    from flux2lora.launch import launch_train

    project = copy_project(ray_encoded, tmp_path, **_ray_job_params(ray_cluster))
    monkeypatch.setenv(faults.ENV, "train:step=1:hold")
    monkeypatch.setenv("FLUX2LORA_FAULT_HOLD_SECONDS", "120")
    marker = faults.marker_path(project / "outputs", "train", "step=1")
    log_lines = ray_jobs._LogTail.log_lines

    def interrupted_once_a_worker_holds(tail, wait):
        if marker.exists() and "pid" in marker.read_text():
            raise KeyboardInterrupt
        log_lines(tail, wait)

    monkeypatch.setattr(ray_jobs._LogTail, "log_lines", interrupted_once_a_worker_holds)
    submitted_before = {job.submission_id for job in jobs.list_jobs()}
    with pytest.raises(KeyboardInterrupt):
        launch_train(project, load_params(project / "params.yaml"), logger)
    (job_id,) = {job.submission_id for job in jobs.list_jobs()} - submitted_before
    held = int(re.search(r"pid (\d+)", marker.read_text()).group(1))
    deadline = time.monotonic() + 60
    while (jobs.get_job_status(job_id) != "STOPPED" or psutil.pid_exists(held)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert jobs.get_job_status(job_id) == "STOPPED"
    assert not psutil.pid_exists(held), "the held Ray Train worker outlived its stopped job"
    assert not (project / "outputs/lora/pytorch_lora_weights.safetensors").exists()
