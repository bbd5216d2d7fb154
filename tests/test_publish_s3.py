"""Publishing to S3 never loses an artifact: tested against a real S3 HTTP endpoint on loopback (moto's server),
with a small HTTP proxy in front of it that can fail requests, as a flaky or overloaded store does.

What a user relies on: the LoRA files, model card, samples and params land under `s3://bucket/prefix/<run-name>/`;
every upload is verified; `manifest.json` exists only when the folder is complete and matches it; re-running
uploads nothing that is already there; transient 5xx answers are retried; a publish that fails leaves no manifest.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable

import boto3
import pytest
from boto3.exceptions import S3UploadFailedError
from helpers import make_project, set_params

from flux2lora.publish.s3 import (
    MANIFEST,
    MIB,
    LocalFile,
    PublishVerificationError,
    TransferSettings,
    upload_folder,
    verify_upload,
)
from flux2lora.stages import STAGES, run_stage

LOOPBACK = "127.0.0.1"


class FlakyProxy:
    """A loopback HTTP proxy in front of the S3 server. `fail(method, path, n)` is asked for the n-th request
    (1-based): a status code to answer with instead of forwarding, or None to forward. `tamper(method, path,
    headers)` may change a forwarded response's headers (a store that reports something else than was sent).
    Records every request."""

    def __init__(self, target: str, fail: Callable[[str, str, int], int | None] = lambda m, p, n: None,
                 tamper: Callable[[str, str, dict], dict] = lambda m, p, headers: headers):
        host, port = target.removeprefix("http://").split(":")
        self.target, self.fail, self.tamper = (host, int(port)), fail, tamper
        self.requests: list[tuple[str, str, int]] = []  # (method, path, status)
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def handle_one(self):
                body = self._read_body()
                with proxy.lock:
                    n = len(proxy.requests) + 1
                    status = proxy.fail(self.command, self.path, n)
                    proxy.requests.append((self.command, self.path, status or 0))
                if status:
                    payload = b"" if self.command == "HEAD" else (
                        b"<Error><Code>ServiceUnavailable</Code><Message>injected by the test</Message></Error>")
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                conn = http.client.HTTPConnection(*proxy.target, timeout=60)
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("connection", "transfer-encoding", "content-length")}
                headers["Content-Length"] = str(len(body))
                conn.request(self.command, self.path, body=body, headers=headers)
                response = conn.getresponse()
                data = response.read()
                self.send_response(response.status)
                for key, value in proxy.tamper(self.command, self.path, dict(response.getheaders())).items():
                    if key.lower() not in ("connection", "transfer-encoding", "content-length"):
                        self.send_header(key, value)
                # HEAD answers carry the object's length without a body
                length = response.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
                self.send_header("Content-Length", length or "0")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            def _read_body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = handle_one

            def log_message(self, *args):  # keep pytest output readable
                pass

        self.server = ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.server.server_address[1]}"

    def failures(self) -> int:
        return sum(1 for *_, status in self.requests if status)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def s3_server():
    """moto's S3 server on a free loopback port: real HTTP, real boto3 client code paths."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address=LOOPBACK, port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture(autouse=True)
