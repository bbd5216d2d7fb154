"""The MLflow model registry: every published LoRA is a version of a registered model (`publish.registered_model_name`).

A new version gets alias `candidate`; `flux2lora promote RUN_ID_OR_VERSION` moves alias `champion` to it. Versions
are tagged with what identifies the LoRA and where it went: git commit, dataset DVC hash, flavour, base model, the
LoRA file's sha256, S3 and Hub locations. Publishing the same LoRA of the same run again updates its version
instead of adding one, so re-running publish is idempotent here too.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

CANDIDATE = "candidate"
CHAMPION = "champion"


def _client(client=None):
    from mlflow import MlflowClient

    return client or MlflowClient()


def ensure_registered_model(name: str, client=None) -> None:
    """Create the registered model unless it exists (also when another process creates it at the same time)."""
    from mlflow.exceptions import MlflowException

    client = _client(client)
    try:
        client.get_registered_model(name)
        return
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
    try:
        client.create_registered_model(name, description="FLUX.2 LoRAs trained and published by flux2lora",
                                       tags={"library": "flux2lora"})
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def register_lora(name: str, run_id: str, source: str, tags: dict[str, str], client=None):
    """Register the LoRA published by `run_id` (artifacts at `source`) and give it alias `candidate`.

    `tags` must include `lora_sha256`: a version of the same run with the same sha256 is reused (tags updated).
    Returns the ModelVersion.
    """
    client = _client(client)
    ensure_registered_model(name, client)
    tags = {k: str(v) for k, v in tags.items() if v not in (None, "")}
    same = [v for v in client.search_model_versions(f"name='{name}' and run_id='{run_id}'")
            if v.tags.get("lora_sha256") == tags.get("lora_sha256")]
    if same:
        version = max(same, key=lambda v: int(v.version))
        log.info("registry: %s version %s already holds this LoRA; updating its tags", name, version.version)
    else:
        version = client.create_model_version(name, source, run_id=run_id, tags=tags,
                                              description=f"LoRA of MLflow run {run_id}")
    for key, value in tags.items():
        client.set_model_version_tag(name, version.version, key, value)
    client.set_registered_model_alias(name, CANDIDATE, version.version)
    log.info("registry: %s version %s is the %s", name, version.version, CANDIDATE)
    return client.get_model_version(name, version.version)


def resolve_version(name: str, ref: str, client=None):
    """A version number ("3" or "v3") or an MLflow run id (its newest version) -> the ModelVersion."""
    from mlflow.exceptions import MlflowException

    client = _client(client)
    number = ref[1:] if ref[:1] in "vV" and ref[1:].isdigit() else ref
    if number.isdigit():
        try:
            return client.get_model_version(name, number)
        except MlflowException:
            raise ValueError(f"registered model {name!r} has no version {number}") from None
    versions = client.search_model_versions(f"name='{name}' and run_id='{ref}'")
    if not versions:
        raise ValueError(f"registered model {name!r} has no version from run {ref!r} (publish that run first, "
                         "or pass a version number)")
    return max(versions, key=lambda v: int(v.version))


def promote(name: str, ref: str, alias: str = CHAMPION, client=None) -> dict:
    """Point `alias` (default `champion`) at the version `ref` names. Returns {"version", "previous", "run_id"}."""
    from mlflow.exceptions import MlflowException

    client = _client(client)
    version = resolve_version(name, ref, client)
    try:
        previous = client.get_model_version_by_alias(name, alias).version
    except MlflowException:
        previous = None
    client.set_registered_model_alias(name, alias, version.version)
    log.info("registry: %s alias %s -> version %s (was %s)", name, alias, version.version, previous)
    return {"name": name, "alias": alias, "version": str(version.version),
            "previous": None if previous is None else str(previous), "run_id": version.run_id}
