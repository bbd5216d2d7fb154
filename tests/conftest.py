"""Shared fixtures. Everything runs offline on tiny random FLUX.2 models: HF_HUB_OFFLINE is forced on."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
# Tiny models: one thread per process is faster than two fighting over two cores (and subprocesses inherit it).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.pop("MLFLOW_TRACKING_URI", None)  # each test project gets its own sqlite store
sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402

from helpers import make_project  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _tracking_uri_does_not_leak_between_tests():
    """mlflow.set_tracking_uri (called by tests that read a project's store) exports MLFLOW_TRACKING_URI into the
    environment, which the next project would read as the user's choice. Start and end every test without it."""
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    yield
    os.environ.pop("MLFLOW_TRACKING_URI", None)


def _train_demo(root: Path) -> Path:
    from flux2lora.stages import STAGES, run_stage

    root = make_project(root)
    for name in STAGES:
        run_stage(name, root / "params.yaml")
    return root


@pytest.fixture(scope="session")
def trained_project(tmp_path_factory) -> Path:
    """A demo project (tiny klein-4b, 8 generated images) on which all six stages ran in-process once.

    Under pytest-xdist the first worker that asks trains it once into the session's shared temp folder (a file lock
    keeps the others waiting) and every worker uses its own copy: a project is relocatable (test_relocation), so a
    copy is the same project, and the suite trains it once instead of once per worker."""
    import shutil

    from filelock import FileLock

    if not os.environ.get("PYTEST_XDIST_WORKER"):  # one process: nothing to share
        return _train_demo(tmp_path_factory.mktemp("trained") / "project")
    shared = tmp_path_factory.getbasetemp().parent  # pytest-N/: common to this session's workers, new per session
    built = shared / "trained-demo" / "project"
    with FileLock(str(shared / "trained-demo.lock")):
        if not (built.parent / "complete").exists():
            shutil.rmtree(built.parent, ignore_errors=True)
            _train_demo(built)
            (built.parent / "complete").write_text("")
    root = tmp_path_factory.mktemp("trained") / "project"
    shutil.copytree(built, root, symlinks=True)
    return root
