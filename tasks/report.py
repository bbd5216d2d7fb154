"""The run's report: a Prefect markdown artifact per flow run, with what a user checks first.

Created by the flow itself after the stages (not a task of its own: a run's task runs are its stages).

Images and captions accepted and skipped (with reasons), cache hits of both encoders, training speed and final
loss, links to the MLflow run and to the published files. It reads the stages' output files, so a stage that DVC
skipped still reports the state it left.
"""

from __future__ import annotations

import json
from pathlib import Path

from prefect.artifacts import create_link_artifact, create_markdown_artifact

from flux2lora import tracking
from flux2lora.config import PARAMS_FILE, load_params
from flux2lora.layout import layout_for


ARTIFACT_KEY = "flux2-lora-run"
LINK_KEY = "mlflow-run"  # the link artifact to the MLflow run page of the flow run's training
CAPTION_REASONS = ("missing_caption", "empty_caption", "undecodable_caption")


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _mlflow_run(params, root: Path, run_id: str) -> tuple[str, float | None]:
    """A link (or how to open it) to the MLflow run, and steps/s from the logged step times."""
    from mlflow.tracking import MlflowClient

    uri = tracking.tracking_uri(params, root)
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    if uri.startswith(("http://", "https://")):
        link = f"[{run.info.run_name}]({tracking.run_url(uri, run.info.experiment_id, run_id, 'model-metrics')})"
    else:
        link = (f"`{run.info.run_name}` ({run_id}): `MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false mlflow ui "
                f"--backend-store-uri {uri} --workers 1`")
    times = [m.value for m in client.get_metric_history(run_id, "step_time_s")]
    return link, (len(times) / sum(times) if times and sum(times) > 0 else None)


def _stage_line(name: str, result: dict | None) -> str:
    if result is None:
        return f"| {name} | not run |"
    if not result.get("ran"):
        return f"| {name} | up to date (dvc.lock) |"
    return f"| {name} | ran, {result.get('seconds', 0):.1f} s |"


def report_markdown(root: Path, results: dict[str, dict], params_diff: str = "", freshness: dict | None = None) -> str:
    """The report of one flow run over the project in `root`; `results`: pipeline_stage's answer per stage."""
    params = load_params(root / PARAMS_FILE)
    layout = layout_for(root, params.output_dir)
    lines = ["# flux2-lora run", ""]
    if freshness is not None:
        lines += [f"**{'Up to date' if freshness['up_to_date'] else 'Retraining'}**: "
                  + (f"dataset `{freshness['dataset_hash']}` and params `{freshness['params_hash']}` are those of "
                     f"MLflow run `{freshness['last_run_id']}`; nothing ran." if freshness["up_to_date"]
                     else "; ".join(freshness["reasons"])), ""]
    if params_diff:
        lines += ["## params.yaml changed by this run", "", "```diff", params_diff.rstrip(), "```", ""]
    if results:
        lines += ["## Stages", "", "| stage | this run |", "|---|---|",
                  *(_stage_line(name, results.get(name)) for name in results), ""]

    prepared = _read_json(layout.prepare_report)
    if prepared:
        reasons = prepared.get("skipped_by_reason", {})
        caption_skips = sum(n for r, n in reasons.items() if r in CAPTION_REASONS)
        lines += ["## Data", "",
                  f"- images: {prepared.get('accepted', 0)} accepted, {prepared.get('skipped', 0)} skipped of "
                  f"{prepared.get('candidates', 0)}",
                  f"- captions: {prepared.get('accepted', 0)} accepted, {caption_skips} images skipped for their "
                  "caption"]
        lines += [f"  - skipped, {reason}: {n}" for reason, n in sorted(reasons.items())]
        for name, dataset in (prepared.get("datasets") or {}).items():
            lines.append(f"- dataset `{name}` ({dataset.get('folder', '')}): {dataset.get('accepted', 0)} accepted, "
                         f"{dataset.get('skipped', 0)} skipped")
        lines.append("")

    caches = []
    for stage, what in (("encode-text", "prompt embeddings"), ("encode-latents", "latents")):
        summary = (results.get(stage) or {}).get("summary")
        if summary:
            caches.append(f"- {what}: {summary['reused']} reused from the cache, {summary['encoded']} encoded, "
                          f"{summary.get('pruned', 0)} pruned")
        elif stage in results:
            caches.append(f"- {what}: up to date, nothing encoded")
    if caches:
        lines += ["## Caches", "", *caches, ""]

    metrics = _read_json(layout.train_metrics)
    run = _read_json(layout.run_file)
    if metrics and run:
        link, steps_per_s = _mlflow_run(params, root, run["run_id"])
        lines += ["## Training", "", f"- MLflow run: {link}",
                  f"- steps: {metrics['steps']} (resumed from step {metrics.get('resumed_from_step', 0)})",
                  f"- final loss: {metrics['final_loss']:.4f}"]
        if steps_per_s:
            lines.append(f"- speed: {steps_per_s:.2f} steps/s (mean of the logged step times)")
        lines.append("")

    published = _read_json(layout.output_dir / "publish.json")
    if published:
        lines += ["## Published", "", f"- folder: `{published['folder']}`: {', '.join(published['files'])}"]
        if published.get("s3"):
            lines.append(f"- S3: `{published['s3']}`")
        if published.get("hub"):
            lines.append(f"- Hub: [{published['hub']}]({published['hub']})")
        if published.get("registered_model"):
            model = published["registered_model"]
            lines.append(f"- MLflow registered model: `{model['name']}` version {model['version']}")
        lines.append("")
    return "\n".join(lines)


def publish_run_report(project_dir: str, results: dict[str, dict], params_diff: str = "",
                       freshness: dict | None = None) -> str:
    """Create the run's markdown artifact (key flux2-lora-run) in the current flow run; returns the markdown."""
    markdown = report_markdown(Path(project_dir), results, params_diff, freshness)
    create_markdown_artifact(markdown=markdown, key=ARTIFACT_KEY, description="flux2-lora run report")
    return markdown


def link_mlflow_run(project_dir: str) -> dict[str, str]:
    """After a train stage that ran in this flow run: name the flow run after the MLflow run it logged to (the same
    name on both pages; the train stage names a new MLflow run after the flow run already, this covers
    `tracking.run_name` and resumed runs), and, on an MLflow server, link the run's Model metrics page as the link
    artifact LINK_KEY (with workflowType=machine_learning). Returns the MLflow run's name, id and page URL ("" on a
    local store, which has no page)."""
    from mlflow.tracking import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run

    root = Path(project_dir)
    params = load_params(root / PARAMS_FILE)
    run_id = json.loads(layout_for(root, params.output_dir).run_file.read_text())["run_id"]
    uri = tracking.tracking_uri(params, root)
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    name = run.info.run_name
    if flow_run.id and flow_run.name != name:
        with get_client(sync_client=True) as prefect:
            prefect.update_flow_run(flow_run.id, name=name)
        client.set_tag(run_id, "prefect.flow_run.name", name)
    url = ""
    if uri.startswith(("http://", "https://")):
        url = tracking.run_url(uri, run.info.experiment_id, run_id, "model-metrics")
        create_link_artifact(link=url, link_text=f"MLflow run {name}", key=LINK_KEY,
                             description="The MLflow run of this flow run's training: loss, validation grid, LoRA")
    return {"run_name": name, "run_id": run_id, "url": url}
