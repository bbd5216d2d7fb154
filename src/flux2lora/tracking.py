"""MLflow tracking: one run per training, which validate and publish add to (its id travels in a file).

Default store: `sqlite:///<project root>/mlflow.db` with artifacts in `<project root>/mlartifacts`;
`MLFLOW_TRACKING_URI` (or `tracking.tracking_uri`) points elsewhere, e.g. a team's tracking server.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import yaml

from .config import Params, default_tracking_uri
from .io import write_json_atomic

log = logging.getLogger(__name__)

# MLflow's asynchronous logging (the train loop's per-step metrics) waits for its queue with a 1 s timeout unless it
# buffers: each flush and each end of a run then waits up to a second for that thread to notice. Buffering for a
# second instead lets both return at once, and writes each second's metrics as one batch (one sqlite transaction or
# HTTP request instead of one per step). A value the user exported is kept.
ASYNC_BUFFERING_ENV = "MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS"
ASYNC_BUFFERING_S = "1"

# MLflow 3 shows an experiment as "GenAI apps & agents" (its overview and traces pages) or "Machine learning" (the
# runs list). The experiment tag is what MLflow clients and UIs that honour it read; the 3.17 UI decides by its
# workflow-type switch instead (the `workflowType` URL parameter, else the browser's last choice, GenAI by default),
# so every link we print or store carries `workflowType=machine_learning` too (`run_url`, `experiment_url`).
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
WORKFLOW_QUERY = "workflowType=machine_learning"

# The params a person compares LoRA runs by, logged as the run's MLflow params. MLflow's image cards (the
# validation grid in the run's Model metrics tab) print every run param above the image as `key=value, ...`
# (mlflow/server/js: the image grid's run-name header, "Show run parameters" on by default): with all ~120 resolved
# params the image was pushed out of its card. The full resolved params are the artifact PARAMS_ARTIFACT.
# Five: in a 1440 px wide window (3 cards a row) they take 4 lines, which leaves the validation grid its whole height
# in the card (9 params took 7 lines and clipped the grid's lower half; tests/test_ui.py checks it).
RUN_CARD_PARAMS = ("model.model_flavour", "prepare.instance_data_dir", "train.max_train_steps", "train.learning_rate",
                   "train.lora_rank")
PARAMS_ARTIFACT = "params/params.json"

# The run's Model metrics tab groups charts (metrics and images alike) into sections by the key's prefix before its
# last `/`, puts the named sections in name order first, then the unprefixed keys ("Model metrics"), then "System
# metrics", and orders the charts of a section by key, metrics before images (mlflow/server/js:
# RunsChartsCardConfig.getBaseChartAndSectionConfigs, MLflow 3.17). The section `training` sorts before
# `validation` (the per-prompt images) and `validation_eval_loss` (the per-sigma eval curves) and holds the three
# charts a run is judged by, in one row: the training loss, the mean eval loss and the validation grid with its
# step slider, all inside a 1440x900 window without scrolling (tests/test_ui.py; in two sections, a row of loss
# charts pushed the grid's image below the window). learning_rate, grad_norm, step_time_s: "Model metrics", after.
OVERVIEW_SECTION = "training"
LOSS_METRIC = f"{OVERVIEW_SECTION}/loss"
EVAL_LOSS_METRIC = f"{OVERVIEW_SECTION}/loss_eval"  # after `loss`, before the grid: the section sorts its keys
GRID_IMAGE_KEY = f"{OVERVIEW_SECTION}/validation_grid"
PARAMS_DIFF_ARTIFACT = "params/params.yaml.diff"


def tracking_uri(params: Params, root: Path) -> str:
    return params.tracking.tracking_uri or default_tracking_uri(root)


def configure(params: Params, root: Path):
    """Point mlflow at the configured store and make sure the experiment exists; returns the mlflow module."""
    import mlflow

    uri = tracking_uri(params, root)
    # mlflow.set_tracking_uri also exports MLFLOW_TRACKING_URI into this process's environment; left there, the
    # next project configured in the same process (a flow, a test session) would read it back as the user's
    # choice and log into this project's store. Keep the environment as the user set it.
    user_value = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    if user_value is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = user_value
    name = params.tracking.experiment_name
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is None:
        # A local sqlite store keeps artifacts beside it; a server decides its own artifact root.
        location = (root / "mlartifacts").as_uri() if uri.startswith("sqlite:") else None
        try:
            mlflow.create_experiment(name, artifact_location=location)
        except Exception:  # created concurrently by another process
            if mlflow.get_experiment_by_name(name) is None:
                raise
    elif uri == f"sqlite:///{root / 'mlflow.db'}":  # the project's own store only, never a user's sqlite URI
        follow_moved_project(root / "mlflow.db", (root / "mlartifacts").as_uri())
    experiment = mlflow.set_experiment(name)
    if experiment.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
        mlflow.set_experiment_tag(EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    os.environ.setdefault(ASYNC_BUFFERING_ENV, ASYNC_BUFFERING_S)
    return mlflow


def experiment_url(server: str, experiment_id: str) -> str:
    """The experiment's runs list on an MLflow server (http://host:port)."""
    return f"{server.rstrip('/')}/#/experiments/{experiment_id}/runs?{WORKFLOW_QUERY}"


