"""Scheduled retraining: the nightly flow run (only_if_changed) compares the dataset's DVC hash and the params with
the last successful run in MLflow. No change: it ends 'up to date' without running a stage. A changed caption:
it retrains, and the encoders reuse every unchanged cache entry.

One project and one real Prefect server for the module; the flow runs in this process. The tests run in file
order, each starting from the state the previous one left.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from helpers import make_project, run
from servers import PrefectAPI, api_post, prefect_in_process

from flux2lora import nightly
from flux2lora.layout import layout_for

pytestmark = pytest.mark.slow

STAGES = ["params", "prepare", "encode-text", "encode-latents", "train", "validate", "publish"]


@dataclass
class Nightly:
    project: Path
    api: PrefectAPI
    first: object  # the first flow run's final state

    def run(self, **parameters):
        """One nightly flow run (only_if_changed) in this process; returns its final state."""
        from flows.train import flux2_lora

        state = flux2_lora(only_if_changed=True, project_dir=str(self.project), return_state=True, **parameters)
        assert state.is_completed(), state
        return state

    def mlflow(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(f"sqlite:///{self.project / 'mlflow.db'}")

    def runs(self) -> list:
        client = self.mlflow()
        experiment = client.get_experiment_by_name("flux2-lora")
        return client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])

    def artifacts(self, state) -> list[dict]:
        return api_post(self.api.url, "artifacts/filter",
                        {"artifacts": {"flow_run_id": {"any_": [str(state.state_details.flow_run_id)]}}})

    def task_names(self, state) -> list[str]:
        return [tr["name"] for tr in self.api.task_runs(str(state.state_details.flow_run_id))]


@pytest.fixture(scope="module")
def night(tmp_path_factory) -> Nightly:
    """A project whose first nightly run (nothing in MLflow yet: it trains) also sets steps and learning rate."""
    with prefect_in_process(tmp_path_factory.mktemp("prefect") / "home") as api_url:
        project = make_project(tmp_path_factory.mktemp("nightly") / "project")
        night = Nightly(project, PrefectAPI(api_url), None)
        night.first = night.run(steps=20, learning_rate=0.02)
        yield night


def snapshot(night: Nightly) -> dict:
    """What a training would change: dvc.lock, the LoRA's bytes and mtime, the MLflow runs."""
    lora = layout_for(night.project, "outputs").lora_file
    return {"dvc.lock": (night.project / "dvc.lock").read_text(), "lora": (lora.read_bytes(), lora.stat().st_mtime_ns),
            "runs": [r.info.run_id for r in night.runs()]}


def test_first_run_trains_with_its_parameters_written_to_params_yaml(night):
    result = night.first.result()
    assert not result["up_to_date"]
    assert result["freshness"]["reasons"] == ["no successful run in MLflow experiment 'flux2-lora' yet"]
    assert all(result["stages"][name]["ran"] for name in STAGES)
    params = yaml.safe_load((night.project / "params.yaml").read_text())
    assert params["train"]["max_train_steps"] == 20 and params["train"]["learning_rate"] == 0.02
    assert "+  max_train_steps: 20" in result["params_diff"]
    # dvc.lock holds what this run trained on: `dvc repro` agrees with the flow and has nothing to do
    status = run(["dvc", "status"], night.project).stdout
    assert "Data and pipelines are up to date" in status, status
    (mlflow_run,) = night.runs()
    assert mlflow_run.data.params["train.max_train_steps"] == "20"
    # the flow's parameters changed params.yaml: recorded as such, the code's commit stays clean; the run links its
    # Prefect flow run
    tags = mlflow_run.data.tags
    assert tags["params_yaml_changed"] == "true" and not tags["git_commit"].endswith("-dirty"), tags
    assert tags["prefect.flow_run.id"] and tags["prefect.flow_run.name"], tags
    assert mlflow_run.data.tags[nightly.DATASET_TAG] == nightly.dataset_hash(night.project,
                                                                              _params(night.project))
    assert mlflow_run.data.tags[nightly.PARAMS_TAG] == nightly.params_hash(night.project / "params.yaml")


def _params(project: Path):
    from flux2lora.config import load_params

    return load_params(project / "params.yaml")


def test_run_report_is_a_markdown_artifact(night):
    (artifact,) = [a for a in night.artifacts(night.first) if a["key"] == "flux2-lora-run"]
    assert artifact["type"] == "markdown"
    report = artifact["data"]
    run_id = night.runs()[0].info.run_id
    for expected in ("images: 8 accepted, 0 skipped of 8", "captions: 8 accepted",
                     "prompt embeddings: 0 reused from the cache, 10 encoded", "latents: 0 reused",
                     "final loss: ", "steps/s", run_id, "mlflow ui --backend-store-uri", "## Published",
                     "pytorch_lora_weights.safetensors", "+  learning_rate: 0.02"):
        assert expected in report, f"{expected!r} not in the report:\n{report}"


def test_unchanged_dataset_and_params_end_up_to_date_without_training(night):
    before = snapshot(night)
    started = time.monotonic()
    state = night.run()
    assert state.message.startswith("up to date") and before["runs"][0] in state.message
    assert state.result()["up_to_date"] is True
    # no stage task ran, nothing changed
    assert night.task_names(state) == ["up-to-date check"]
    assert snapshot(night) == before
    (artifact,) = [a for a in night.artifacts(state) if a["key"] == "flux2-lora-run"]
    assert "**Up to date**" in artifact["data"]
    print(f"\nup-to-date nightly run: {time.monotonic() - started:.1f}s")


def test_changed_params_are_named(night):
    path = night.project / "params.yaml"
    original = path.read_text()
    try:
        path.write_text(original.replace("learning_rate: 0.02", "learning_rate: 0.03"))
        freshness = nightly.check(night.project)
        assert not freshness.up_to_date
        (reason,) = freshness.reasons
        assert reason.startswith("params changed") and "(train.learning_rate)" in reason
    finally:
        path.write_text(original)
    assert nightly.check(night.project).up_to_date


def test_changed_caption_retrains_reusing_unchanged_cache_entries(night):
    layout = layout_for(night.project, "outputs")
    latents = {p: p.stat().st_mtime_ns for p in layout.latents_dir.rglob("*") if p.is_file()}
    runs_before = [r.info.run_id for r in night.runs()]
    caption = sorted((night.project / "data" / "demo").glob("*.txt"))[0]
    caption.write_text("sks style, a caption rewritten overnight")

    state = night.run()
    result = state.result()
    (reason,) = result["freshness"]["reasons"]
    assert reason.startswith("dataset changed")
    stages = result["stages"]
    assert stages["encode-text"]["summary"]["encoded"] == 1  # the one new caption
    assert stages["encode-text"]["summary"]["reused"] == 9  # 7 captions, 2 validation prompts (and "")
    assert not stages["encode-latents"]["ran"]  # the images did not change: DVC skips it
    assert {p: p.stat().st_mtime_ns for p in layout.latents_dir.rglob("*") if p.is_file()} == latents
    assert stages["train"]["ran"] and stages["train"]["summary"]["resumed_from_step"] == 0
    runs = night.runs()
    assert [r.info.run_id for r in runs][:-1] == runs_before and runs[-1].info.run_id not in runs_before
    assert json.loads(layout.run_file.read_text())["run_id"] == runs[-1].info.run_id

    # and the next night has nothing to do
    assert night.run().result()["up_to_date"] is True
