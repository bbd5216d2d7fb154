"""The DVC remotes of `.dvc/config`: `dvc push` from a project where the pipeline ran, `git clone` into a fresh folder,
`dvc pull` there: the outputs arrive byte for byte, every stage is up to date, and retraining in the clone (a new
learning rate) runs train from the pulled caches without preparing or encoding anything.

One project runs `dvc repro` once; it is pushed to the default (local folder) remote and to the `s3` remote on a
moto S3 server on loopback, and each is pulled into a clone of its own. Git gets what the README says to commit:
dvc.lock and the small outputs DVC does not cache (report, metrics, the MLflow run id); the local checkpoints and
prepare's file records stay out.
"""

from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path

import pytest
import yaml

from helpers import REPO, run
from servers import S3_TEST_ENV, moto_server

pytestmark = pytest.mark.slow

BUCKET = "flux2lora"  # .dvc/config: s3://flux2lora/dvc
ENCODE = ["prepare", "encode-text", "encode-latents"]
UNCACHED = ["outputs/prepare/report.json", "outputs/train/metrics.json", "outputs/train/mlflow_run.json",
            "outputs/publish.json", *(f"outputs/params/{stage}.json" for stage in
                                      ("prepare", "encode-text", "encode-latents", "train", "validate", "publish"))]
CACHED = ["outputs/prepare/images.jsonl", "outputs/prepare/captions.jsonl", "outputs/text_embeds", "outputs/prompt_embeds",
          "outputs/latents",
          "outputs/lora", "outputs/validation", "outputs/publish"]
RAN = re.compile(r"^Running stage '(?P<stage>[^']+)':$", re.M)
SKIPPED = re.compile(r"^Stage '(?P<stage>[^']+)' didn't change, skipping$", re.M)


def uncached_outputs() -> set[str]:
    """dvc.yaml's outputs with `cache: false` (git's to keep), but the checkpoints (local resumable state)."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    outs = [o for s in stages.values() for key in ("outs", "metrics") for o in s.get(key, []) if isinstance(o, dict)]
    paths = {path.replace("${output_dir}", "outputs") for o in outs for path, opts in o.items()
             if opts.get("cache") is False}
    return paths - {"outputs/checkpoints"}


def digest(path: Path) -> dict[str, str]:
    """sha256 of a file, or of every file under a folder, by path relative to `path`."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(f.relative_to(path)) if f != path else f.name: hashlib.sha256(f.read_bytes()).hexdigest()
            for f in files}


@pytest.fixture(scope="module")
def pushed_project(repro_project) -> Path:
    """A git + DVC project with the repository's .dvc/config and its ignored /outputs/, on which `dvc repro` ran
    (conftest's demo project, this module's copy) and whose results are committed as the README says. The local
    remote resolves to a folder beside it."""
    assert uncached_outputs() == set(UNCACHED), "README's list of files to commit is out of date"
    project = repro_project
    shutil.copy2(REPO / ".dvc" / "config", project / ".dvc" / "config")
    with open(project / ".gitignore", "a") as ignore:
        ignore.write("/outputs/\n")  # as in the repository
    run(["git", "add", "-A"], project)
    run(["git", "add", "-f", *UNCACHED], project)
    run(["git", "commit", "-qm", "pipeline results"], project)
    assert not run(["git", "status", "--porcelain"], project).stdout.strip()
    return project


def clone(project: Path, name: str) -> Path:
    target = project.parent / name
    run(["git", "clone", "-q", str(project), str(target)], project.parent)
    return target


def assert_clone_has_the_results(project: Path, copy: Path) -> None:
    """After `dvc pull`: every cached output is byte-identical and every stage is up to date (train's checkpoints
    are local working state, not an output, so the pulled LoRA counts)."""
    for out in CACHED:
        assert digest(copy / out) == digest(project / out), out
    status = run(["dvc", "status"], copy).stdout
    for stage in [*ENCODE, "train", "validate", "publish"]:
        assert f"{stage}:" not in status, f"{stage} out of date after dvc pull:\n{status}"


def assert_clone_trains_without_encoding(copy: Path) -> None:
    """A new learning rate in the clone: `dvc repro` trains on the pulled caches; prepare and the encoders are
    skipped and their caches untouched."""
    # the clone needs the base model to train (models/ is not in git): the same seed gives the same model
    from flux2lora.tiny import make_tiny_model
    from helpers import set_params

    make_tiny_model(copy / "models" / "tiny-klein-4b", flavour="klein-4b", seed=0)
    set_params(copy, **{"train.learning_rate": 0.02, "train.max_train_steps": 4})  # 4 steps: all it needs
    before = {out: digest(copy / out) for out in ("outputs/text_embeds", "outputs/latents")}
    repro = run(["dvc", "repro", "train"], copy, timeout=600)
    ran, skipped = RAN.findall(repro.stdout), SKIPPED.findall(repro.stdout)
    assert ran == ["params", "train"], repro.stdout  # params rewrote train.json (the new learning rate)
    assert sorted(skipped) == sorted(ENCODE), repro.stdout
    assert {out: digest(copy / out) for out in before} == before
    assert "train:" not in run(["dvc", "status", "train"], copy).stdout


def test_push_to_the_default_local_remote_and_pull_into_a_clone(pushed_project: Path) -> None:
    """`dvc push` with no -r uses the default remote, a folder beside the checkout; a clone pulls from it."""
    remotes = run(["dvc", "remote", "list"], pushed_project).stdout
    assert re.search(r"^local\s+\S+\s+\(default\)$", remotes, re.M), remotes
    storage = pushed_project.parent / "flux2lora-dvc-remote"  # beside the checkout
    assert not storage.exists()
    push = run(["dvc", "push"], pushed_project)
    assert "pushed" in push.stdout, push.stdout
    assert any(p.is_file() for p in storage.rglob("*")), f"nothing pushed to {storage}"

    copy = clone(pushed_project, "clone-local")
    run(["dvc", "pull"], copy)
    assert_clone_has_the_results(pushed_project, copy)


def test_push_to_s3_and_pull_into_a_clone(pushed_project: Path) -> None:
    """`dvc push -r s3` to an S3 server (moto on loopback, as MinIO would be), a fresh clone pulls from it with the
    endpoint set for that clone only (`dvc remote modify --local`)."""
    import boto3

    with moto_server(buckets=(BUCKET,)) as endpoint:
        run(["dvc", "remote", "modify", "--local", "s3", "endpointurl", endpoint], pushed_project)
        push = run(["dvc", "push", "-r", "s3"], pushed_project, **S3_TEST_ENV)
        assert "pushed" in push.stdout, push.stdout
        s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                          region_name="us-east-1")
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="dvc/").get("Contents", [])]
        assert keys and all(k.startswith("dvc/files/md5/") for k in keys), keys

        copy = clone(pushed_project, "clone-s3")
        assert not (copy / ".dvc" / "config.local").exists()  # the endpoint override stayed in its checkout
        run(["dvc", "remote", "modify", "--local", "s3", "endpointurl", endpoint], copy)
        run(["dvc", "pull", "-r", "s3"], copy, **S3_TEST_ENV)
    assert_clone_has_the_results(pushed_project, copy)
    assert_clone_trains_without_encoding(copy)
