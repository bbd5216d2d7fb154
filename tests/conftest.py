"""Shared fixtures. Everything runs offline on tiny random FLUX.2 models: HF_HUB_OFFLINE is forced on."""

from __future__ import annotations

import os
import shutil
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


def _built_once(tmp_path_factory, name: str, build) -> Path:
    """The folder `build(folder)` fills, built once per test session: under pytest-xdist the first worker that asks
    builds it into the session's shared temp folder (a file lock keeps the others waiting); in one process it is
    built into the session's temp folder. Callers copy it (`copy_built`) rather than change it."""
    from filelock import FileLock

    if not os.environ.get("PYTEST_XDIST_WORKER"):
        built = tmp_path_factory.getbasetemp() / f"built-{name}" / "project"
    else:
        built = tmp_path_factory.getbasetemp().parent / f"built-{name}" / "project"  # pytest-N/: every worker's
    with FileLock(str(built.parent.parent / f"built-{name}.lock")):
        if not (built.parent / "complete").exists():
            shutil.rmtree(built.parent, ignore_errors=True)
            built.parent.mkdir(parents=True)
            build(built)
            (built.parent / "complete").write_text("")
    return built


def copy_built(built: Path, tmp_path_factory, name: str) -> Path:
    """A copy of a built project of the session's own: a project is relocatable (test_relocation), so the copy is
    the same project, DVC state and MLflow store included."""
    root = tmp_path_factory.mktemp(name) / "project"
    shutil.copytree(built, root, symlinks=True)
    return root


@pytest.fixture(scope="session")
def trained_project(tmp_path_factory) -> Path:
    """A demo project (tiny klein-4b, 8 generated images, params.yaml's values) on which all six stages ran
    in-process once; the suite trains it once and each worker uses its own copy."""
    return copy_built(_built_once(tmp_path_factory, "trained-demo", _train_demo), tmp_path_factory, "trained")


def _repro_demo(root: Path) -> None:
    """The same demo project as trained_project's, through a real `dvc repro` (each stage a `flux2lora stage`
    subprocess); its output is kept beside the project for the tests that read what the first repro did."""
    from helpers import run

    make_project(root)
    proc = run(["dvc", "repro"], root, timeout=900)
    (root.parent / "repro.stdout").write_text(proc.stdout)
    (root.parent / "repro.stderr").write_text(proc.stderr)


@pytest.fixture(scope="session")
def reproduced_demo(tmp_path_factory) -> Path:
    """The pristine demo project after its first `dvc repro` (built once per session; do not change it: copy it
    with `copy_built`, as the `repro_project` fixture does). repro.stdout / repro.stderr lie in its parent."""
    return _built_once(tmp_path_factory, "repro-demo", _repro_demo)


@pytest.fixture(scope="module")
def repro_project(reproduced_demo, tmp_path_factory) -> Path:
    """A module's own copy of the demo project after its first `dvc repro` (see reproduced_demo)."""
    return copy_built(reproduced_demo, tmp_path_factory, "repro")


# The files that take longest (measured in CI's --durations list), scheduled first: with --no-loadscope-reorder
# (`make test`) pytest-xdist's --dist loadfile hands whole files to workers in collection order, so a long file
# collected last would run alone at the end while the other worker idles. Longest first keeps both workers busy to
# the end. The other files keep their order.
LONGEST_FIRST = ("test_ray_engine.py", "test_ray_jobs.py", "test_hostile_inputs.py", "test_lycoris.py",
                 "test_distributed.py", "test_lycoris_ddp.py", "test_dvc.py", "test_ray_storage.py",
                 "test_prefect_deployment.py", "test_dvc_remote.py", "test_params_table.py", "test_relocation.py",
                 "test_services.py", "test_lycoris_resume.py", "test_cli.py", "test_e2e_servers.py")


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: in-file order unchanged
