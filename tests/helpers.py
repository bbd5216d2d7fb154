"""Building throwaway flux2lora projects for tests: the repo's own pipeline files, a tiny model, demo data."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
PROJECT_FILES = ("params.yaml", "dvc.yaml", "user_prompt_library.json", "prefect.yaml")
PROJECT_DIRS = ("flows", "tasks")


def set_params(root: Path, **dotted) -> None:
    """Edit params.yaml in place: set_params(root, **{"train.learning_rate": 0.02})."""
    path = root / "params.yaml"
    tree = yaml.safe_load(path.read_text())
    for key, value in dotted.items():
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    path.write_text(yaml.safe_dump(tree, sort_keys=False))


def project_env(**extra) -> dict:
    """Environment for subprocesses (dvc, flux2lora, prefect): the test venv first on PATH, offline hub."""
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["HF_HUB_OFFLINE"] = "1"
    env["DVC_NO_ANALYTICS"] = "1"  # no telemetry calls from a sandbox without internet
    env.pop("MLFLOW_TRACKING_URI", None)
    env.update(extra)
    return env


def run(cmd: list[str], cwd: Path, timeout: int = 600, **env) -> subprocess.CompletedProcess:
    """Run a command, failing the test with its output when it fails."""
    proc = subprocess.run(cmd, cwd=cwd, env=project_env(**env), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def make_project(root: Path, flavour: str = "klein-4b", images: int = 8, git: bool = True, **params) -> Path:
    """A project folder like a user's checkout: the repo's params/dvc/prefect files, flows/ and tasks/, a tiny
    model in models/, generated images in data/demo, and (with git=True) git + DVC initialised."""
    from flux2lora.demo import make_demo_dataset
    from flux2lora.tiny import make_tiny_model

    root.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        shutil.copy2(REPO / name, root / name)
    for name in PROJECT_DIRS:
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    make_tiny_model(root / "models" / f"tiny-{flavour}", flavour=flavour, seed=0)
    make_demo_dataset(root / "data" / "demo", count=images)
    set_params(root, **{"model.model_flavour": f"tiny-{flavour}",
                        "model.pretrained_model_name_or_path": f"models/tiny-{flavour}", **params})
    if git:
        run(["git", "init", "-q"], root)
        run(["git", "config", "user.email", "test@example.invalid"], root)
        run(["git", "config", "user.name", "test"], root)
        run(["dvc", "init", "-q"], root)
        (root / ".gitignore").write_text("/models/\n/mlflow.db\n/mlartifacts/\n")
        run(["git", "add", "-A"], root)
        run(["git", "commit", "-qm", "project"], root)
    return root


def copy_project(encoded: Path, folder: Path, **params) -> Path:
    """A copy of an encoded project (caches included, MLflow store left out) under `folder`, with params set."""
    root = folder / "project"
    shutil.copytree(encoded, root, ignore=shutil.ignore_patterns("mlflow.db", "mlartifacts"))
    if params:
        set_params(root, **params)
    return root


def kill_train_at_checkpoint(root: Path, step: int, timeout: float = 240) -> Path:
    """`flux2lora stage train` in a subprocess, its process group SIGKILLed as soon as step `step`'s checkpoint
    exists (a machine that dies mid-run); returns that checkpoint's folder."""
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "-m", "flux2lora.cli", "stage", "train"], cwd=root, env=project_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    checkpoint = root / f"outputs/checkpoints/step-{step:06d}"
    deadline = time.monotonic() + timeout
    while not checkpoint.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.005)
    assert checkpoint.exists(), f"training never reached its step-{step} checkpoint"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    return checkpoint


def straight_and_faulted(encoded: Path, folder: Path, monkeypatch, fault_step: int = 4) -> tuple[Path, Path]:
    """Two copies of an encoded project: one whose train stage ran straight through, one whose train stage was
    failed by FLUX2LORA_FAULT after step `fault_step` and then run again (it resumes from its newest checkpoint)."""
    import pytest

    from flux2lora.faults import InjectedFault
    from flux2lora.stages import run_stage

    straight = copy_project(encoded, folder / "straight")
    run_stage("train", straight / "params.yaml")
    faulted = copy_project(encoded, folder / "killed")
    monkeypatch.setenv("FLUX2LORA_FAULT", f"train:step={fault_step}")
    with pytest.raises(InjectedFault):
        run_stage("train", faulted / "params.yaml")
    monkeypatch.delenv("FLUX2LORA_FAULT")
    run_stage("train", faulted / "params.yaml")
    return straight, faulted
