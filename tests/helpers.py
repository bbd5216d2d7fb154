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


def encoded_ddp_project(root: Path, images: int, **params) -> Path:
    """A project (no git) with the repository's infra/ (the DDP accelerate config ships there) on which prepare and
    both encoders ran in this process: ready for `launch_train` with runtime.num_processes > 1."""
    from flux2lora.stages import run_stage

    make_project(root, git=False, images=images, **params)
    shutil.copytree(REPO / "infra", root / "infra")
    for stage in ("prepare", "encode-text", "encode-latents"):
        run_stage(stage, root / "params.yaml")
    return root


def copy_project(encoded: Path, folder: Path, **params) -> Path:
    """A copy of an encoded project (caches included, MLflow store left out) under `folder`, with params set."""
    root = folder / "project"
    shutil.copytree(encoded, root, ignore=shutil.ignore_patterns("mlflow.db", "mlartifacts"))
    if params:
        set_params(root, **params)
    return root


def straight_and_faulted(encoded: Path, folder: Path, monkeypatch, fault_step: int = 4) -> tuple[Path, Path]:
    """Two copies of an encoded project: one whose train stage ran straight through, one whose train stage was
    failed by FLUX2LORA_FAULT after step `fault_step` and then run again (it resumes from its newest checkpoint)."""
    from flux2lora.stages import run_stage

    straight = copy_project(encoded, folder / "straight")
    run_stage("train", straight / "params.yaml")
    faulted = copy_project(encoded, folder / "killed")
    fail_train_after_step(faulted, fault_step, monkeypatch)
    run_stage("train", faulted / "params.yaml")
    return straight, faulted


def fail_train_after_step(root: Path, step: int, monkeypatch) -> None:
    """The train stage in this process, failed by FLUX2LORA_FAULT=train:step=<step> right after that step (and its
    checkpoint, when one is due); the variable is unset again afterwards."""
    import pytest

    from flux2lora.faults import InjectedFault
    from flux2lora.stages import run_stage

    with monkeypatch.context() as patch, pytest.raises(InjectedFault):
        patch.setenv("FLUX2LORA_FAULT", f"train:step={step}")
        run_stage("train", root / "params.yaml")


def kill_trains_after_step(roots: list[Path], step: int, timeout: float = 300) -> None:
    """SIGKILL the train stage of each project in `roots` right after step `step` (and its checkpoint, when one is
    due), as a machine that dies there would: ONE subprocess imports flux2lora once and forks a child per project,
    each run with FLUX2LORA_FAULT=train:step=<step>:hold (flux2lora.faults: the child waits at that point) and
    killed with SIGKILL by the subprocess once its fault marker exists. Cheaper than a process per project (one
    import of torch/diffusers), as honest as one (each child is a separate process that dies without unwinding)."""
    proc = subprocess.run([sys.executable, __file__, "kill-trains-after-step", str(step), str(timeout),
                           *map(str, roots)], env=project_env(FLUX2LORA_FAULT=f"train:step={step}:hold",
                                                              FLUX2LORA_FAULT_HOLD_SECONDS=str(timeout)),
                          capture_output=True, text=True, timeout=timeout * len(roots) + 120)
    if proc.returncode != 0:
        raise AssertionError(f"kill-trains-after-step failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-4000:]}")


def _import_what_training_imports() -> None:
    """Import, once before the forks, the modules the train stage imports lazily (diffusers' FLUX.2 classes, peft's
    tuners, MLflow and its SQL store): ~20 s of CPU a child would otherwise spend again. Importing computes
    nothing with torch."""
    import diffusers
    import mlflow.store.tracking.sqlalchemy_store  # noqa: F401
    import peft.tuners  # noqa: F401

    import flux2lora.tracking  # noqa: F401
    import flux2lora.train.recipe  # noqa: F401

    for name in ("Flux2KleinPipeline", "Flux2Pipeline", "Flux2Transformer2DModel", "AutoencoderKLFlux2"):
        getattr(diffusers, name)


def _kill_trains_after_step_main(step: int, timeout: float, roots: list[Path]) -> None:
    """The subprocess of kill_trains_after_step. Nothing here computes with torch before a fork, so each child
    starts with torch's thread pools uninitialised (fork-safe)."""
    import signal
    import time

    from flux2lora.faults import marker_path
    from flux2lora.stages import run_stage

    _import_what_training_imports()
    for root in roots:
        marker = marker_path(root / "outputs", "train", f"step={step}")
        pid = os.fork()
        if pid == 0:  # the child: train until the held fault; it never returns from there
            code = 3
            try:
                run_stage("train", root / "params.yaml")
            except BaseException as error:  # noqa: BLE001 (reported by the exit code below)
                print(f"{root}: train stopped by {error!r}", file=sys.stderr)
            finally:
                os._exit(code)
        deadline = time.monotonic() + timeout
        while not marker.exists():
            done, status = os.waitpid(pid, os.WNOHANG)
            if done or time.monotonic() > deadline:
                raise SystemExit(f"{root}: training ended or stalled before step {step}'s fault "
                                 f"(status {status}); see the child's error above")
            time.sleep(0.005)
        os.kill(pid, signal.SIGKILL)
        _, status, usage = os.wait4(pid, 0)
        if not (os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL):
            raise SystemExit(f"{root}: the train process was not killed by SIGKILL (status {status})")
        print(f"{root}: killed by SIGKILL after step {step} ({usage.ru_utime + usage.ru_stime:.1f} s CPU)", flush=True)


if __name__ == "__main__" and sys.argv[1:2] == ["kill-trains-after-step"]:
    _kill_trains_after_step_main(int(sys.argv[2]), float(sys.argv[3]), [Path(p) for p in sys.argv[4:]])
