"""Prefect tasks around the library's stage functions: retries that resume, logs and progress in the task run, the
GPU concurrency limit, the multi-GPU launch of train, and DVC's view of what is up to date.

Prefect's own result caching is off on purpose: dvc.lock decides whether a stage must run, so `dvc repro` and the
flow never disagree about it.
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from flux2lora import faults
from flux2lora.config import PARAMS_FILE, load_params
from flux2lora.layout import layout_for
from flux2lora.stages import DvcPipeline, run_stage

from .gpu import GpuReservation, gpu_slot
from .launch import launch_train, launched
from .progress import progress_to_log
from .retries import RETRY


def _forward_library_logs(run_logger) -> logging.Handler:
    """Send the library's `logging` records (progress, skipped files, resumes) into the Prefect task run's log."""

    class ToRunLogger(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            run_logger.log(record.levelno, "%s", self.format(record))

    handler = ToRunLogger(level=logging.INFO)
    library = logging.getLogger("flux2lora")
    library.setLevel(logging.INFO)
    library.addHandler(handler)
    return handler


@task(name="stage", task_run_name="{name}", cache_policy=NO_CACHE, **RETRY)
def pipeline_stage(name: str, project_dir: str, dvc: DvcPipeline | None = None,
                   gpu: GpuReservation | None = None) -> dict:
    """Run stage `name` unless dvc.lock says it is current; record it in dvc.lock afterwards.

    The flow passes what its stages share: `dvc`, its DvcPipeline (dvc.yaml and dvc.lock loaded once), and `gpu`,
    its GPU reservation. Without them the task opens its own DvcPipeline and holds the GPU slot while it runs.
    A retry of a failed train continues from its latest checkpoint (the train loop resumes by itself).
    FLUX2LORA_FAULT=NAME:start / NAME:end fails this stage once before / after it runs (flux2lora.faults).
    """
    root = Path(project_dir).resolve()
    if dvc is not None:
        return _run_unless_current(name, root, dvc, gpu)
    with DvcPipeline(root) as own:
        return _run_unless_current(name, root, own, gpu)


def _run_unless_current(name: str, root: Path, dvc: DvcPipeline, gpu: GpuReservation | None) -> dict:
    logger = get_run_logger()
    if dvc.is_current(name):
        logger.info("%s: up to date according to dvc.lock, nothing to do", name)
        return {"stage": name, "ran": False}
    params = load_params(root / PARAMS_FILE)
    output_dir = layout_for(root, params.output_dir).output_dir
    handler = _forward_library_logs(logger)
    started = time.perf_counter()
    try:
        with nullcontext() if gpu is not None and gpu.held else gpu_slot(name, logger), progress_to_log(logger):
            logger.info("%s: running", name)
            faults.maybe_fail(name, "start", output_dir)
            if name == "train" and launched(params):
                summary = launch_train(root, params, logger)
            else:
                summary = run_stage(name, root / PARAMS_FILE)
            faults.maybe_fail(name, "end", output_dir)
    finally:
        logging.getLogger("flux2lora").removeHandler(handler)
    seconds = time.perf_counter() - started
    dvc.record(name)
    logger.info("%s: done, recorded in dvc.lock (%.1f s)", name, seconds)
    return {"stage": name, "ran": True, "seconds": seconds, "summary": summary}
