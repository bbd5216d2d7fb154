"""Orchestration overhead: what Prefect, DVC's bookkeeping and MLflow add to a full tiny run (six stages, tiny
klein-4b, 8 generated images), against calling the stage functions directly.

    python bench/orchestration.py                    # 30 training steps (the demo), 5 repeats
    python bench/orchestration.py --steps 300 --repeats 2

Three variants, each on a fresh copy of one prepared project (tiny model, data, git + DVC, an initialised
mlflow.db), in one process after a warm-up of each, alternating, torch on one thread (OMP_NUM_THREADS=1):

    direct   the six stage functions in order, MLflow replaced by a no-op stand-in
    mlflow   the six stage functions with MLflow tracking (sqlite store, system metrics), what `dvc repro` runs
    flow     the Prefect flow: a task per stage with DVC status and commit (dvc.yaml and dvc.lock loaded once per
             run), the GPU concurrency slot (taken once per run), marking the MLflow run current, the report
             artifact, logs sent to a Prefect server (sqlite) on loopback (started once, before timing), MLflow
             included

One-time setup is outside the timing, as a long-lived deployment pays it once, not per run: imports and first
compiles (the warm-up), the Prefect server's start, the MLflow store's tables (created in the template, which every
copy inherits). What each run pays stays inside: opening the MLflow store, DVC's first look at the fresh copy, git
status. Not measured: the process a deployment's worker starts for each flow run (Python start and imports, seconds),
which `direct` has no equivalent of.

The registry (publish.registered_model_name) is off in all three: it is the same MLflow cost in `mlflow` and `flow`
and has no stand-in. Prints one JSON line per measurement, then the medians and the overheads as a share of
`direct` (the goal: under 10%), by wall clock and by CPU time (this process and its children, the Prefect
server included: steadier than the wall clock on a shared machine).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the tests' project builder and Prefect server helpers


class NullRun:
    """What the stages read from an MLflow run."""

    def __init__(self):
        self.info = SimpleNamespace(run_id="bench", experiment_id="0", run_name="bench",
                                    artifact_uri="file:///dev/null")
        self.data = SimpleNamespace(tags={}, params={}, metrics={})

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class NullMlflow:
    """The part of the mlflow module the stages use, doing nothing."""

    def start_run(self, *args, **kwargs):
        return NullRun()

    def get_run(self, run_id):
        return NullRun()

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


@contextmanager
def mlflow_off():
    from flux2lora import tracking

    real = tracking.configure
    tracking.configure = lambda params, root: NullMlflow()
    try:
        yield
    finally:
        tracking.configure = real


def prepare_template(folder: Path, steps: int) -> Path:
    from helpers import make_project

    from flux2lora import tracking
    from flux2lora.config import load_params

    root = make_project(folder / "template", **{"train.max_train_steps": steps,
                                                "publish.registered_model_name": None})
    tracking.configure(load_params(root / "params.yaml"), root)  # tables created once, not in every variant
    return root


def run_direct(root: Path) -> None:
    from flux2lora.stages import STAGES, run_stage

    for name in STAGES:
        run_stage(name, root / "params.yaml")


def run_flow(root: Path) -> None:
    from flows.train import flux2_lora

    state = flux2_lora(project_dir=str(root), return_state=True)
    if not state.is_completed():
        raise RuntimeError(f"flow run ended {state}")


def cpu_seconds() -> float:
    """CPU time of this process and its children (the Prefect server among them), user + system."""
    import psutil

    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.NoSuchProcess:
            pass
    return total


def measure(variant: str, template: Path, work: Path, index: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one full run of `variant` on a fresh copy of the template."""
    root = work / f"{variant}-{index}"
    shutil.copytree(template, root)
    started, cpu_started = time.perf_counter(), cpu_seconds()
    if variant == "direct":
        with mlflow_off():
            run_direct(root)
    elif variant == "mlflow":
        run_direct(root)
    else:
        run_flow(root)
    wall, cpu = time.perf_counter() - started, cpu_seconds() - cpu_started
    shutil.rmtree(root, ignore_errors=True)
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="training steps of the tiny run")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    import logging
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # one compute thread: torch's spinning worker threads make wall and CPU time swing on a shared machine
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("FLUX2LORA_GPU_LIMIT", "bench-gpu")
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    from servers import prefect_in_process

    variants = ("direct", "mlflow", "flow")
    with tempfile.TemporaryDirectory(prefix="bench-orchestration-") as tmp:
        work = Path(tmp)
        template = prepare_template(work, args.steps)
        with prefect_in_process(work / "prefect-home"):
            for variant in variants:  # warm-up: imports, first Prefect client, first compile of everything
                measure(variant, template, work, -1)
            times: dict[str, list[tuple[float, float]]] = {v: [] for v in variants}
            for index in range(args.repeats):
                for variant in variants:
                    wall, cpu = measure(variant, template, work, index)
                    times[variant].append((wall, cpu))
                    print(json.dumps({"variant": variant, "repeat": index, "steps": args.steps,
                                      "wall_s": round(wall, 3), "cpu_s": round(cpu, 3)}), flush=True)
    summary = {"steps": args.steps, "repeats": args.repeats}
    for clock, at in (("wall", 0), ("cpu", 1)):
        median = {v: statistics.median(t[at] for t in runs) for v, runs in times.items()}
        direct = median["direct"]
        summary.update({f"{clock}_{v}_s": round(s, 2) for v, s in median.items()})
        summary.update({f"{clock}_mlflow_overhead": round((median["mlflow"] - direct) / direct, 3),
                        f"{clock}_prefect_dvc_overhead": round((median["flow"] - median["mlflow"]) / direct, 3),
                        f"{clock}_total_overhead": round((median["flow"] - direct) / direct, 3),
                        f"{clock}_overhead_s": round(median["flow"] - direct, 2)})
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
