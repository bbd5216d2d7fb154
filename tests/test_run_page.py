"""What the MLflow run page is made of (the browser checks are in tests/test_ui.py): the experiment's kind, the
compact run params beside the full resolved params artifact, the run's description, and a git commit that params.yaml
edits do not make `-dirty` (those edits recorded on their own)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from mlflow.tracking import MlflowClient

from flux2lora import tracking
from flux2lora.config import load_params
from helpers import run, set_params


def _client_and_run(root: Path):
    client = MlflowClient(tracking_uri=tracking.default_tracking_uri(root))
    run_file = json.loads((root / "outputs/train/mlflow_run.json").read_text())
    return client, client.get_run(run_file["run_id"])


def test_experiment_is_a_machine_learning_experiment(trained_project: Path) -> None:
    client, mlflow_run = _client_and_run(trained_project)
    experiment = client.get_experiment(mlflow_run.info.experiment_id)
    assert experiment.tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"


def test_run_params_are_the_compact_set_and_the_artifact_holds_all(trained_project: Path) -> None:
    """MLflow's image cards print every run param above the image: the run has only RUN_CARD_PARAMS, and the
    artifact params/params.json holds every resolved param, equal to params.yaml's."""
    client, mlflow_run = _client_and_run(trained_project)
    assert set(mlflow_run.data.params) == set(tracking.RUN_CARD_PARAMS)
    flat = load_params(trained_project / "params.yaml").flat()
    logged = tracking.logged_params(client, mlflow_run)
    assert logged == {k: "" if v is None else str(v) for k, v in flat.items()}
    assert len(logged) > 100


def test_run_description_and_source(trained_project: Path) -> None:
    client, mlflow_run = _client_and_run(trained_project)
    metrics = json.loads((trained_project / "outputs/train/metrics.json").read_text())
    note = mlflow_run.data.tags["mlflow.note.content"]
    assert "**tiny-klein-4b**" in note and "`data/demo`" in note
    assert f"{metrics['steps']} steps" in note and f"final loss **{metrics['final_loss']:.4f}**" in note
    assert mlflow_run.data.tags["dataset_dvc_hash"] in note
    assert mlflow_run.data.tags["mlflow.source.name"] == "flux2lora stage train"
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=trained_project, capture_output=True, text=True,
                         check=True).stdout.strip()
    assert mlflow_run.data.tags["mlflow.source.git.commit"] == sha
    assert mlflow_run.data.tags["params_yaml_changed"] == "false"
    assert not any(key.startswith("prefect.") for key in mlflow_run.data.tags)  # no Prefect run: no links


def test_params_yaml_edits_do_not_make_the_commit_dirty(tmp_path: Path) -> None:
    """params.yaml (a flow run's parameters, --set), dvc.lock and the params stage's files are the pipeline's own
    writes: the commit stays clean and params.yaml's diff is returned on its own. Any other tracked file makes it
    dirty."""
    root = tmp_path / "p"
    root.mkdir()
    (root / "params.yaml").write_text("output_dir: out\ntrain:\n  max_train_steps: 10\n")
    (root / "out/params").mkdir(parents=True)
    (root / "out/params/train.json").write_text("{}\n")
    (root / "dvc.lock").write_text("schema: '2.0'\n")
    (root / "code.py").write_text("x = 1\n")
    for cmd in (["git", "init", "-q"], ["git", "config", "user.email", "t@example.invalid"],
                ["git", "config", "user.name", "t"], ["git", "add", "-A"], ["git", "commit", "-qm", "c"]):
        run(cmd, root)
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
    assert tracking.git_commit(root) == sha and tracking.params_yaml_diff(root) == ""

    set_params(root, **{"train.max_train_steps": 20})
    (root / "out/params/train.json").write_text('{"train.max_train_steps": 20}\n')
    (root / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    assert tracking.git_commit(root) == sha
    diff = tracking.params_yaml_diff(root)
    assert "-  max_train_steps: 10" in diff and "+  max_train_steps: 20" in diff

    (root / "code.py").write_text("x = 2\n")
    assert tracking.git_commit(root) == f"{sha}-dirty"


def test_links_open_the_machine_learning_pages() -> None:
    assert tracking.experiment_url("http://h:5000/", "3") == \
        "http://h:5000/#/experiments/3/runs?workflowType=machine_learning"
    assert tracking.run_url("http://h:5000", "3", "abc", "model-metrics") == \
        "http://h:5000/#/experiments/3/runs/abc/model-metrics?workflowType=machine_learning"
