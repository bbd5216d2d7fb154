"""A project moves: copied to another folder, or cloned through a DVC remote, a half-trained run resumes its
checkpoint there and ends with the LoRA an uninterrupted run gives; prepare re-decodes nothing it inspected before.

Nothing we store depends on where the project lies: the train fingerprint hashes the params as written and the
cached inputs, prepare's records are keyed by project-relative paths, and MLflow's default store follows the
project (`tracking.configure`).
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import pytest
from helpers import fail_train_after_step, make_project, run, set_params
from safetensors.torch import load_file

from flux2lora.layout import layout_for
from flux2lora.stages import STAGES, DvcPipeline, run_stage

pytestmark = pytest.mark.slow

STEPS = {"train.max_train_steps": 8, "train.checkpointing_steps": 4}


def lora_of(root: Path) -> dict:
    return load_file(str(layout_for(root, "outputs").lora_file))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    root = make_project(tmp_path_factory.mktemp("straight") / "project")
    set_params(root, **STEPS)
    for name in STAGES:
        if name in ("params", "prepare", "encode-text", "encode-latents", "train"):
            run_stage(name, root / "params.yaml")
    return lora_of(root)


def half_trained(root: Path, monkeypatch) -> None:
    """Every stage before train recorded in dvc.lock; train stopped by the fault switch after step 4's checkpoint."""
    set_params(root, **STEPS)
    with contextlib.chdir(root), DvcPipeline(root) as dvc:  # DVC resolves paths against the working directory
        for name in ("params", "prepare", "encode-text", "encode-latents"):
            run_stage(name, root / "params.yaml")
            dvc.record(name)
    fail_train_after_step(root, 4, monkeypatch)
    assert (layout_for(root, "outputs").checkpoints_dir / "step-000004").is_dir()


def resume_in(root: Path) -> str:
    """`dvc repro` in the moved project; returns its output (the library logs to stderr)."""
    proc = run(["dvc", "repro", "train"], root)
    return proc.stdout + proc.stderr


def test_copied_project_resumes_its_checkpoint(tmp_path, monkeypatch, uninterrupted):
    first = make_project(tmp_path / "first")
    half_trained(first, monkeypatch)
    moved = tmp_path / "elsewhere" / "renamed"
    shutil.copytree(first, moved, symlinks=True)  # copy2: file times are kept, as `cp -a` and rsync -a keep them
    shutil.rmtree(first)  # nothing may still point at the old folder

    prepare = run_stage("prepare", moved / "params.yaml")
    assert prepare["inspected"] == 0, f"prepare re-decoded images after the move: {prepare}"
    log = resume_in(moved)
    assert "resuming from checkpoint step-000004" in log, log[-3000:]
    assert "belongs to a run with other data or params" not in log
    # the resumed MLflow run's artifacts live in the moved project's store, not under the deleted folder
    from mlflow.tracking import MlflowClient

    run_id = json.loads((moved / "outputs/train/mlflow_run.json").read_text())["run_id"]
    run_info = MlflowClient(f"sqlite:///{moved / 'mlflow.db'}").get_run(run_id).info
    assert run_info.artifact_uri.startswith((moved / "mlartifacts").as_uri()), run_info.artifact_uri
    assert list((moved / "mlartifacts").rglob("pytorch_lora_weights.safetensors"))
    assert not first.exists(), "something wrote into the old project folder"
    trained = lora_of(moved)
    assert trained.keys() == uninterrupted.keys()
    for key in trained:
        assert (trained[key] == uninterrupted[key]).all(), key  # bitwise


def test_project_cloned_through_a_dvc_remote_resumes_its_checkpoint(tmp_path, monkeypatch, uninterrupted):
    origin = make_project(tmp_path / "origin")
    remote = tmp_path / "remote"
    run(["dvc", "remote", "add", "-f", "-d", "test", str(remote)], origin)
    half_trained(origin, monkeypatch)
    # the half-trained run's checkpoints travel as a DVC-tracked folder (README: "Moving a half-trained run")
    run(["dvc", "add", "outputs/checkpoints"], origin)
    run(["dvc", "push"], origin)
    run(["git", "add", "-A"], origin)  # dvc.lock, params, the .dvc files; DVC's .gitignore files keep its outs out
    run(["git", "commit", "-q", "-m", "half-trained"], origin)

    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(origin), str(clone)], tmp_path)
    shutil.copytree(origin / "models", clone / "models")  # the base model: downloaded from the Hub in real life
    run(["dvc", "pull", "--allow-missing"], clone)  # train and later have not run: nothing of theirs to pull
    log = resume_in(clone)
    assert "resuming from checkpoint step-000004" in log, log[-3000:]
    for stage in ("prepare", "encode-text", "encode-latents"):
        assert f"Running stage '{stage}'" not in log, f"{stage} re-ran in the clone"
    trained = lora_of(clone)
    for key in trained:
        assert (trained[key] == uninterrupted[key]).all(), key


def test_a_users_own_sqlite_store_is_never_rewritten_as_the_projects(tmp_path, monkeypatch):
    """Only the project's own mlflow.db follows a move: with MLFLOW_TRACKING_URI naming another sqlite file, every
    configure works on that store and no empty mlflow.db appears in the project."""
    from helpers import REPO

    from flux2lora.config import load_params
    from flux2lora.tracking import configure

    project = tmp_path / "project"
    project.mkdir()
    shutil.copy2(REPO / "params.yaml", project / "params.yaml")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'shared.db'}")
    params = load_params(project / "params.yaml")
    for _ in range(2):  # the second call finds the experiment: the path that used to open project/mlflow.db
        mlflow = configure(params, project)
        assert mlflow.get_experiment_by_name(params.tracking.experiment_name) is not None
    assert not (project / "mlflow.db").exists()
