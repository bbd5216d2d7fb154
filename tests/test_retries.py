"""Retries that resume: the fault switch (FLUX2LORA_FAULT) kills training at step k, Prefect retries the train task,
the retry continues from the checkpoint before k, and the LoRA equals an uninterrupted run's. Also what keeps two
trainings off one GPU, and the train task's multi-GPU launch.

The flows and tasks run in this process against one real Prefect server for the module.
"""

from __future__ import annotations

import contextvars
import json
import shutil
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch
from helpers import make_project
from safetensors.torch import load_file
from servers import PrefectAPI, prefect_in_process

from flux2lora import faults
from flux2lora.config import load_params
from flux2lora.layout import layout_for
from flux2lora.stages import run_stage
from flux2lora.tracking import LOSS_METRIC

pytestmark = pytest.mark.slow

FAULT_STEP = 17  # checkpoints every 10 steps: the retry resumes from step 10


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory) -> PrefectAPI:
    with prefect_in_process(tmp_path_factory.mktemp("prefect") / "home") as api_url:
        yield PrefectAPI(api_url)


@pytest.fixture
def no_retry_delay(monkeypatch):
    """Retry at once instead of after 10 s (the policy itself is asserted in test_every_task_retries_with_backoff)."""
    from tasks.stages import pipeline_stage

    monkeypatch.setattr(pipeline_stage, "retry_delay_seconds", [0.0])
    monkeypatch.setattr(pipeline_stage, "retry_jitter_factor", None)


def wait_for_logs(api: PrefectAPI, flow_run_id: str, *needles: str, timeout: float = 60) -> list[dict]:
    """The flow run's log records once each needle is in one of them (logs reach the server in batches)."""
    deadline = time.monotonic() + timeout
    while True:
        records = api.logs(flow_run_id)
        missing = [n for n in needles if not any(n in r["message"] for r in records)]
        if not missing:
            return records
        if time.monotonic() > deadline:
            raise AssertionError(f"not in the logs: {missing}\n" + "\n".join(r["message"] for r in records[-60:]))
        time.sleep(0.5)


def lora_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def test_every_task_retries_with_backoff():
    from tasks.freshness import check_training_current
    from tasks.params import apply_run_parameters
    from tasks.stages import pipeline_stage

    for task in (pipeline_stage, apply_run_parameters, check_training_current):
        assert task.retries == 3, task.name
        assert task.retry_delay_seconds == [10, 20, 40], task.name
        assert task.retry_jitter_factor == 0.5


def test_permanent_errors_are_not_retried():
    from prefect.states import Failed
    from tasks.retries import retry_unless_permanent

    from flux2lora.config import ParamsError
    from flux2lora.train.step import TrainingDiverged

    assert retry_unless_permanent(None, None, Failed(data=faults.InjectedFault("boom")))
    assert retry_unless_permanent(None, None, Failed(data=OSError("disk hiccup")))
    assert not retry_unless_permanent(None, None, Failed(data=ParamsError("bad key")))
    assert not retry_unless_permanent(None, None, Failed(data=TrainingDiverged("nan")))


def test_fault_spec_is_checked():
    assert faults.armed("train:step=7, prepare:start") == [("train", "step=7"), ("prepare", "start")]
    with pytest.raises(ValueError, match="FLUX2LORA_FAULT"):
        faults.armed("train:step=seven")


def test_resume_after_fault_gives_same_lora(prefect_api, tmp_path, monkeypatch, no_retry_delay):
    """Training fails at step 17; the retried task resumes from the step-10 checkpoint, in the same MLflow run,
    and ends with exactly the LoRA of a run that never failed."""
    from mlflow.tracking import MlflowClient

    from flows.train import flux2_lora

    project = make_project(tmp_path / "project")
    monkeypatch.setenv(faults.ENV, f"train:step={FAULT_STEP}")
    monkeypatch.setenv("FLUX2LORA_PROGRESS_SECONDS", "0.2")  # progress lines in the task log, 5 a second
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING", "1")
    state = flux2_lora(project_dir=str(project), return_state=True)
    assert state.is_completed(), state
    flow_run_id = str(state.state_details.flow_run_id)
    result = state.result()
    layout = layout_for(project, load_params(project / "params.yaml").output_dir)

    # Prefect: the train task ran twice, the first attempt failed with the injected fault
    (train_run,) = [tr for tr in prefect_api.task_runs(flow_run_id) if tr["name"] == "train"]
    assert train_run["run_count"] == 2 and train_run["state"]["type"] == "COMPLETED"
    others = [tr["run_count"] for tr in prefect_api.task_runs(flow_run_id) if tr["name"] != "train"]
    assert set(others) == {1}
    records = wait_for_logs(prefect_api, flow_run_id, f"injected fault at step={FAULT_STEP}",
                            "resuming from checkpoint step-000010 (step 10 of 30)", "Retry 1/3",
                            "progress train: ")
    assert [r["message"] for r in records].count("train: running") == 2

    # the step count: the retry trained steps 11..30, in the same MLflow run
    summary = result["stages"]["train"]["summary"]
    assert summary["resumed_from_step"] == 10 and summary["steps"] == 30
    assert json.loads(layout.train_metrics.read_text())["resumed_from_step"] == 10
    assert faults.marker_path(layout.output_dir, "train", f"step={FAULT_STEP}").exists()
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["resumed_from_step"] == "10"
    assert len(client.search_runs([run.info.experiment_id])) == 1
    assert sorted({m.step for m in client.get_metric_history(run.info.run_id, LOSS_METRIC)}) == list(range(1, 31))
    assert any(name.startswith("system/cpu") for name in run.data.metrics)  # MLflow system metrics (psutil)

    # an uninterrupted training on the same cached inputs
    monkeypatch.delenv(faults.ENV)
    reference = tmp_path / "reference"
    shutil.copytree(project, reference, ignore=shutil.ignore_patterns("mlflow.db", "mlartifacts"))
    reference_layout = layout_for(reference, "outputs")
    for folder in (reference_layout.checkpoints_dir, reference_layout.lora_dir, reference_layout.train_dir):
        shutil.rmtree(folder)
    assert run_stage("train", reference / "params.yaml")["resumed_from_step"] == 0
    resumed, uninterrupted = lora_tensors(layout.lora_file), lora_tensors(reference_layout.lora_file)
    assert resumed.keys() == uninterrupted.keys()
    for key in resumed:
        assert torch.equal(resumed[key], uninterrupted[key]), key


