"""The `publish` stage: the LoRA in two formats, its model card, samples and params into `outputs/publish/`, then
S3, the Hugging Face Hub and the MLflow model registry, each when configured.

Order matters: the folder is assembled first; S3 and the Hub receive it; only a LoRA that reached every
configured destination is registered (alias `candidate`), with those locations as version tags. A failure stops
the stage before the registry, and the S3 folder is left without its manifest (see `s3.py`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
from pathlib import Path

from boto3.exceptions import S3UploadFailedError

from .. import tracking
from ..config import Params
from ..data.config import relative_to_root
from ..errors import PublishFailed
from ..export import export_bfl
from ..io import sha256_of, write_json_atomic, write_text_atomic
from ..layout import layout_for
from ..train.lora import read_lora_metadata
from .model_card import model_card
from .s3 import MIB, PublishVerificationError, TransferSettings, upload_folder

log = logging.getLogger(__name__)

SAMPLES = "samples.png"


DORA_NOTE = ("This is a DoRA adapter: it loads at its trained strength with diffusers' `load_lora_weights` and "
             "peft, not in ComfyUI (whose DoRA normalises the weight's input columns where peft's normalises its "
             "output rows), so no BFL / ComfyUI file is published.")


def bfl_file_name(run_name: str) -> str:
    """`<run-name>_bfl.safetensors`, the name ComfyUI lists it under (unsafe characters replaced)."""
    return f"{re.sub(r'[^A-Za-z0-9._-]+', '_', run_name).strip('._') or 'lora'}_bfl.safetensors"


def add_metadata(path: Path, extra: dict[str, str]) -> None:
    """Rewrite a safetensors file with `extra` added to its metadata (keys sorted: identical inputs, identical
    bytes)."""
    from safetensors import safe_open

    from ..io import write_safetensors_atomic

    with safe_open(str(path), framework="pt") as f:
        metadata = {**(f.metadata() or {}), **extra}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    write_safetensors_atomic(path, tensors, metadata)


def transfer_settings(params: Params) -> TransferSettings:
    cfg = params.publish
    return TransferSettings(multipart_threshold=int(cfg.s3_multipart_threshold_mb * MIB),
                            multipart_chunksize=int(cfg.s3_multipart_chunksize_mb * MIB),
                            max_attempts=cfg.s3_max_attempts)


# Answers a retry can change: the store was busy or down (botocore has already retried these s3_max_attempts times).
_TRANSIENT_S3_CODES = {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "RequestTimeTooSkewed",
                       "500", "502", "503", "504"}


@contextlib.contextmanager
def publish_errors(key: str, destination: str):
    """Turn a refused or failed upload into PublishFailed naming `key` and what to check. Connection failures
    (after botocore's and huggingface_hub's own retries) are not permanent: the store may come back."""
    from botocore.exceptions import (BotoCoreError, ClientError, ConnectionClosedError, ConnectTimeoutError,
                                     EndpointConnectionError, NoCredentialsError, ReadTimeoutError)

    try:
        yield
    except PublishVerificationError as e:
        raise PublishFailed(f"{key} {destination}: an upload did not verify ({e}); nothing was registered and the "
                            "folder has no manifest. Run publish again (dvc repro)", permanent=False) from e
    except NoCredentialsError as e:
        raise PublishFailed(f"{key} {destination}: no AWS credentials ({e}); set AWS_ACCESS_KEY_ID / "
                            "AWS_SECRET_ACCESS_KEY or AWS_PROFILE (never params.yaml), then run publish again") from e
    except (ClientError, BotoCoreError, S3UploadFailedError) as e:
        cause = e.__context__ if isinstance(e, S3UploadFailedError) else e
        code = cause.response.get("Error", {}).get("Code", "") if isinstance(cause, ClientError) else ""
        transient = isinstance(cause, (EndpointConnectionError, ConnectionClosedError, ConnectTimeoutError,
                                       ReadTimeoutError)) or code in _TRANSIENT_S3_CODES
        raise PublishFailed(
            f"{key} {destination}: S3 refused the publish ({type(e).__name__}: {e}). Check the bucket name, the "
            "credentials (AWS_* environment or ~/.aws, never params.yaml) and publish.s3_endpoint_url; nothing was "
            "registered and the folder has no manifest. Run publish again once fixed", permanent=not transient) from e
    except (OSError, ValueError) as e:  # huggingface_hub: HfHubHTTPError (an OSError), offline mode, bad ids
        if key != "publish.hub_repo_id":
            raise
        status = getattr(getattr(e, "response", None), "status_code", None)
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise PublishFailed(
            f"{key} {destination}: the Hugging Face Hub refused the push ({type(e).__name__}: {first}). "
            "Check the repo id, your token (HF_TOKEN or `huggingface-cli login`, with write access) and the "
            "connection; nothing was registered. Run publish again once fixed",
            permanent=status in (400, 401, 403, 404) or isinstance(e, ValueError)) from e


def selection_of(metrics: dict) -> dict:
    """The published LoRA's step when train.checkpoint_selection best_eval chose it, and its eval loss (from
    train/metrics.json): for the model card and the registry's version tags."""
    best = metrics.get("checkpoint_selection") == "best_eval"
    eval_loss = metrics.get("best_eval_loss") if best else metrics.get("eval_loss")
    return {"selected_step": metrics.get("selected_step") if best else None, "eval_loss": eval_loss}


