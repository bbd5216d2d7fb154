"""MLflow tracking: one run per training, which validate and publish add to (its id travels in a file).

Default store: `sqlite:///<project root>/mlflow.db` with artifacts in `<project root>/mlartifacts`;
`MLFLOW_TRACKING_URI` (or `tracking.tracking_uri`) points elsewhere, e.g. a team's tracking server.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
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
    if mlflow.get_experiment_by_name(name) is None:
        # A local sqlite store keeps artifacts beside it; a server decides its own artifact root.
        location = (root / "mlartifacts").as_uri() if uri.startswith("sqlite:") else None
        try:
            mlflow.create_experiment(name, artifact_location=location)
        except Exception:  # created concurrently by another process
            if mlflow.get_experiment_by_name(name) is None:
                raise
    elif uri == f"sqlite:///{root / 'mlflow.db'}":  # the project's own store only, never a user's sqlite URI
        follow_moved_project(root / "mlflow.db", (root / "mlartifacts").as_uri())
    mlflow.set_experiment(name)
    os.environ.setdefault(ASYNC_BUFFERING_ENV, ASYNC_BUFFERING_S)
    return mlflow


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


def git_commit(root: Path) -> str:
    """HEAD's sha, with "-dirty" when tracked files differ from it; "unknown" outside git."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "unknown"


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


def read_run_id(run_file: Path) -> str:
    if not run_file.exists():
        raise FileNotFoundError(f"{run_file} is missing: run the train stage first (it opens the MLflow run)")
    return json.loads(run_file.read_text())["run_id"]


def write_run_file(run_file: Path, run) -> None:
    write_json_atomic(run_file, {"run_id": run.info.run_id, "experiment_id": run.info.experiment_id,
                                 "run_name": run.info.run_name})


def log_params_flat(mlflow, params: Params) -> None:
    flat = {k: ("" if v is None else v) for k, v in params.flat().items()}
    items = list(flat.items())
    for start in range(0, len(items), 90):  # MLflow accepts at most 100 params per batch
        mlflow.log_params(dict(items[start:start + 90]))