def run_url(server: str, experiment_id: str, run_id: str, tab: str | None = None) -> str:
    """A run's page on an MLflow server; tab: "model-metrics", "artifacts", ... (default: its overview)."""
    return (f"{server.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}" + (f"/{tab}" if tab else "")
            + f"?{WORKFLOW_QUERY}")


def follow_moved_project(db: Path, artifacts_uri: str) -> int:
    """The project's own sqlite store after the project moved (copied, renamed, mounted elsewhere): MLflow keeps
    absolute artifact locations, so those under another folder's `mlartifacts` are rewritten to this project's.
    Returns how many experiments were moved. Other stores (a server, a user's URI) are never touched."""
    import sqlite3
    from contextlib import closing

    if not db.is_file():  # sqlite would create an empty file and fail on its missing tables
        return 0
    with closing(sqlite3.connect(str(db))) as con, con:
        moved = [(eid, old) for eid, old in con.execute("SELECT experiment_id, artifact_location FROM experiments")
                 if old and old.rstrip("/").endswith("/mlartifacts") and old.rstrip("/") != artifacts_uri]
        for _, old in moved:
            old = old.rstrip("/")
            # an exact prefix comparison: LIKE would ignore case and read `_` and `%` in paths as wildcards
            prefix = (artifacts_uri, len(old) + 1, len(old), old)
            con.execute("UPDATE experiments SET artifact_location = ? || substr(artifact_location, ?) "
                        "WHERE substr(artifact_location, 1, ?) = ?", prefix)
            con.execute("UPDATE runs SET artifact_uri = ? || substr(artifact_uri, ?) "
                        "WHERE substr(artifact_uri, 1, ?) = ?", prefix)
            for column in ("source", "storage_location"):
                con.execute(f"UPDATE model_versions SET {column} = ? || substr({column}, ?) "
                            f"WHERE substr({column}, 1, ?) = ?", prefix)
    if moved:
        log.info("the project moved: MLflow artifact locations now point into %s", artifacts_uri)
    return len(moved)


def _pipeline_files(root: Path) -> list[str]:
    """The tracked files the pipeline itself writes from params.yaml (relative to root): params.yaml (a flow run's
    parameters, `flux2lora train --set`), dvc.lock and the params stage's per-stage files. Their changes are the
    run's params (recorded by `params_yaml_diff`), not a change of the code."""
    from .config import read_raw_params

    try:
        output_dir = (read_raw_params(root / "params.yaml") or {}).get("output_dir") or "outputs"
    except Exception:  # an unreadable params.yaml fails the stage elsewhere, with its own message
        output_dir = "outputs"
    return ["params.yaml", "dvc.lock", f"{str(output_dir).rstrip('/')}/params"]


