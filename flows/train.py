"""The `flux2-lora` flow: the params stage, then the six stages in order, each a retried task that DVC's lock file can skip.

Deployed twice (prefect.yaml): `flux2-lora/train`, run by hand with parameters that override params.yaml, and
`flux2-lora/nightly`, on a cron schedule with only_if_changed, which retrains only when the dataset or the params
differ from the last successful run's. Run locally with `python -m flows.train [PROJECT_DIR]`.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Iterator, Literal

from prefect import flow
from prefect.logging import get_run_logger
from prefect.states import Completed
from pydantic import Field

from flux2lora.config import PARAMS_FILE, read_raw_params
from flux2lora.stages import STAGES, DvcPipeline
from tasks.freshness import check_training_current, mark_run_current
from tasks.gpu import GPU_STAGES, GpuReservation, ensure_gpu_limit
from tasks.params import apply_run_parameters, form_defaults, refresh_form_defaults
from tasks.report import link_mlflow_run, publish_run_report
from tasks.secrets import credentials_from_secret_blocks
from tasks.stages import pipeline_stage

# The run form's choices: flux2lora.flavours.FLAVOURS (the tiny-* ones are the offline test models). Written out,
# not derived, so `prefect deploy` and the UI read them from this signature; a test keeps the two lists equal.
Flavour = Literal["klein-4b", "klein-9b", "dev", "tiny-klein-4b", "tiny-klein-9b", "tiny-dev"]


# `prefect deploy` imports this module in the project folder and builds the deployment's parameter schema from the
# signature below, so the run form opens on the values params.yaml held when deployed (`prefect deploy` again after
# editing it; each deployment flow run also sets them to what params.yaml holds after its params stage:
# refresh_form_defaults). Plain types with defaults, not `X | None = None`: Prefect's form shows an Optional as a
# None/type toggle, and a Literal as a select. A flow run reads the same file again when its worker imports the
# flow: a value equal to its default is params.yaml's own and not written anywhere (see `given_parameters`).
FORM_DEFAULTS = form_defaults(Path.cwd() / PARAMS_FILE)


@contextmanager
def _working_directory(path: Path) -> Iterator[None]:
    # DVC resolves stage names against the working directory: the stages must run from the project folder
    previous = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def _report(project: str, results: dict, params_diff: str, freshness: dict | None, logger) -> None:
    # the report is for people: a failure to write it is logged, and does not fail a run that trained
    try:
        publish_run_report(project, results, params_diff, freshness)
    except Exception:
        logger.warning("could not create the run report artifact", exc_info=True)


def _refresh_form(project: str, logger) -> None:
    try:
        changed = refresh_form_defaults(project)
        if changed:
            logger.info("the deployment's run form now opens on params.yaml's %s", changed)
    except Exception:
        logger.warning("could not update the deployment's run form defaults", exc_info=True)


def _link(project: str, logger) -> None:
    # like the report: naming and linking are for people, and do not fail a run that trained
    try:
        linked = link_mlflow_run(project)
        logger.info("MLflow run %s%s", linked["run_name"], f": {linked['url']}" if linked["url"] else "")
    except Exception:
        logger.warning("could not name this flow run after its MLflow run or link it", exc_info=True)


def _run_stages(root: Path, logger) -> dict[str, dict]:
    """Each stage as a task, in order; returns pipeline_stage's answer per stage.

    The tasks share one DvcPipeline (dvc.yaml and dvc.lock loaded once, as `dvc repro` does) and one GPU reservation:
    taken before the first stage when DVC says a GPU stage must run, else by the first GPU stage found to need it
    once the stages before it ran, and given back after the last GPU stage."""
    results = {}
    last_gpu_stage = [name for name in STAGES if name in GPU_STAGES][-1]
    with DvcPipeline(root) as dvc, GpuReservation(logger) as gpu:
        stale = [name for name in STAGES if name in GPU_STAGES and not dvc.is_current(name)]
        if stale:
            gpu.take(stale[0])
        for name in STAGES:
            if name in GPU_STAGES and not gpu.held and not dvc.is_current(name):
                gpu.take(name)
            results[name] = pipeline_stage(name, str(root), dvc, gpu)
            if name == last_gpu_stage:
                gpu.release()
    return results


def given_parameters(**values: Any) -> dict[str, Any]:
    """The form's parameters that differ from their FORM_DEFAULTS, others as None (not set). A default is the value
    of the params.yaml in the folder this module was imported in: in a deployment's flow run the project's own, so
    leaving it out changes nothing; for a flow called with another project_dir, it must not be written there."""
    return {name: None if value == FORM_DEFAULTS[name] else value for name, value in values.items()}


def run_parameters(raw: dict, flavour: str | None, dataset: str | None, steps: int | None,
                   learning_rate: float | None, lora_rank: int | None, base_model: str | None,
                   params_overrides: dict[str, Any] | None) -> dict[str, Any]:
    """The flow's parameters as dotted params.yaml keys. A new flavour without a base model resets the model path
    to the flavour's default repo, rather than train one flavour on another's weights."""
    overrides = dict(params_overrides or {})
    if flavour is not None:
        overrides["model.model_flavour"] = flavour
        if base_model is None and flavour != (raw.get("model") or {}).get("model_flavour"):
            overrides["model.pretrained_model_name_or_path"] = None
    for key, value in (("model.pretrained_model_name_or_path", base_model), ("prepare.instance_data_dir", dataset),
                       ("train.max_train_steps", steps), ("train.learning_rate", learning_rate),
                       ("train.lora_rank", lora_rank)):
        if value is not None:
            overrides[key] = value
    return overrides


@flow(name="flux2-lora", log_prints=True)
def flux2_lora(
    flavour: Flavour = FORM_DEFAULTS["flavour"],
    dataset: str = FORM_DEFAULTS["dataset"],
    steps: Annotated[int, Field(ge=1)] = FORM_DEFAULTS["steps"],
    learning_rate: Annotated[float, Field(gt=0)] = FORM_DEFAULTS["learning_rate"],
    lora_rank: Annotated[int, Field(ge=1)] = FORM_DEFAULTS["lora_rank"],
    base_model: str | None = None,
    params_overrides: dict[str, Any] | None = None,
    only_if_changed: bool = False,
    project_dir: str | None = None,
) -> dict:
    """Train a FLUX.2 LoRA: prepare -> encode-text, encode-latents -> train -> validate -> publish.

    The form opens on the values of params.yaml when deployed; parameters left at them (or not passed) keep
    params.yaml. Changed ones are written into params.yaml (validated first, the change logged and shown in the run's
    report) before any stage runs, so dvc.lock and `dvc repro` agree with what this run trained.

    Args:
        flavour: FLUX.2 model to train on (model.model_flavour): klein-4b, klein-9b or dev; tiny-* are the offline
            test models. Without base_model, the flavour's default base repo is used.
        dataset: Folder of images with .txt captions beside them, relative to the project (prepare.instance_data_dir);
            empty: params.yaml's datasets.
        steps: Training steps (train.max_train_steps).
        learning_rate: AdamW learning rate of the LoRA weights (train.learning_rate).
        lora_rank: LoRA rank (train.lora_rank).
        base_model: Hub id or local diffusers folder of the base model (model.pretrained_model_name_or_path).
        params_overrides: Any other params.yaml keys, by dotted name, e.g. {"train.lora_alpha": 16}.
        only_if_changed: Retrain only when the dataset's DVC hash or the params differ from the last successful
            run in MLflow; otherwise end as 'up to date' (what the nightly deployment sets).
        project_dir: Folder with params.yaml and dvc.yaml (default: the working directory).
    """
    logger = get_run_logger()
    root = Path(project_dir or os.getcwd()).resolve()
    project = str(root)
    with _working_directory(root), credentials_from_secret_blocks(logger):
        given = given_parameters(flavour=flavour, dataset=dataset or FORM_DEFAULTS["dataset"], steps=steps,
                                 learning_rate=learning_rate, lora_rank=lora_rank)
        overrides = run_parameters(read_raw_params(root / PARAMS_FILE), base_model=base_model,
                                   params_overrides=params_overrides, **given)
        params_diff = apply_run_parameters(project, overrides) if overrides else ""
        _refresh_form(project, logger)
        freshness = None
        if only_if_changed:
            freshness = check_training_current(project)
            if freshness["up_to_date"]:
                _report(project, {}, params_diff, freshness, logger)
                message = ("up to date: the dataset and params are those of MLflow run "
                           f"{freshness['last_run_id']}; nothing to train")
                logger.info(message)
                return Completed(message=message, data={"up_to_date": True, **freshness})

        ensure_gpu_limit(logger)
        results = _run_stages(root, logger)
        mark_run_current(project, logger)
        if results["train"]["ran"]:
            _link(project, logger)
        ran = [n for n, r in results.items() if r["ran"]]
        logger.info("pipeline finished: ran %s", ", ".join(ran) if ran else "nothing (everything up to date)")
        publish = results["publish"].get("summary") or {}
        if publish:
            logger.info("LoRA published to %s", publish.get("s3") or publish.get("folder"))
        _report(project, results, params_diff, freshness, logger)
    return {"up_to_date": False, "stages": results, "params_diff": params_diff, "freshness": freshness}


if __name__ == "__main__":
    import sys

    flux2_lora(project_dir=sys.argv[1] if len(sys.argv) > 1 else None)
