"""One training per project, and MLflow tells the truth about trainings that died: a second `stage train` is
refused while one runs, a run killed before its first checkpoint ends KILLED at the next start, and steps re-trained
after a resume are logged once."""

from __future__ import annotations

import json
import logging
import os
import subprocess
from pathlib import Path

import pytest
from helpers import fail_train_after_step, kill_trains_after_step, make_project, project_env, set_params

from flux2lora.layout import layout_for
from flux2lora.stages import run_stage
from flux2lora.tracking import LOSS_METRIC
from flux2lora.train.recipe import TrainingLock

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def encoded(tmp_path_factory) -> Path:
    root = make_project(tmp_path_factory.mktemp("runs") / "project", git=False)
    set_params(root, **{"train.max_train_steps": 6, "train.checkpointing_steps": 2})
    for name in ("params", "prepare", "encode-text", "encode-latents"):
        run_stage(name, root / "params.yaml")
    return root


def train(root: Path, **env) -> subprocess.CompletedProcess:
    return subprocess.run(["flux2lora", "stage", "train"], cwd=root, capture_output=True, text=True, timeout=600,
                          env=project_env(**env))


def runs(root: Path) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("flux2-lora")
    return client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"]) if experiment \
        else []


def test_a_second_training_of_the_project_is_refused_with_the_holder(encoded):
    layout = layout_for(encoded, "outputs")
    # bit rot the running training would not see: the refused one must not re-encode shards under it
    shard = sorted((encoded / "outputs/latents/shards").glob("*.safetensors"))[0]
    intact, stat = shard.read_bytes(), shard.stat()
    rotten = bytearray(intact)
    rotten[-1] ^= 0xFF
    shard.write_bytes(bytes(rotten))
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    try:
        with TrainingLock(layout.state_dir / "training.lock"):
            proc = train(encoded)
        assert shard.read_bytes() == bytes(rotten), "the refused training healed a shard under the running one"
    finally:
        shard.write_bytes(intact)
        os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert proc.returncode == 2  # a user error: a message, no traceback
    message = proc.stdout + proc.stderr
    assert "Traceback" not in message
    assert "another training of this project is running (pid" in message and "training.lock" in message, message
    assert not layout.lora_file.exists(), "the refused training must not write anything"


def test_a_killed_run_ends_killed_and_resumed_steps_are_logged_once(encoded, monkeypatch, caplog):
    layout = layout_for(encoded, "outputs")
    active = layout.state_dir / "training_mlflow_run.json"
    # 1. SIGKILLed after step 1, before its first checkpoint (step 2): its MLflow run is left RUNNING
    kill_trains_after_step([encoded], 1)
    assert not list(layout.checkpoints_dir.glob("step-*"))
    killed_id = json.loads(active.read_text())["run_id"]
    assert [r.info.status for r in runs(encoded) if r.info.run_id == killed_id] == ["RUNNING"]

    # 2. a fault after step 3 (after step 2's checkpoint): the next start ends the killed run as KILLED
    fail_train_after_step(encoded, 3, monkeypatch)
    statuses = {r.info.run_id: r.info.status for r in runs(encoded)}
    assert statuses[killed_id] == "KILLED", statuses

    # 3. the retry resumes from step 2 and re-trains step 3, which the failed attempt had logged already
    with caplog.at_level(logging.INFO, logger="flux2lora"):
        run_stage("train", encoded / "params.yaml")
    assert "resuming from checkpoint step-000002" in caplog.text
    from mlflow.tracking import MlflowClient

    run_id = json.loads(layout.run_file.read_text())["run_id"]
    history = MlflowClient(f"sqlite:///{encoded / 'mlflow.db'}").get_metric_history(run_id, LOSS_METRIC)
    assert sorted(m.step for m in history) == [1, 2, 3, 4, 5, 6], "each step's loss is logged exactly once"
    assert {r.info.run_id: r.info.status for r in runs(encoded)}[run_id] == "FINISHED"
    assert not active.exists()
