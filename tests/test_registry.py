"""The MLflow model registry: every published LoRA is a version of the registered model, tagged with where it came
from and where it went, with alias `candidate`; `flux2lora promote` moves alias `champion`."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import mlflow
import pytest
import yaml
from typer.testing import CliRunner

from flux2lora.cli import app
from flux2lora.config import load_params
from flux2lora.layout import layout_for
from flux2lora.registry import CANDIDATE, CHAMPION, promote, register_lora

NAME = "flux2-lora"


@pytest.fixture
def store(tmp_path):
    """A fresh sqlite tracking store and a project params.yaml pointing at it."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({
        "tracking": {"tracking_uri": uri, "experiment_name": "registry-test"},
        "publish": {"registered_model_name": NAME}}))
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("registry-test")
    return tmp_path


def publish_run(tmp_path: Path, content: bytes) -> tuple[str, dict]:
    """A run with a published LoRA artifact, as the publish stage leaves it; returns (run id, version tags)."""
    lora = tmp_path / "pytorch_lora_weights.safetensors"
    lora.write_bytes(content)
    with mlflow.start_run() as run:
        mlflow.log_artifact(str(lora), artifact_path="publish")
    tags = {"git_commit": "abc123", "dataset_dvc_hash": "d41d8cd9", "flavour": "klein-4b",
            "lora_sha256": hashlib.sha256(content).hexdigest(), "s3_uri": f"s3://b/loras/{run.info.run_name}",
            "hub_url": None}
    register_lora(NAME, run.info.run_id, f"{run.info.artifact_uri}/publish", tags)
    return run.info.run_id, tags


def test_the_trained_projects_lora_is_registered_with_its_tags_and_is_the_candidate(trained_project):
    params = load_params(trained_project / "params.yaml")
    layout = layout_for(trained_project, params.output_dir)
    mlflow.set_tracking_uri(f"sqlite:///{trained_project / 'mlflow.db'}")
    client = mlflow.tracking.MlflowClient()
    run_id = json.loads(layout.run_file.read_text())["run_id"]
    version = client.get_model_version_by_alias(params.publish.registered_model_name, CANDIDATE)
    assert version.run_id == run_id
    run_tags = client.get_run(run_id).data.tags
    assert version.tags["git_commit"] == run_tags["git_commit"]
    assert version.tags["dataset_dvc_hash"] == run_tags["dataset_dvc_hash"]
    assert version.tags["flavour"] == "tiny-klein-4b"
    published = layout.publish_dir / layout.lora_file.name  # train's LoRA plus publish's trigger phrase
    assert version.tags["lora_sha256"] == hashlib.sha256(published.read_bytes()).hexdigest()
    assert "s3_uri" not in version.tags  # not published to S3 in this project
    assert version.source.endswith("/publish")


def test_each_new_lora_is_a_new_version_and_becomes_the_candidate(store):
    client = mlflow.tracking.MlflowClient()
    first, tags = publish_run(store, b"lora one")
    second, _ = publish_run(store, b"lora two")
    versions = {v.run_id: v for v in client.search_model_versions(f"name='{NAME}'")}
    assert [str(versions[first].version), str(versions[second].version)] == ["1", "2"]
    assert {k: v for k, v in versions[first].tags.items() if k in tags} == {k: v for k, v in tags.items() if v}
    assert "hub_url" not in versions[first].tags  # no location: no tag
    assert client.get_model_version_by_alias(NAME, CANDIDATE).run_id == second


def test_publishing_the_same_lora_again_reuses_its_version(store):
    client = mlflow.tracking.MlflowClient()
    run_id, tags = publish_run(store, b"lora")
    register_lora(NAME, run_id, "ignored", {**tags, "hub_url": "https://huggingface.co/x/y"})
    versions = client.search_model_versions(f"name='{NAME}'")
    assert len(versions) == 1
    assert versions[0].tags["hub_url"] == "https://huggingface.co/x/y"


def test_promote_by_run_id_or_version_moves_champion(store):
    client = mlflow.tracking.MlflowClient()
    first, _ = publish_run(store, b"one")
    publish_run(store, b"two")
    result = promote(NAME, first)
    assert result == {"name": NAME, "alias": CHAMPION, "version": "1", "previous": None, "run_id": first}
    assert promote(NAME, "v2")["previous"] == "1"
    assert str(client.get_model_version_by_alias(NAME, CHAMPION).version) == "2"
    assert str(client.get_model_version_by_alias(NAME, CANDIDATE).version) == "2"  # promote leaves candidate alone


def test_promote_command(store):
    first, _ = publish_run(store, b"one")
    publish_run(store, b"two")
    result = CliRunner().invoke(app, ["promote", first, "--params", str(store / "params.yaml")])
    assert result.exit_code == 0, result.output
    assert "alias champion -> version 1" in result.output
    assert mlflow.tracking.MlflowClient().get_model_version_by_alias(NAME, CHAMPION).run_id == first
    result = CliRunner().invoke(app, ["promote", "2", "--params", str(store / "params.yaml")])
    assert result.exit_code == 0 and "was 1" in result.output


def test_promoting_something_never_published_is_an_error(store):
    publish_run(store, b"one")
    for ref in ("0123456789abcdef0123456789abcdef", "7"):
        result = CliRunner().invoke(app, ["promote", ref, "--params", str(store / "params.yaml")])
        assert result.exit_code == 2
        assert "has no version" in result.output
