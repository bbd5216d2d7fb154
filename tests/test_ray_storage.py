"""runtime.storage: a Ray job's caches and checkpoints in a place every node sees, here S3 (moto's server on
loopback, real HTTP through pyarrow's S3 filesystem, the one Ray Train uses).

The unit tests drive flux2lora.shared_storage directly (no Ray): inputs uploaded once and skipped when unchanged,
downloaded and checked, checkpoints mirrored and pulled back as the files the recipe resumes from. The cluster
tests run on conftest's session-wide `ray_cluster` (a head and two worker nodes, `ray start` processes on 127.0.0.2,
one CPU each, whose environment holds the S3 credentials and endpoint) with 2 workers: the workers train from S3
while the project's caches are moved away, checkpoints land in the bucket, the LoRA is the one of the same run with
storage null (conftest's `ray_run`, bitwise), and a worker killed after step 1 resumes from the bucket's
checkpoint.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
import yaml
from helpers import REPO
from ray_cluster import S3_BUCKET as BUCKET
from ray_cluster import S3_SECRET as SECRET
from ray_cluster import s3_env as node_s3_env

from flux2lora.shared_storage import INPUTS, MANIFEST, CheckpointMirror, SharedStorage

LORA = "outputs/lora/pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def s3_env(ray_s3):
    """conftest's moto S3 (bucket BUCKET) and, in this process too, the AWS environment the Ray nodes were started
    with (test credentials with SECRET, no ~/.aws)."""
    with pytest.MonkeyPatch.context() as mp:
        for key, value in node_s3_env(ray_s3).items():
            if value is None:
                mp.delenv(key, raising=False)
            else:
                mp.setenv(key, value)
        yield ray_s3


def _storage(tmp_path: Path, where: str, prefix: str) -> SharedStorage:
    from flux2lora.config import Params

    value = f"s3://{BUCKET}/{prefix}" if where == "s3" else str(tmp_path / "shared" / prefix)
    return SharedStorage.from_params(Params.model_validate({"runtime": {"storage": value}}), tmp_path)


def _caches(output_dir: Path) -> None:
    for rel, data in {"latents/index.json": b'{"a": 1}', "latents/shard-0.safetensors": b"x" * 1000,
                      "text_embeds/index.json": b"{}", "text_embeds/sub/shard-0.safetensors": b"y" * 10}.items():
        (output_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        (output_dir / rel).write_bytes(data)


@pytest.mark.parametrize("where", ["s3", "folder"])
def test_inputs_upload_once_and_download_checked(s3_env, tmp_path, where):
    storage = _storage(tmp_path, where, "inputs")
    out = tmp_path / "project" / "outputs"
    _caches(out)
    assert storage.upload_inputs(out) == {"uploaded": 4, "kept": 0, "deleted": 0}
    assert storage.upload_inputs(out) == {"uploaded": 0, "kept": 4, "deleted": 0}  # a rerun uploads nothing
    (out / "latents/shard-0.safetensors").write_bytes(b"z" * 1000)  # same size, other content
    (out / "text_embeds/sub/shard-0.safetensors").unlink()
    assert storage.upload_inputs(out) == {"uploaded": 1, "kept": 2, "deleted": 1}
    manifest = storage.read_manifest()
    assert sorted(manifest) == ["latents/index.json", "latents/shard-0.safetensors", "text_embeds/index.json"]

    node = tmp_path / "node" / "staging"
    assert storage.download_inputs(node) == 3
    assert all((node / rel).read_bytes() == (out / rel).read_bytes() for rel in manifest)
    assert SECRET.encode() not in pickle.dumps(storage)  # what travels to the workers (and into Ray's state)
    assert SECRET.encode() not in pickle.dumps(storage.filesystem)
    storage.write_bytes("latents/index.json", b'{"a": 2}')  # the stored copy changed behind the manifest
    with pytest.raises(OSError, match=r"latents/index.json does not match its sha256"):
        storage.download_inputs(tmp_path / "node2")


def test_the_uploaded_inputs_are_the_ones_dvc_yaml_declares_for_train():
    from flux2lora.stages import caches_read_by

    deps = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["train"]["deps"]
    declared = {d.removeprefix("${output_dir}/") for d in deps} - {"params/train.json"}  # the workers get params
    assert set(INPUTS) == declared == set(caches_read_by("train", None, REPO))


@pytest.mark.parametrize("where", ["s3", "folder"])
def test_checkpoints_mirror_and_pull_back_as_the_recipes_files(s3_env, tmp_path, where):
    from flux2lora.train.checkpoint import latest_matching, list_checkpoints, save_checkpoint

    storage = _storage(tmp_path, where, "ckpt")
    mirror = CheckpointMirror(storage)
    local = tmp_path / "node-a" / "checkpoints"
    for step in (1, 2, 3):
        save_checkpoint(local, step, {"w": torch.full((2,), float(step))}, {"step": step},
                        {"fingerprint": "f1"}, keep=2)
        mirror.push(local)
    assert sorted({rel.split("/")[1] for rel in storage.sizes("checkpoints")}) == ["step-000002", "step-000003"]
    assert mirror.push(local) == 0  # nothing new

    storage.write_bytes("checkpoints/step-000009/lora.safetensors", b"half")  # an upload cut short: ignored
    other = tmp_path / "node-b" / "checkpoints"
    assert mirror.pull(other) == 2 and mirror.pull(other) == 0
    assert [c.step for c in list_checkpoints(other)] == [2, 3]
    newest = latest_matching(other, "f1")
    assert newest.step == 3 and torch.equal(newest.lora["w"], torch.full((2,), 3.0))
    assert newest.training_state() == {"step": 3}
    assert all((other / n / f).read_bytes() == (local / n / f).read_bytes()
               for n in ("step-000002", "step-000003") for f in os.listdir(local / n))


def test_storage_values_that_cannot_work_are_refused_naming_the_key(tmp_path):
    from flux2lora.config import Params, ParamsError, parse_params

    for value, message in [("s3://AKIA:secret@bucket/p", "credentials do not belong in the URI"),
                           ("gs://bucket/p", "a folder every node mounts or s3://"), ("s3:///p", "no bucket")]:
        with pytest.raises(ParamsError, match=message) as e:  # what `flux2lora` prints for params.yaml
            parse_params({"runtime": {"storage": value}})
        assert "runtime.storage" in str(e.value)
    relative = SharedStorage.from_params(Params.model_validate({"runtime": {"storage": "../shared"}}), tmp_path)
    assert relative.uri == str(tmp_path.parent / "shared")


# -- on a real cluster


@pytest.fixture(scope="module")
def on_s3(ray_encoded, ray_cluster, s3_env, tmp_path_factory):
    """The job with runtime.storage on S3, made to depend on it twice over:

    - right after the driver's upload the project's caches are moved away (restored after the job), so a worker
      that read them from the project would fail;
    - FLUX2LORA_FAULT=train:step=1:hold stops the first worker to get past step 1's checkpoint (the checkpoint is
      in the bucket by then: the workers wait for its upload) and it is SIGKILLed by pid; Ray restarts the job
      (ray_max_failures 1) and every worker starts again from an empty node-local folder, so the resumed job can
      only have step 1's checkpoint from the bucket.

    Returns (project, summary, {moved, killed})."""
    from helpers import copy_project
    from ray_cluster import launch, ray_params, worker_killer

    from flux2lora import faults

    root = copy_project(ray_encoded, tmp_path_factory.mktemp("ray-s3"),
                        **ray_params(ray_cluster, **{"runtime.storage": f"s3://{BUCKET}/job",
                                                     "runtime.ray_max_failures": 1}))
    upload = SharedStorage.upload_inputs
    moved: list[tuple[Path, Path]] = []

    def upload_then_move_the_caches_away(self, output_dir):
        counts = upload(self, output_dir)
        for name in INPUTS:
            away = Path(output_dir) / f"{name}.away"
            os.replace(Path(output_dir) / name, away)
            moved.append((away, Path(output_dir) / name))
        return counts

    marker = faults.marker_path(root / "outputs", "train", "step=1")
    killer, killed = worker_killer(marker)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(SharedStorage, "upload_inputs", upload_then_move_the_caches_away)
        mp.setenv("FLUX2LORA_FAULT", "train:step=1:hold")
        killer.start()
        try:
            summary = launch(root)
        finally:
            for away, back in moved:
                os.replace(away, back)
    killer.join(timeout=1)
    return root, summary, {"moved": [back.name for _, back in moved], "killed": killed}


def _params(root: Path):
    from flux2lora.config import load_params

    return load_params(root / "params.yaml")


@pytest.mark.slow
def test_workers_train_from_s3_and_the_lora_metrics_and_run_file_come_back_into_the_project(on_s3, ray_run):
    """The caches were gone from the project while the job ran; checkpoints and Ray's run storage are in the
    bucket, none in the project; the LoRA file is byte-identical to the storage-null run's."""
    from flux2lora.layout import layout_for

    root, summary, events = on_s3
    assert sorted(events["moved"]) == sorted(INPUTS)
    assert summary["steps"] == 2 and summary["processes"] == 2
    storage = SharedStorage.from_params(_params(root), root)
    objects = storage.sizes("")
    assert {f"checkpoints/step-000001/{f}" for f in ("lora.safetensors", "training_state.pt", "state.json")} | \
        {MANIFEST} <= set(objects)
    assert any(rel.startswith("ray_runs/") for rel in objects)  # Ray Train's own run storage
    assert not (root / "outputs/checkpoints").exists()  # nothing of the job's was written in the project
    layout = layout_for(root, "outputs")
    assert layout.run_file.exists() and layout.train_metrics.exists()
    assert (root / LORA).read_bytes() == (ray_run[0] / LORA).read_bytes()
    assert storage.upload_inputs(root / "outputs")["uploaded"] == 0  # a rerun uploads nothing
    assert str(root) not in storage.read_bytes(MANIFEST).decode()  # relative names only
    # the credentials are the nodes' own: in no object of the bucket (Ray's run state included), nor in MLflow
    assert not [rel for rel in objects if SECRET.encode() in storage.read_bytes(rel)]
    assert SECRET.encode() not in (root / "mlflow.db").read_bytes()


@pytest.mark.slow
def test_a_worker_killed_mid_training_resumes_from_the_checkpoint_in_s3(on_s3, ray_run):
    """The killed worker's job resumed from step 1 (which only the bucket held) and ended bitwise equal to the
    uninterrupted run."""
    import psutil

    root, summary, events = on_s3
    assert events["killed"], "no worker reached the fault"
    assert not psutil.pid_exists(events["killed"][0])
    assert summary["resumed_from_step"] == 1 and summary["steps"] == 2
    assert (root / LORA).read_bytes() == (ray_run[0] / LORA).read_bytes()