def test_gpu_stages_wait_for_the_gpu_slot(prefect_api, tmp_path, monkeypatch):
    """While another training holds the GPU's concurrency slot, a GPU stage waits; it runs once the slot is free."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.concurrency.sync import concurrency
    from tasks.gpu import LIMIT_ENV
    from tasks.stages import pipeline_stage

    limit = f"test-gpu-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv(LIMIT_ENV, limit)
    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=limit, limit=1))
    project = make_project(tmp_path / "project")
    monkeypatch.chdir(project)
    run_stage("params", project / "params.yaml")
    run_stage("prepare", project / "params.yaml")
    latents_index = layout_for(project, "outputs").latents_dir / "index.json"

    results: list[dict] = []
    stage = threading.Thread(target=contextvars.copy_context().run,
                             args=(lambda: results.append(pipeline_stage("encode-latents", str(project))),))
    with concurrency(limit, occupy=1):  # another training has the GPU
        stage.start()
        stage.join(timeout=4)
        assert stage.is_alive() and not latents_index.exists(), "the stage ran while the GPU was taken"
    stage.join(timeout=120)
    assert not stage.is_alive() and results and results[0]["ran"]
    assert latents_index.exists()


def test_flow_run_takes_the_gpu_slot_once_before_its_first_stage(prefect_api, tmp_path, monkeypatch):
    """A flow run whose GPU stages must run waits for the GPU slot before its first stage, then keeps it for all of
    its GPU stages: one acquisition per run, none by the stage tasks."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.concurrency.sync import concurrency

    import tasks.gpu
    import tasks.stages
    from flows.train import flux2_lora

    limit = f"test-gpu-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv(tasks.gpu.LIMIT_ENV, limit)
    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=limit, limit=1))
    acquired: list[str] = []
    real_slot = tasks.gpu.gpu_slot

    def counted_slot(stage, logger):
        if stage in tasks.gpu.GPU_STAGES:
            acquired.append(stage)
        return real_slot(stage, logger)

    monkeypatch.setattr(tasks.gpu, "gpu_slot", counted_slot)
    monkeypatch.setattr(tasks.stages, "gpu_slot", counted_slot)
    project = make_project(tmp_path / "project", **{"train.max_train_steps": 4,
                                                   "publish.registered_model_name": None})
    images = layout_for(project, "outputs").images_manifest

    states: list = []
    run = threading.Thread(target=contextvars.copy_context().run,
                           args=(lambda: states.append(flux2_lora(project_dir=str(project), return_state=True)),))
    with concurrency(limit, occupy=1):  # another training has the GPU
        run.start()
        run.join(timeout=4)
        assert run.is_alive() and not images.exists(), "the run started its stages while the GPU was taken"
    run.join(timeout=300)
    assert not run.is_alive() and states and states[0].is_completed(), states
    assert acquired == ["encode-text"]


def test_train_on_several_gpus_goes_through_accelerate_launch(prefect_api, tmp_path, monkeypatch):
    """runtime.num_processes > 1: the task starts the stage with accelerate launch (here replaced by an in-process
    run of the stage, this machine having no GPUs) instead of calling it."""
    import tasks.stages

    project = make_project(tmp_path / "project", **{"train.max_train_steps": 2, "train.checkpointing_steps": 1,
                                                    "runtime.num_processes": 2})
    monkeypatch.chdir(project)
    for name in ("params", "prepare", "encode-text", "encode-latents"):
        run_stage(name, project / "params.yaml")
    launched = []

    def fake_launch(root, params, logger):
        launched.append((root, params.runtime.num_processes))
        return run_stage("train", root / "params.yaml")

    monkeypatch.setattr(tasks.stages, "launch_train", fake_launch)
    result = tasks.stages.pipeline_stage("train", str(project))
    assert launched == [(project, 2)] and result["ran"]


def test_user_errors_of_the_model_and_the_loss_are_not_retried():
    """A distilled klein refused, a tokenizer that cannot serve the flavour, a diverged loss: every attempt would end
    the same way, so the tasks' retry condition gives up at once (and the CLI prints them without a traceback)."""
    from flux2lora.errors import BaseModelRefused, TextEncoderMismatch, UserError
    from flux2lora.train.step import TrainingDiverged
    from tasks.retries import _permanent

    for error in (BaseModelRefused("distilled"), TextEncoderMismatch("tokenizer"), TrainingDiverged("nan")):
        assert isinstance(error, UserError) and _permanent(error)
    assert not _permanent(OSError("a connection reset"))
