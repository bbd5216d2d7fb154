"""The `flux2-lora` flow: the six stages in order, each a retried task that DVC's lock file can skip.

Deployed as `flux2-lora/train` (prefect.yaml). Run locally with `python -m flows.train`.
"""

from __future__ import annotations

import os
from pathlib import Path

from prefect import flow
from prefect.logging import get_run_logger

from flux2lora.stages import STAGES
from tasks.stages import pipeline_stage


@flow(name="flux2-lora", log_prints=True)
def flux2_lora(project_dir: str | None = None) -> dict:
    """Train a FLUX.2 LoRA: prepare -> encode-text, encode-latents -> train -> validate -> publish.

    project_dir: the folder with params.yaml and dvc.yaml (default: the working directory).
    """
    logger = get_run_logger()
    root = str(Path(project_dir or os.getcwd()).resolve())
    results = {}
    for name in STAGES:
        results[name] = pipeline_stage(name, root)
    ran = [n for n, r in results.items() if r["ran"]]
    logger.info("pipeline finished: ran %s", ", ".join(ran) if ran else "nothing (everything up to date)")
    publish = results["publish"].get("summary") or {}
    if publish:
        logger.info("LoRA published to %s", publish.get("s3") or publish.get("folder"))
    return results


if __name__ == "__main__":
    import sys

    flux2_lora(sys.argv[1] if len(sys.argv) > 1 else None)
