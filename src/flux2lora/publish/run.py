"""The `publish` stage: the LoRA, its model card and the validation grid into `outputs/publish/`, then S3."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from .. import tracking
from ..config import Params
from ..io import write_json_atomic, write_text_atomic
from ..layout import layout_for
from .model_card import model_card
from .s3 import upload_folder

log = logging.getLogger(__name__)


def publish(params: Params, root: Path) -> dict:
    """Assemble the publish folder; upload it when `publish.s3_uri` is set; record locations in MLflow."""
    layout = layout_for(root, params.output_dir)
    run_id = tracking.read_run_id(layout.run_file)
    run_name = json.loads(layout.run_file.read_text()).get("run_name") or run_id
    metrics = json.loads(layout.train_metrics.read_text())
    out = layout.publish_dir
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    shutil.copy2(layout.lora_file, out / layout.lora_file.name)
    grid = layout.validation_dir / "grid.png"
    if grid.exists():
        shutil.copy2(grid, out / "samples.png")
    cfg, flavour = params.train, params.model.flavour
    write_text_atomic(out / "README.md", model_card(
        base_model=params.model.model_path, flavour=params.model.model_flavour,
        pipeline_class=flavour.pipeline_class, licence=flavour.licence,
        trigger_phrase=params.publish.trigger_phrase, rank=cfg.lora_rank, alpha=cfg.lora_alpha or cfg.lora_rank,
        steps=metrics["steps"], final_loss=metrics["final_loss"],
        dataset_hash=tracking.dataset_dvc_hash(root, params.prepare.instance_data_dir), run_id=run_id,
        grid_file="samples.png" if grid.exists() else None))
    # Only non-secret params are written (params.yaml holds no credentials by design).
    write_json_atomic(out / "params.json", params.model_dump(by_alias=True, mode="json"))

    result = {"folder": str(out), "files": sorted(p.name for p in out.iterdir()), "s3": None}
    if params.publish.s3_uri:
        uri = f"{params.publish.s3_uri.rstrip('/')}/{run_name}"
        result["s3"] = upload_folder(out, uri, params.publish.s3_endpoint_url)["uri"]
    mlflow = tracking.configure(params, root)
    with mlflow.start_run(run_id=run_id):
        mlflow.set_tags({"published_folder": str(out), **({"published_s3": result["s3"]} if result["s3"] else {})})
        mlflow.log_artifact(str(out / "README.md"), artifact_path="publish")
    write_json_atomic(layout.output_dir / "publish.json", result)
    log.info("publish: %s%s", out, f" and {result['s3']}" if result["s3"] else "")
    return result
