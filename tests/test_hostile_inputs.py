"""Hostile inputs, damaged caches and unlucky users end cleanly (issue 18): each failure is a message naming the file
or key and what to do, with exit code 2 and no traceback; nothing in outputs/ or S3 changes where it should not; a
rerun after the fix completes. Real components throughout: the `flux2lora` command in subprocesses, real DVC, real
MLflow, moto's S3 server on loopback; the Hub is reached only through huggingface_hub in offline mode (no network
here), which refuses the push as an unreachable Hub would.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_project, project_env, run, set_params
from PIL import Image
from typer.testing import CliRunner

from flux2lora.cli import app
from flux2lora.config import ParamsError
from flux2lora.errors import DeviceUnavailable, ModelNotFound, PublishFailed, UserError

REPO = Path(__file__).resolve().parents[1]
FLUX2LORA = [sys.executable, "-m", "flux2lora.cli"]


def flux2lora(args: list[str], cwd: Path, timeout: int = 600, **env) -> subprocess.CompletedProcess:
    """`flux2lora ARGS` in a subprocess (not checked: the tests look at its exit code, stdout and stderr)."""
    return subprocess.run(FLUX2LORA + args, cwd=cwd, env=project_env(**env), capture_output=True, text=True,
                          timeout=timeout)


def assert_user_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    """Exit code 2, a one-message error naming what is given in `needles`, and no traceback."""
    assert proc.returncode == 2, \
        f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    message = proc.stderr[proc.stderr.index("error: "):]
    for needle in needles:
        assert needle in message, f"{needle!r} not in the message:\n{message}"
    assert not proc.stdout.strip(), proc.stdout  # nothing on stdout: no half summary


def assert_json_summary(proc: subprocess.CompletedProcess, stage: str) -> dict:
    """A `flux2lora stage STAGE --json` that succeeded: stdout is exactly one JSON object (its summary), its logs
    went to stderr. Returns the summary."""
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert isinstance(summary, dict) and summary, stage
    assert proc.stdout.count("\n") == 1, stage
    assert proc.stderr.strip(), f"{stage}: its logs should be on stderr"
    return summary


def tree_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, by relative path (what 'nothing changed here' compares); DVC's own
    .gitignore files are left out."""
    if not folder.exists():
        return {}
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".gitignore"}


def params_only_project(tmp_path: Path) -> Path:
    """The repo's params.yaml and prompt library with a small generated dataset: enough for check-params and
    prepare (neither loads a model)."""
    from flux2lora.demo import make_demo_dataset

    root = tmp_path / "project"
    root.mkdir()
    for name in ("params.yaml", "user_prompt_library.json"):
        shutil.copy2(REPO / name, root / name)
    make_demo_dataset(root / "data" / "demo", count=4)
    return root


# --------------------------------------------------------------------------------------------------------------
# 4. check-params refuses up front what a later stage would refuse


@pytest.mark.parametrize("key,value,needles", [
    ("validate.validation_resolution", "abc", ["validate.validation_resolution", "'abc'", "WIDTHxHEIGHT"]),
    ("validate.validation_resolution", "1000x1000", ["validate.validation_resolution", "multiples of 16"]),
    ("publish.s3_uri", "my-bucket/loras", ["publish.s3_uri", "s3://bucket/prefix"]),
    ("publish.s3_uri", "s3://my-bucket", ["publish.s3_uri", "bucket's root"]),
    ("publish.s3_endpoint_url", "localhost:9000", ["publish.s3_endpoint_url", "http://"]),
    ("publish.hub_repo_id", "me/my lora", ["publish.hub_repo_id"]),
    ("output_dir", "data/outputs", ["prepare.data_root", "contains output_dir", "data/outputs"]),
])
def test_check_params_refuses_values_a_later_stage_would_refuse(tmp_path, key, value, needles):
    root = params_only_project(tmp_path)
    good = (root / "params.yaml").read_text()
    set_params(root, **{key: value})
    result = CliRunner().invoke(app, ["check-params", "--params", str(root / "params.yaml")])
    assert result.exit_code == 2, result.output
    for needle in needles:
        assert needle in result.output, result.output
    assert "Traceback" not in result.output
    assert not (root / "outputs").exists() and not (root / "data" / "outputs").exists()
    (root / "params.yaml").write_text(good)  # the fix
    result = CliRunner().invoke(app, ["check-params", "--params", str(root / "params.yaml")])
    assert result.exit_code == 0 and "ok" in result.output, result.output