def git_commit(root: Path) -> str:
    """HEAD's sha, with "-dirty" when tracked files other than the pipeline's own (params.yaml, dvc.lock, the
    params stage's files) differ from it; "unknown" outside git."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()
        excluded = [f":(exclude){path}" for path in _pipeline_files(root)]
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", *excluded],
                               cwd=root, capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "unknown"


def params_yaml_diff(root: Path) -> str:
    """`git diff HEAD -- params.yaml`: how the params this run trained with differ from the commit's ("" when they
    do not, or outside git)."""
    try:
        return subprocess.run(["git", "diff", "--no-color", "HEAD", "--", "params.yaml"], cwd=root,
                              capture_output=True, text=True, check=True).stdout
    except (subprocess.CalledProcessError, FileNotFoundError):
        return ""


def _load_yaml(path: Path):
    # libyaml's loader when PyYAML has it: several times faster on dvc.lock, which the stages read up to 3 times
    return yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def dataset_dvc_hash(root: Path, data_dir: str) -> str:
    """The DVC hash of the dataset folder: from `<dir>.dvc` when tracked with `dvc add`, else from the prepare
    stage's dependency in dvc.lock; "untracked" when DVC does not know it."""
    data_dir = data_dir.rstrip("/")
    dvc_file = root / f"{data_dir}.dvc"
    if dvc_file.exists():
        outs = (_load_yaml(dvc_file) or {}).get("outs", [])
        if outs and outs[0].get("md5"):
            return outs[0]["md5"]
    lock = root / "dvc.lock"
    if lock.exists():
        stages = (_load_yaml(lock) or {}).get("stages", {})
        for dep in stages.get("prepare", {}).get("deps", []):
            if dep.get("path", "").rstrip("/") == data_dir and dep.get("md5"):
                return dep["md5"]
    return "untracked"


def training_data_sha256(text_embeds_dir: Path, latents_dir: Path) -> str:
    """What the train stage trained on, named by its own declared inputs: sha256 over the two caches' indexes
    (content-addressed, relocatable). Unlike dataset_dvc_hash (read from dvc.lock, which train does not declare and
    which an in-process run may not have yet) it is the same whichever entry point ran the stages."""
    import hashlib

    digest = hashlib.sha256()
    for index in (Path(text_embeds_dir) / "index.json", Path(latents_dir) / "index.json"):
        digest.update(index.read_bytes())
    return digest.hexdigest()


def read_run_id(run_file: Path) -> str:
    if not run_file.exists():
        raise FileNotFoundError(f"{run_file} is missing: run the train stage first (it opens the MLflow run)")
    return json.loads(run_file.read_text())["run_id"]


def write_run_file(run_file: Path, run) -> None:
    write_json_atomic(run_file, {"run_id": run.info.run_id, "experiment_id": run.info.experiment_id,
                                 "run_name": run.info.run_name})


def log_params_flat(mlflow, params: Params) -> None:
    """Log the run's params into the active run: RUN_CARD_PARAMS as MLflow params (dotted keys), and every resolved
    param, flat and sorted, as the JSON artifact PARAMS_ARTIFACT (what `nightly` compares against)."""
    import tempfile

    flat = {k: ("" if v is None else v) for k, v in params.flat().items()}
    mlflow.log_params({key: flat[key] for key in RUN_CARD_PARAMS if key in flat})
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(PARAMS_ARTIFACT).name
        path.write_text(json.dumps(flat, indent=2, sort_keys=True, default=str) + "\n")
        mlflow.log_artifact(str(path), artifact_path=str(Path(PARAMS_ARTIFACT).parent))