def publish(params: Params, root: Path) -> dict:
    """Assemble the publish folder; upload it to S3 / the Hub when configured; tag the MLflow run; register.

    Returns (and writes to `publish.json`) {"folder", "files", "s3", "hub", "registered_model"}.
    """
    layout = layout_for(root, params.output_dir)
    run_id = tracking.read_run_id(layout.run_file)
    run_name = json.loads(layout.run_file.read_text()).get("run_name") or run_id
    metrics = json.loads(layout.train_metrics.read_text())
    lora_meta = read_lora_metadata(layout.lora_file)
    mlflow = tracking.configure(params, root)
    train_tags = mlflow.get_run(run_id).data.tags

    out = layout.publish_dir
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    diffusers_file = out / layout.lora_file.name
    shutil.copy2(layout.lora_file, diffusers_file)
    # DoRA has no BFL / ComfyUI file: ComfyUI's DoRA normalises each input column of the weight, peft's (what was
    # trained) each output row, so no dora_scale would give ComfyUI the trained weights
    dora = lora_meta.get("flux2lora.kind") == "dora"
    bfl_file = None if dora else export_bfl(layout.lora_file, out / bfl_file_name(run_name))
    # the trigger phrase is publish's alone: train's LoRA does not carry it, so changing it re-runs nothing else
    for published in (diffusers_file, *([bfl_file] if bfl_file else [])):
        add_metadata(published, {"flux2lora.trigger_phrase": params.publish.trigger_phrase})
    grid = layout.validation_dir / "grid.png"
    if grid.exists():
        shutil.copy2(grid, out / SAMPLES)

    cfg, flavour, model = params.publish, params.model.flavour, params.model
    # the training run's tag (train read dvc.lock when it opened the run); publish declares the run, not dvc.lock
    dataset_hash = train_tags.get("dataset_dvc_hash", "untracked")
    is_hub_model = not Path(model.model_path).exists()
    write_text_atomic(out / "README.md", model_card(
        base_model=model.model_id, flavour=model.model_flavour, pipeline_class=flavour.pipeline_class,
        licence=flavour.licence, trigger_phrase=cfg.trigger_phrase,
        rank=int(lora_meta.get("flux2lora.rank", params.train.lora_rank)),
        alpha=float(lora_meta.get("flux2lora.alpha", params.train.lora_alpha or params.train.lora_rank)),
        steps=metrics["steps"], final_loss=metrics["final_loss"], dataset_hash=dataset_hash, run_id=run_id,
        grid_file=SAMPLES if grid.exists() else None, diffusers_file=diffusers_file.name,
        bfl_file=bfl_file.name if bfl_file else None,
        repo_id=cfg.hub_repo_id, base_model_url=f"https://huggingface.co/{model.model_id}" if is_hub_model else None,
        git_commit=train_tags.get("git_commit"),
        warning=" ".join(w for w in (lora_meta.get("flux2lora.distilled_warning"), DORA_NOTE if dora else None) if w)
        or None, dora=dora, kind=lora_meta.get("flux2lora.kind", "lora"), **selection_of(metrics)))
    # params.yaml holds no credentials by design (tokens and keys come from the environment), so this is safe.
    write_json_atomic(out / "params.json", params.model_dump(by_alias=True, mode="json"))

    # the folder relative to the project (publish.json is byte-stable and relocatable), absolute when outside it
    folder = relative_to_root(out, root)
    result = {"folder": folder, "files": sorted(p.name for p in out.iterdir()), "s3": None, "hub": None,
              "registered_model": None}
    if cfg.s3_uri:
        uri = f"{cfg.s3_uri.rstrip('/')}/{run_name}"
        with publish_errors("publish.s3_uri", uri):
            result["s3"] = upload_folder(out, uri, cfg.s3_endpoint_url, settings=transfer_settings(params))["uri"]
    if cfg.hub_repo_id:
        from .hub import push_to_hub

        with publish_errors("publish.hub_repo_id", cfg.hub_repo_id):
            result["hub"] = push_to_hub(out, cfg.hub_repo_id, private=cfg.hub_private,
                                        commit_message=f"LoRA from MLflow run {run_id} ({run_name})")["url"]

    with mlflow.start_run(run_id=run_id) as run:
        mlflow.set_tags({"published_folder": str(out),
                         **({"published_s3": result["s3"]} if result["s3"] else {}),
                         **({"published_hub": result["hub"]} if result["hub"] else {})})
        mlflow.log_artifacts(str(out), artifact_path="publish")
        if cfg.registered_model_name:
            from ..registry import register_lora

            version = register_lora(cfg.registered_model_name, run_id, f"{run.info.artifact_uri}/publish", tags={
                "git_commit": train_tags.get("git_commit"), "dataset_dvc_hash": dataset_hash,
                "flavour": model.model_flavour, "base_model": model.model_id,
                "lora_sha256": sha256_of(diffusers_file), "lora_file": diffusers_file.name,
                **({"bfl_file": bfl_file.name} if bfl_file else {}), "s3_uri": result["s3"],
                "hub_url": result["hub"], **{k: str(v) for k, v in selection_of(metrics).items() if v is not None}})
            result["registered_model"] = {"name": cfg.registered_model_name, "version": str(version.version)}
    write_json_atomic(layout.output_dir / "publish.json", result)
    log.info("publish: %s%s%s", out, f", {result['s3']}" if result["s3"] else "",
             f", {result['hub']}" if result["hub"] else "")
    return result