def test_a_key_given_twice_is_refused_as_dvc_refuses_it(tmp_path):
    root = params_only_project(tmp_path)
    path = root / "params.yaml"
    good = path.read_text()
    path.write_text(good.replace("  lora_rank: 8\n", "  lora_rank: 8\n  lora_alpha: 8\n  lora_rank: 4\n", 1))
    result = CliRunner().invoke(app, ["check-params", "--params", str(path)])
    assert result.exit_code == 2 and "'lora_rank' appears twice" in result.output, result.output
    assert str(path) in result.output
    # DVC agrees: it refuses the same file (so the pipeline never silently takes the last value)
    run(["git", "init", "-q"], root)
    run(["dvc", "init", "-q"], root)
    shutil.copy2(REPO / "dvc.yaml", root / "dvc.yaml")
    proc = subprocess.run(["dvc", "status"], cwd=root, env=project_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "lora_rank" in proc.stdout + proc.stderr
    path.write_text(good)
    assert CliRunner().invoke(app, ["check-params", "--params", str(path)]).exit_code == 0


def test_user_errors_are_permanent_for_the_flow_except_a_damaged_cache_entry():
    from tasks.retries import _permanent

    from flux2lora.cache.store import CacheEntryDamaged

    assert issubclass(ParamsError, UserError)
    for exc in (ParamsError("x"), ModelNotFound("x"), DeviceUnavailable("x"), PublishFailed("x")):
        assert _permanent(exc), exc
    # an unreachable store may come back, and the next train run re-encodes a damaged entry first
    assert not _permanent(PublishFailed("x", permanent=False))
    assert not _permanent(CacheEntryDamaged("x"))
    assert not _permanent(OSError("disk full"))


def test_a_damaged_entry_read_directly_names_its_shard_and_what_to_do(tmp_path):
    from flux2lora.cache.store import CacheEntryDamaged, TensorStore

    with TensorStore(tmp_path / "store", write_batch_size=1) as store:
        store.put("k", {"t": torch.arange(64, dtype=torch.float32)})
    shard = next((tmp_path / "store" / "shards").glob("*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-8] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CacheEntryDamaged) as caught:
        TensorStore(tmp_path / "store").get("k")
    assert isinstance(caught.value, UserError) and shard.name in str(caught.value)
    assert "dvc repro" in str(caught.value)


def test_device_that_is_not_there_is_a_message(monkeypatch):
    from flux2lora.models import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # this machine has no GPU either way
    with pytest.raises(DeviceUnavailable, match=r"model.device: 'cuda:0'.*CUDA is not available.*auto"):
        resolve_device("cuda:0")
    with pytest.raises(DeviceUnavailable, match="not a device name"):
        resolve_device("gpu0")
    assert resolve_device("cpu").type == "cpu"


# --------------------------------------------------------------------------------------------------------------
# 2. a memory guard on the planned bucket


def strip_png(path: Path, width: int = 16, height: int = 8000) -> None:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(path)


def test_a_16x8000_strip_at_1024_is_never_held_as_a_1024x512000_image(tmp_path):
    from flux2lora.data.buckets import (MAX_RESIZE_OVER_BUCKET, apply_plan, aspect_out_of_range, aspect_range,
                                        plan_crop, working_size)
    from flux2lora.data.config import DatasetOptions

    strip = tmp_path / "strip.png"
    strip_png(strip)
    image = Image.open(strip).convert("RGB")
    for crop_aspect in ("square", "preserve", "closest", "random"):
        options = DatasetOptions(crop=True, crop_aspect=crop_aspect, crop_style="center", resolution=1024,
                                 resolution_type="pixel")
        plan = plan_crop(16, 8000, options, "seed")
        low, high = aspect_range(options)
        assert low <= plan.bucket[0] / plan.bucket[1] <= high, plan
        held = working_size(plan)
        assert held == plan.bucket and held[0] * held[1] <= 1024 * 2048, plan  # not 1024 x 512000
        assert held[0] * held[1] <= MAX_RESIZE_OVER_BUCKET * plan.bucket[0] * plan.bucket[1]
        assert apply_plan(image, plan).size == plan.bucket
    uncropped = DatasetOptions(crop=False, resolution=1024, resolution_type="pixel")
    assert "outside the buckets' range 0.5..2" in aspect_out_of_range(16, 8000, uncropped)
    with pytest.raises(ValueError, match="crop: true"):
        plan_crop(16, 8000, uncropped, "seed")
    # ordinary images keep the exact resize-then-crop they always had
    ordinary = plan_crop(1600, 900, DatasetOptions(crop=True, crop_aspect="square", resolution=1024), "s")
    assert working_size(ordinary) == ordinary.resize


def test_prepare_skips_an_uncropped_strip_with_its_reason_and_crops_it_when_crop_is_on(tmp_path):
    from flux2lora.stages import run_stage

    root = params_only_project(tmp_path)
    strip_png(root / "data" / "demo" / "strip.png")
    (root / "data" / "demo" / "strip.txt").write_text("a very tall strip")
    set_params(root, **{"prepare.crop": False, "prepare.resolution": 1024, "prepare.resolution_type": "pixel",
                        "prepare.minimum_image_size": 0})
    summary = run_stage("prepare", root / "params.yaml")
    report = json.loads((root / "outputs/prepare/report.json").read_text())
    skipped = {s["file"]: s for s in report["skipped_files"]}
    assert summary["skipped_by_reason"] == {"aspect_ratio": 1}
    assert "strip.png" in skipped["strip.png"]["detail"] and "crop: true" in skipped["strip.png"]["detail"]
    assert str(root) not in json.dumps(report)  # relocatable: no absolute paths
    set_params(root, **{"prepare.crop": True, "prepare.crop_aspect": "preserve"})  # the fix the message suggests
    run_stage("prepare", root / "params.yaml")
    rows = {json.loads(line)["id"]: json.loads(line) for line in
            (root / "outputs/prepare/images.jsonl").read_text().splitlines()}
    assert rows["strip.png"]["bucket"] == [1024, 2048]  # cropped to the 1:2 end of the buckets' range


# --------------------------------------------------------------------------------------------------------------
# 1. symlinks in datasets, under real `dvc repro` and the flow's DVC check


@pytest.mark.slow
def test_dangling_symlinks_are_skipped_and_hidden_from_dvc_links_outside_are_followed(tmp_path, monkeypatch):
    from flux2lora.stages import DvcPipeline

    root = make_project(tmp_path / "project", images=4)
    demo = root / "data" / "demo"
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copy2(demo / "shape_000.png", outside / "extra.png")
    (demo / "extra.png").symlink_to(outside / "extra.png")
    (demo / "extra.txt").write_text("a linked image from outside data_root")
    (demo / "gone.png").symlink_to(tmp_path / "no-such-file.png")
    (demo / "gone.txt").write_text("its image is gone")
    (demo / "linked-folder").symlink_to(outside, target_is_directory=True)

    # a plain first `dvc repro`, nothing of flux2lora's run before: its `params` stage hides the link from DVC
    run(["dvc", "repro", "prepare"], root)
    assert "/data/demo/gone.png" in (root / ".dvcignore").read_text()
    report = json.loads((root / "outputs/prepare/report.json").read_text())
    reasons = {s["file"]: s["reason"] for s in report["skipped_files"]}
    assert reasons == {"gone.png": "dangling_symlink", "linked-folder": "linked_folder"}
    assert report["linked_outside_data_root"] == ["data/demo/extra.png"] and report["accepted"] == 5
    assert "prepare" not in run(["dvc", "status", "prepare"], root).stdout
    # DVC hashes what the outside link points to: editing the target re-runs prepare
    shutil.copy(demo / "shape_001.png", outside / "extra.png")  # new content, new mtime
    assert "changed deps" in run(["dvc", "status", "prepare"], root).stdout

    # a link that breaks once `params` is up to date stops a plain `dvc repro` in DVC itself (documented; DVC has no
    # hook before hashing); check-params names it and hides it, and the rerun continues
    (demo / "later.png").symlink_to(tmp_path / "gone-later.png")
    stopped = subprocess.run(["dvc", "repro", "prepare"], cwd=root, env=project_env(), capture_output=True, text=True,
                             timeout=300)
    assert stopped.returncode != 0 and "later.png" in stopped.stderr + stopped.stdout
    check = flux2lora(["check-params"], root)
    assert check.returncode == 0 and "data/demo/later.png is a dangling symbolic link" in check.stderr, check.stderr
    assert "/data/demo/later.png" in (root / ".dvcignore").read_text()
    (demo / "later.png").unlink()

    # the fix: the link points at a file again; check-params clears the block and prepare accepts the image
    (demo / "gone.png").unlink()
    (demo / "gone.png").symlink_to(outside / "extra.png")
    assert flux2lora(["check-params"], root).returncode == 0
    assert not (root / ".dvcignore").exists() or "gone.png" not in (root / ".dvcignore").read_text()
    run(["dvc", "repro", "prepare"], root)
    report = json.loads((root / "outputs/prepare/report.json").read_text())
    assert report["accepted"] == 6 and report["skipped_by_reason"] == {"linked_folder": 1}

    # the flow's path: DvcPipeline asks DVC about prepare, after hiding a link that broke since
    (demo / "broken.png").symlink_to(tmp_path / "also-missing.png")
    monkeypatch.chdir(root)
    with DvcPipeline(root) as pipeline:
        assert pipeline.is_current("prepare") is True  # no `[Errno 2]`: DVC no longer sees the broken link
    assert "/data/demo/broken.png" in (root / ".dvcignore").read_text()


# --------------------------------------------------------------------------------------------------------------
# one project through `dvc repro`, then damaged, misconfigured and republished


# `repro_project` (conftest): this module's copy of the demo project after a real `dvc repro`, each stage a
# `flux2lora stage` subprocess; the tests below damage, misconfigure and republish it.


CACHED = ("outputs/prepare", "outputs/text_embeds", "outputs/latents")


@pytest.mark.slow
def test_two_identical_runs_give_byte_identical_shards_and_manifests(reproduced_demo, trained_project, tmp_path):
    """The same demo project run twice, in two folders: once by `dvc repro` (each stage in its own process), once
    stage by stage inside a test process (conftest's trained_project). Shard headers are written by safetensors
    from a hash map (its order changes per process): sorted, they agree byte for byte."""
    repro_project, other = reproduced_demo, trained_project
    for folder in CACHED:
        first, second = tree_digest(repro_project / folder), tree_digest(other / folder)
        assert first and first == second, folder
    # the LoRA, and the published LoRA files, byte for byte (each run has its own MLflow run: no run id inside)
    for name in ("outputs/lora/pytorch_lora_weights.safetensors", "outputs/publish/pytorch_lora_weights.safetensors"):
        assert (repro_project / name).read_bytes() == (other / name).read_bytes(), name
    bfl = [sorted((root / "outputs/publish").glob("*_bfl.safetensors")) for root in (repro_project, other)]
    assert len(bfl[0]) == len(bfl[1]) == 1 and bfl[0][0].read_bytes() == bfl[1][0].read_bytes()
    # published files: the BFL export of the same LoRA is identical whichever process writes it
    lora = repro_project / "outputs/lora/pytorch_lora_weights.safetensors"
    outs = []
    for i in range(2):
        out = tmp_path / f"bfl{i}.safetensors"
        subprocess.run([sys.executable, "-m", "flux2lora.cli", "export", str(lora), "--out", str(out)],
                       env=project_env(), check=True, capture_output=True, timeout=300)
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
    publish = json.loads((repro_project / "outputs/publish.json").read_text())
    assert publish["folder"] == "outputs/publish"  # relocatable


@pytest.mark.slow
def test_bit_rot_that_keeps_the_mtime_is_healed_by_dvc_repro_alone(repro_project):
    root = repro_project
    assert "up to date" in run(["dvc", "status"], root).stdout
    flipped = []
    for store in ("text_embeds", "latents"):
        shard = sorted((root / "outputs" / store / "shards").glob("*.safetensors"))[0]
        stat = shard.stat()
        with open(shard, "r+b") as f:
            f.seek(stat.st_size - 64)
            byte = f.read(1)
            f.seek(stat.st_size - 64)
            f.write(bytes([byte[0] ^ 0xFF]))
        os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        flipped.append(shard)
    # DVC trusts (inode, size, mtime): it cannot see this (the status run before the flips recorded this copy's
    # files in DVC's state)
    assert "up to date" in run(["dvc", "status"], root).stdout
    set_params(root, **{"train.max_train_steps": 4})  # the user's next change: train must read the caches
    repro = run(["dvc", "repro"], root, timeout=900)
    assert "Running stage 'train'" in repro.stdout
    assert "Running stage 'encode-text'" not in repro.stdout and "Running stage 'encode-latents'" not in repro.stdout
    repairs = [json.loads(line) for line in (root / "outputs/state/cache_repairs.jsonl").read_text().splitlines()]
    assert {r["store"] for r in repairs} == {"text_embeds", "latents"}
    assert sorted(name for r in repairs for name in r["damaged_shards"]) == sorted(p.name for p in flipped)
    # re-encoded byte for byte: DVC's records of the encode stages still hold, nothing is left to run
    assert "up to date" in run(["dvc", "status"], root).stdout
    info = CliRunner().invoke(app, ["cache", "info", "--verify", "--json", "--params", str(root / "params.yaml")])
    assert all(not row["damaged"] for row in json.loads(info.output).values()), info.output


@pytest.mark.slow
def test_a_model_folder_that_does_not_exist_is_a_message(repro_project):
    root = repro_project
    before = tree_digest(root / "outputs/text_embeds")
    set_params(root, **{"model.pretrained_model_name_or_path": "models/tiny-klein-4b-missing"})
    proc = flux2lora(["stage", "encode-text"], root)
    assert_user_error(proc, "model.pretrained_model_name_or_path", "models/tiny-klein-4b-missing", "Hugging Face Hub")
    assert tree_digest(root / "outputs/text_embeds") == before
    debug = flux2lora(["--debug", "stage", "encode-text"], root)
    assert debug.returncode == 2 and "Traceback" in debug.stderr  # the traceback, on request
    set_params(root, **{"model.pretrained_model_name_or_path": "models/tiny-klein-4b"})
    fixed = flux2lora(["stage", "encode-text", "--json"], root)
    assert assert_json_summary(fixed, "encode-text")["reused"] > 0


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_a_message(repro_project):
    root = repro_project
    before = tree_digest(root / "outputs/validation")
    set_params(root, **{"model.device": "cuda:0"})
    assert_user_error(flux2lora(["stage", "validate"], root), "model.device", "'cuda:0'", "CUDA is not available")
    assert tree_digest(root / "outputs/validation") == before
    set_params(root, **{"model.device": "auto"})
    fixed = flux2lora(["stage", "validate", "--json"], root)
    assert assert_json_summary(fixed, "validate")["images"]


@pytest.mark.slow
def test_failing_publishes_are_messages_and_an_unchanged_republish_uploads_nothing(repro_project, monkeypatch):
    from servers import S3_TEST_ENV

    for key, value in S3_TEST_ENV.items():  # this process reads the bucket back too
        monkeypatch.setenv(key, value)
    try:
        _failing_publishes_then_an_unchanged_republish(repro_project)
    finally:  # the next test publishes nowhere
        set_params(repro_project, **{"publish.s3_uri": None, "publish.s3_endpoint_url": None,
                                     "publish.hub_repo_id": None})


def _failing_publishes_then_an_unchanged_republish(root: Path) -> None:
    import boto3
    from servers import S3_TEST_ENV, moto_server
    from test_publish_s3 import FlakyProxy, assert_complete

    publish_json = (root / "outputs/publish.json").read_bytes()
    publish_folder = tree_digest(root / "outputs/publish")
    with moto_server() as endpoint:
        client = boto3.client("s3", endpoint_url=endpoint)
        # every publish goes through a proxy that records the requests (the endpoint is part of params.json, so it
        # stays the same for all of them)
        proxy = FlakyProxy(endpoint)
        try:
            set_params(root, **{"publish.s3_uri": "s3://no-such-bucket/loras", "publish.s3_endpoint_url": proxy.url,
                                "publish.s3_max_attempts": 2})
            proc = flux2lora(["stage", "publish"], root, **S3_TEST_ENV)
            assert_user_error(proc, "publish.s3_uri", "s3://no-such-bucket/loras", "NoSuchBucket", "credentials")
            assert (root / "outputs/publish.json").read_bytes() == publish_json  # no record of a failed publish
            # outputs/publish was reassembled (its params.json shows the destination tried); the LoRA files and
            # card are byte-stable: the same bytes again
            after = tree_digest(root / "outputs/publish")
            assert {k: v for k, v in after.items() if k != "params.json"} == \
                {k: v for k, v in publish_folder.items() if k != "params.json"}
            assert client.list_buckets()["Buckets"] == []

            # the Hub: huggingface_hub refuses (offline here, as an unreachable Hub would): a message, no record
            set_params(root, **{"publish.s3_uri": None, "publish.hub_repo_id": "someone/lora"})
            proc = flux2lora(["stage", "publish"], root, HF_HUB_OFFLINE="1", **S3_TEST_ENV)
            assert_user_error(proc, "publish.hub_repo_id", "someone/lora", "Hugging Face Hub")
            assert (root / "outputs/publish.json").read_bytes() == publish_json

            # the fix: a bucket that exists, no Hub
            client.create_bucket(Bucket="loras")
            set_params(root, **{"publish.hub_repo_id": None, "publish.s3_uri": "s3://loras/team"})
            proc = flux2lora(["stage", "publish", "--json"], root, **S3_TEST_ENV)
            prefix = assert_json_summary(proc, "publish")["s3"].removeprefix("s3://loras/")
            assert_complete(endpoint, "loras", prefix, root / "outputs/publish")
            manifest = client.head_object(Bucket="loras", Key=f"{prefix}/manifest.json")

            # the same outputs published again: nothing is written, the manifest is left as it was
            proxy.requests.clear()
            proc = flux2lora(["stage", "publish"], root, **S3_TEST_ENV)
            assert proc.returncode == 0, proc.stderr[-3000:]
            writes = [(m, p) for m, p, _ in proxy.requests if m in ("PUT", "POST", "DELETE")]
            assert writes == [] and proxy.requests, writes
        finally:
            proxy.close()
        again = client.head_object(Bucket="loras", Key=f"{prefix}/manifest.json")
        assert (again["ETag"], again["LastModified"]) == (manifest["ETag"], manifest["LastModified"])


@pytest.mark.slow
def test_every_stage_command_prints_its_summary_as_json_on_stdout_and_logs_on_stderr(repro_project):
    """prepare, encode-latents and train here; encode-text, validate and publish print theirs in the tests above
    (each ends with a `--json` run of its stage that must succeed: assert_json_summary)."""
    root = repro_project
    # validate's own check is skipped where CUDA is available: then it is checked here
    for stage in ("prepare", "encode-latents", "train", *(("validate",) if torch.cuda.is_available() else ())):
        assert_json_summary(flux2lora(["stage", stage, "--json"], root), stage)


def test_a_moved_projects_report_names_a_rejected_file_as_before(tmp_path):
    """A rejection remembered from before the move (prepare decodes nothing again) keeps its file relative."""
    from flux2lora.stages import run_stage

    (tmp_path / "first").mkdir()
    first = params_only_project(tmp_path / "first")
    (first / "data" / "demo" / "empty.png").write_bytes(b"")
    (first / "data" / "demo" / "empty.txt").write_text("an image with no bytes")
    run_stage("prepare", first / "params.yaml")
    before = (first / "outputs/prepare/report.json").read_text()
    assert "data/demo/empty.png" in before and str(first) not in before
    moved = tmp_path / "moved"
    shutil.move(str(first), moved)
    run_stage("prepare", moved / "params.yaml")
    after = json.loads((moved / "outputs/prepare/report.json").read_text())
    assert after["inspected"] == 0  # remembered, not decoded again
    assert after["skipped_files"] == json.loads(before)["skipped_files"]