def aws_credentials(monkeypatch, tmp_path):
    """Credentials through boto3's own chain (environment), isolated from any ~/.aws of the machine."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def bucket(s3_server) -> str:
    name = f"loras-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return name


@pytest.fixture
def proxies():
    started: list[FlakyProxy] = []

    def start(target: str, fail=lambda m, p, n: None, tamper=lambda m, p, headers: headers) -> FlakyProxy:
        started.append(FlakyProxy(target, fail, tamper))
        return started[-1]

    yield start
    for proxy in started:
        proxy.close()


@pytest.fixture
def folder(tmp_path) -> Path:
    """A publish folder in miniature: LoRA files, a card, samples, params."""
    out = tmp_path / "publish"
    out.mkdir()
    (out / "pytorch_lora_weights.safetensors").write_bytes(b"L" * 300_000)
    (out / "run_bfl.safetensors").write_bytes(b"B" * 200_000)
    (out / "README.md").write_text("# card\n")
    (out / "samples.png").write_bytes(b"\x89PNG fake")
    (out / "params.json").write_text("{}\n")
    return out


def objects(server: str, bucket: str, prefix: str) -> dict[str, bytes]:
    client = boto3.client("s3", endpoint_url=server)
    listing = client.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/").get("Contents", [])
    return {o["Key"].removeprefix(f"{prefix}/"): client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
            for o in listing}


def assert_complete(server: str, bucket: str, prefix: str, local: Path) -> None:
    """The manifest lists exactly the local files with their sizes and sha256, and the objects match it."""
    remote = objects(server, bucket, prefix)
    manifest = json.loads(remote.pop(MANIFEST))
    assert manifest["complete"] is True
    expected = {p.name: p.read_bytes() for p in local.iterdir()}
    assert remote == expected
    assert {e["name"]: (e["size"], e["sha256"]) for e in manifest["files"]} == {
        name: (len(data), hashlib.sha256(data).hexdigest()) for name, data in expected.items()}


FAST = TransferSettings(max_attempts=2)  # for tests that expect the upload to fail: few retries


@pytest.fixture(scope="module")
def published_project(tmp_path_factory) -> Path:
    """A tiny klein-4b project through all six stages (publishing to the local folder only)."""
    root = make_project(tmp_path_factory.mktemp("s3") / "project", git=False, **{
        "train.max_train_steps": 2, "train.checkpointing_steps": 100, "validate.validation_num_inference_steps": 1})
    for name in STAGES:
        run_stage(name, root / "params.yaml")
    return root


def test_publish_stage_uploads_lora_files_card_samples_and_params_under_the_run_name(published_project,
                                                                                    s3_server, bucket):
    set_params(published_project, **{"publish.s3_uri": f"s3://{bucket}/team/loras",
                                     "publish.s3_endpoint_url": s3_server})
    result = run_stage("publish", published_project / "params.yaml")
    run = json.loads((published_project / "outputs/train/mlflow_run.json").read_text())
    prefix = f"team/loras/{run['run_name']}"
    assert result["s3"] == f"s3://{bucket}/{prefix}"
    local = published_project / "outputs" / "publish"
    assert {"pytorch_lora_weights.safetensors", f"{run['run_name']}_bfl.safetensors", "README.md", "samples.png",
            "params.json"} == {p.name for p in local.iterdir()}
    assert_complete(s3_server, bucket, prefix, local)
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{published_project / 'mlflow.db'}")
    client = mlflow.tracking.MlflowClient()
    assert client.get_run(run["run_id"]).data.tags["published_s3"] == result["s3"]
    version = client.get_model_version(result["registered_model"]["name"], result["registered_model"]["version"])
    assert version.tags["s3_uri"] == result["s3"]


def test_manifest_is_deleted_first_and_written_last(folder, s3_server, bucket, proxies):
    proxy = proxies(s3_server)
    upload_folder(folder, f"s3://{bucket}/runs/r1", proxy.url)
    (folder / "README.md").write_text("# card, edited\n")
    proxy.requests.clear()
    upload_folder(folder, f"s3://{bucket}/runs/r1", proxy.url)
    writes = [(m, p.split("?")[0]) for m, p, _ in proxy.requests if m in ("PUT", "POST", "DELETE")]
    manifest_path = f"/{bucket}/runs/r1/{MANIFEST}"
    assert writes[0] == ("DELETE", manifest_path)  # before anything changes, the folder stops looking complete
    assert writes[-1] == ("PUT", manifest_path)
    assert writes[1:-1] == [("PUT", f"/{bucket}/runs/r1/README.md")]  # only the changed file
    assert_complete(s3_server, bucket, "runs/r1", folder)


def test_rerun_uploads_nothing_and_changes_nothing(folder, s3_server, bucket, proxies):
    first = upload_folder(folder, f"s3://{bucket}/runs/r1", s3_server)
    assert sorted(first["uploaded"]) == sorted(p.name for p in folder.iterdir())
    proxy = proxies(s3_server)
    again = upload_folder(folder, f"s3://{bucket}/runs/r1", proxy.url)
    assert again["uploaded"] == [] and again["removed"] == []
    assert sorted(again["unchanged"]) == sorted(first["uploaded"])
    assert {m for m, *_ in proxy.requests} <= {"GET", "HEAD"}  # read-only
    assert_complete(s3_server, bucket, "runs/r1", folder)


def test_rerun_after_changes_uploads_the_changes_and_removes_what_is_gone(folder, s3_server, bucket):
    upload_folder(folder, f"s3://{bucket}/runs/r1", s3_server)
    (folder / "params.json").unlink()
    (folder / "pytorch_lora_weights.safetensors").write_bytes(b"N" * 300_000)  # same size, new content
    (folder / "extra.png").write_bytes(b"new")
    result = upload_folder(folder, f"s3://{bucket}/runs/r1", s3_server)
    assert sorted(result["uploaded"]) == ["extra.png", "pytorch_lora_weights.safetensors"]
    assert result["removed"] == ["params.json"]
    assert_complete(s3_server, bucket, "runs/r1", folder)


def test_large_files_go_up_in_verified_parts(tmp_path, s3_server, bucket):
    folder = tmp_path / "big"
    folder.mkdir()
    (folder / "lora.safetensors").write_bytes(bytes(range(256)) * (11 * MIB // 256 + 7))  # 11 MiB and a bit
    settings = TransferSettings(multipart_threshold=5 * MIB, multipart_chunksize=5 * MIB)
    upload_folder(folder, f"s3://{bucket}/runs/big", s3_server, settings=settings)
    head = boto3.client("s3", endpoint_url=s3_server).head_object(Bucket=bucket, Key="runs/big/lora.safetensors")
    assert head["ETag"].strip('"').endswith("-3")  # three parts
    assert_complete(s3_server, bucket, "runs/big", folder)


def test_retries_get_through_a_server_that_fails_the_first_requests(folder, s3_server, bucket, proxies):
    proxy = proxies(s3_server, fail=lambda method, path, n: (503, 500, 503)[n - 1] if n <= 3 else None)
    result = upload_folder(folder, f"s3://{bucket}/runs/flaky", proxy.url)
    assert proxy.failures() == 3
    assert len(result["uploaded"]) == len(list(folder.iterdir()))
    assert_complete(s3_server, bucket, "runs/flaky", folder)


def test_an_upload_that_keeps_failing_leaves_no_manifest(folder, s3_server, bucket, proxies):
    proxy = proxies(s3_server, fail=lambda method, path, n: 500 if method == "PUT" and "_bfl" in path else None)
    with pytest.raises(S3UploadFailedError, match="reached max retries"):
        upload_folder(folder, f"s3://{bucket}/runs/broken", proxy.url, settings=FAST)
    remote = objects(s3_server, bucket, "runs/broken")
    assert MANIFEST not in remote
    assert "run_bfl.safetensors" not in remote


def test_a_failed_republish_does_not_leave_the_old_manifest_behind(folder, s3_server, bucket, proxies):
    """A complete folder is being replaced by a new LoRA and the upload fails: the old manifest must not make the
    half-replaced folder look complete."""
    upload_folder(folder, f"s3://{bucket}/runs/r1", s3_server)
    (folder / "run_bfl.safetensors").write_bytes(b"X" * 200_000)
    proxy = proxies(s3_server, fail=lambda method, path, n: 503 if method == "PUT" and "_bfl" in path else None)
    with pytest.raises(S3UploadFailedError, match="reached max retries"):
        upload_folder(folder, f"s3://{bucket}/runs/r1", proxy.url, settings=FAST)
    assert MANIFEST not in objects(s3_server, bucket, "runs/r1")
    upload_folder(folder, f"s3://{bucket}/runs/r1", s3_server)  # the next run completes it
    assert_complete(s3_server, bucket, "runs/r1", folder)


def test_an_upload_the_server_stored_differently_is_removed_and_leaves_no_manifest(folder, s3_server, bucket,
                                                                                    proxies):
    """The store answers the post-upload HEAD with another checksum than the file's: the publish fails, the bad
    object is deleted (its sha256 metadata would otherwise pass it off as published on the next run)."""
    def tamper(method, path, headers):
        if method == "HEAD" and path.endswith("/run_bfl.safetensors"):
            headers = {k: ("AAAA" + v[4:] if k.lower() == "x-amz-checksum-sha256" else v) for k, v in headers.items()}
        return headers

    proxy = proxies(s3_server, tamper=tamper)
    with pytest.raises(PublishVerificationError, match="run_bfl.safetensors: SHA-256 checksum"):
        upload_folder(folder, f"s3://{bucket}/runs/bad", proxy.url)
    remote = objects(s3_server, bucket, "runs/bad")
    assert MANIFEST not in remote and "run_bfl.safetensors" not in remote


def test_an_object_that_differs_from_the_local_file_fails_verification(tmp_path):
    local = LocalFile(tmp_path / "x", "x", size=3, sha256="00", checksum_sha256="abc=", etag="d41d8")
    with pytest.raises(PublishVerificationError, match="checksum"):
        verify_upload({"ContentLength": 3, "ChecksumSHA256": "xyz="}, local, "s3://b/x")
    with pytest.raises(PublishVerificationError, match="bytes"):
        verify_upload({"ContentLength": 2, "ChecksumSHA256": "abc="}, local, "s3://b/x")
    with pytest.raises(PublishVerificationError, match="ETag"):
        verify_upload({"ContentLength": 3, "ETag": '"ffff"'}, local, "s3://b/x")
    assert verify_upload({"ContentLength": 3, "ChecksumSHA256": "abc=-2"}, local, "s3://b/x") == "sha256 checksum"
    assert verify_upload({"ContentLength": 3, "ETag": '"d41d8"'}, local, "s3://b/x") == "md5 etag"


def test_the_bucket_root_is_refused(folder):
    with pytest.raises(ValueError, match="not its root"):
        upload_folder(folder, "s3://bucket", "http://127.0.0.1:9")