def logged_params(client, run) -> dict[str, str]:
    """Every resolved param a training run logged, as strings: the PARAMS_ARTIFACT JSON, else (runs logged before
    it existed) the run's MLflow params."""
    import tempfile

    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = client.download_artifacts(run.info.run_id, PARAMS_ARTIFACT, tmp)
            return {k: "" if v is None else str(v) for k, v in json.loads(Path(path).read_text()).items()}
    except Exception:
        return dict(run.data.params)


def _prefect_flow_run() -> dict[str, str]:
    """Name, id and UI URL of the Prefect flow run this process runs in; {} outside one."""
    # A flow or task run context exists only in a process that imported prefect; any other process learns of its
    # flow run from the environment (a worker's flow-run process and what it launches; prefect.runtime's mocks).
    # Without either there is nothing to link, and importing prefect.runtime (~1 s of CPU) is skipped.
    if "prefect" not in sys.modules and not any(
            key == "PREFECT__FLOW_RUN_ID" or key.startswith("PREFECT__RUNTIME__FLOW_RUN__") for key in os.environ):
        return {}
    try:
        from prefect.runtime import flow_run
    except ImportError:
        return {}
    try:
        run_id = flow_run.id
        if not run_id:
            return {}
        return {"prefect.flow_run.name": flow_run.name or "", "prefect.flow_run.id": str(run_id),
                "prefect.flow_run.url": flow_run.ui_url or ""}
    except Exception:  # no API to ask (a flow run's context without its server): nothing to link
        return {}


def prefect_flow_run_name() -> str | None:
    """The name of the Prefect flow run this process runs in (also a train stage that `accelerate launch` started
    from one); None outside one."""
    return _prefect_flow_run().get("prefect.flow_run.name") or None


def run_description(params: Params, root: Path, steps: int, final_loss: float, dataset_hash: str) -> str:
    """The MLflow run's description (markdown, the run page's top): flavour, base model, dataset, steps, loss."""
    model = params.model
    lines = [f"LoRA for **{model.model_flavour}** (`{model.model_id}`), rank {params.train.lora_rank}, trained "
             f"{steps} steps at learning rate {params.train.learning_rate:g} on `{params.prepare.instance_data_dir}` "
             f"(DVC `{dataset_hash}`): final loss **{final_loss:.4f}**.",
             "",
             f"Loss and validation images: the Model metrics tab. All resolved params: artifact `{PARAMS_ARTIFACT}`."]
    return "\n".join(lines)


def describe_training_run(params: Params, root: Path, summary: dict) -> None:
    """After the train stage, on the run page: the description (mlflow.note.content), the code's git commit
    (`mlflow.source.git.commit`, and `git_commit` without `-dirty` from params.yaml), params.yaml's changes against
    that commit (tag `params_yaml_changed`, artifact PARAMS_DIFF_ARTIFACT), the entry point (`mlflow.source.name`)
    and, inside a Prefect flow run, its name, id and URL (`prefect.flow_run.*`). Only the process that logs (its
    summary has the run id) does it."""
    run_id = summary.get("mlflow_run_id")
    if not run_id:
        return
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri(params, root))
    commit = git_commit(root)
    diff = params_yaml_diff(root)
    tags = {"mlflow.note.content": run_description(params, root, int(summary["steps"]), float(summary["final_loss"]),
                                                   dataset_dvc_hash(root, params.prepare.data_root)),
            "mlflow.source.name": "flux2lora stage train", "git_commit": commit,
            "params_yaml_changed": "true" if diff else "false", **_prefect_flow_run()}
    if commit != "unknown":
        tags["mlflow.source.git.commit"] = commit.removesuffix("-dirty")
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
    if diff:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(PARAMS_DIFF_ARTIFACT).name
            path.write_text(diff)
            client.log_artifact(run_id, str(path), artifact_path=str(Path(PARAMS_DIFF_ARTIFACT).parent))
    uri = tracking_uri(params, root)
    if uri.startswith(("http://", "https://")):
        log.info("MLflow run: %s", run_url(uri, client.get_run(run_id).info.experiment_id, run_id, "model-metrics"))
