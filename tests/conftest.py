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


@pytest.fixture
def quanto_int4_without_a_compiler(monkeypatch):
    """optimum-quanto unpacks int4 weights on CPU with a C++ kernel it compiles (g++ over torch's headers) the first
    time a venv needs it: the first int4 test took 232 s and 214 s in two CI runs (fresh venvs), 0.25 s once built. The tests of our int4 path use quanto's own PyTorch implementation of the same op instead (its `default`
    kernel of `quanto::unpack`, registered for every device without a compiled one): what they check is our
    quantization and adapters on quanto's weights, not quanto's kernel."""
    from types import SimpleNamespace

    from optimum.quanto.library.extensions.cpp import ext

    op = torch.ops.quanto.unpack.default
    pytorch_kernel = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    # the CPU kernel calls ext.lib.unpack, which would compile the extension on first access
    monkeypatch.setattr(ext, "_lib", SimpleNamespace(unpack=lambda packed, bits: op.redispatch(pytorch_kernel, packed,
                                                                                              bits)))


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


# Files whose tests share one session-wide resource, handed to one xdist worker as one unit (--dist loadfile
# otherwise splits by file): the three Ray files share one local Ray cluster (its start and its daemons cost minutes
# of CPU on two cores, once instead of three times), which stops as soon as the last of them has run.
SHARED_BY = dict.fromkeys(("test_ray_engine.py", "test_ray_jobs.py", "test_ray_storage.py"), "ray-cluster")


def pytest_xdist_auto_num_workers(config):
    """`-n auto` (make test): one worker more than there are cores. The end-to-end tests spend much of their time
    waiting (a server starting, a subprocess of one thread, a Ray job polled): with a worker per core, a quarter of
    two cores' time went unused in a full run. PYTEST_XDIST_AUTO_NUM_WORKERS still decides when set."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None  # xdist's own hook reads it
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return cores + 1


def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class FilesAndSharedGroups(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return SHARED_BY.get(Path(path).name, path)

    return FilesAndSharedGroups(config, log)


_ray: dict = {}  # the session's Ray cluster and the S3 server its nodes know, once started


@pytest.fixture(scope="session")
def ray_s3():
    """moto's S3 on loopback with the Ray tests' bucket (ray_cluster.S3_BUCKET), for the whole Ray group: its
    endpoint and credentials are the Ray nodes' own environment (ray_cluster.s3_env), as a real node's would be."""
    from servers import moto_server

    from ray_cluster import S3_BUCKET

    with moto_server((S3_BUCKET,)) as endpoint:
        yield endpoint


@pytest.fixture(scope="session")
def ray_cluster(ray_s3):
    """The Ray tests' cluster: a head with its dashboard (the Jobs API) and two worker nodes, each its own `ray start`
    process on 127.0.0.2 with one CPU, the S3 environment set on every node. Stopped after the group's last test."""
    pytest.importorskip("ray", reason="the ray extra (pip install 'flux2lora[ray]') is not installed")
    from ray_cluster import LocalRayCluster, s3_env

    _ray["cluster"] = cluster = LocalRayCluster(workers=2, jobs=True, env=s3_env(ray_s3))
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def ray_encoded(tmp_path_factory) -> Path:
    """The Ray tests' project, its caches encoded (in this process): 8 images, 2 workers of one micro-batch each,
    2 steps with a checkpoint after each (the fewest that show equality and a resume from a checkpoint), the
    repository's infra/ (the accelerate config) beside it. Copy it, do not change it."""
    from helpers import encoded_ddp_project

    return encoded_ddp_project(tmp_path_factory.mktemp("ray") / "template", images=8,
                               **{"train.max_train_steps": 2, "train.checkpointing_steps": 1,
                                  "train.mixed_precision": "no", "train.train_batch_size": 1,
                                  "runtime.num_processes": 2})


@pytest.fixture(scope="session")
def ray_run(ray_encoded, ray_cluster, tmp_path_factory):
    """One uninterrupted Ray run of 2 workers on ray_encoded, storage null, its connections watched: (project,
    summary, watch). The reference the Ray fault tests' LoRAs must equal."""
    from helpers import copy_project
    from ray_cluster import ConnectionWatch, launch, ray_params

    on_ray = copy_project(ray_encoded, tmp_path_factory.mktemp("ray-run"), **ray_params(ray_cluster))
    with ConnectionWatch(ray_cluster.processes) as watch:
        summary = launch(on_ray)
    return on_ray, summary, watch


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    yield
    # xdist runs an item once the next one is known, so `nextitem` is None only at the worker's very end
    if "cluster" in _ray and SHARED_BY.get(item.path.name) == "ray-cluster" and \
            (nextitem is None or SHARED_BY.get(nextitem.path.name) != "ray-cluster"):
        _ray.pop("cluster").stop()  # the group is done: its daemons would take CPU from every later test


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    # a shared group's files side by side, where its first file ranks (without xdist too: its resource stops after
    # the group's last test)
    group_rank = {}
    for name, group in SHARED_BY.items():
        group_rank[group] = min(group_rank.get(group, len(rank)), rank.get(name, len(rank)))

    def order(item):
        name = item.path.name
        own = rank.get(name, len(rank))
        return (group_rank[SHARED_BY[name]], own, name) if name in SHARED_BY else (own, -1, "")

    items.sort(key=order)  # stable: in-file order unchanged
