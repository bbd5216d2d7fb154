"""Prefect tasks around the library's stage functions: retries, logging, and DVC's view of what is up to date.

Prefect's own result caching is off on purpose: dvc.lock decides whether a stage must run, so `dvc repro` and the
flow never disagree about it.
"""

from __future__ import annotations

import logging
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from flux2lora.stages import record_stage, run_stage, stage_is_current


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


@task(name="stage", task_run_name="{name}", retries=2, retry_delay_seconds=[10, 60], cache_policy=NO_CACHE)
def pipeline_stage(name: str, project_dir: str) -> dict:
    """Run stage `name` unless dvc.lock says it is current; record it in dvc.lock afterwards."""
    logger = get_run_logger()
    root = Path(project_dir).resolve()
    if stage_is_current(name, root):
        logger.info("%s: up to date according to dvc.lock, nothing to do", name)
        return {"stage": name, "ran": False}
    handler = _forward_library_logs(logger)
    try:
        logger.info("%s: running", name)
        summary = run_stage(name, root / "params.yaml")
    finally:
        logging.getLogger("flux2lora").removeHandler(handler)
    record_stage(name, root)
    logger.info("%s: done, recorded in dvc.lock", name)
    return {"stage": name, "ran": True, "summary": summary}
