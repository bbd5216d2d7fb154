"""Upload a folder to S3 (or MinIO and other S3-compatible stores), verified, retried, and idempotent.

Files go to `s3://bucket/prefix/<run-name>/`; `manifest.json` (names, sizes, sha256) is uploaded last, so a
folder without a manifest is recognisably incomplete. Credentials come from boto3's usual chain (environment,
~/.aws/credentials, instance roles), never from params.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from urllib.parse import urlparse

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


def parse_s3_uri(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(f"publish.s3_uri: {uri!r} is not of the form s3://bucket/prefix")
    return parsed.netloc, parsed.path.strip("/")


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def s3_client(endpoint_url: str | None):
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=endpoint_url,
                        config=Config(retries={"max_attempts": 8, "mode": "standard"}, connect_timeout=10,
                                      read_timeout=60))


def upload_folder(folder: Path, uri: str, endpoint_url: str | None = None, client=None) -> dict:
    """Upload every file of `folder` under `uri`, skipping those already there with the same sha256; verify each
    upload's size and checksum metadata; then write the manifest. Returns the manifest."""
    from boto3.s3.transfer import TransferConfig

    bucket, prefix = parse_s3_uri(uri)
    client = client or s3_client(endpoint_url)
    transfer = TransferConfig(multipart_threshold=64 * 1024 * 1024, multipart_chunksize=64 * 1024 * 1024)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = []
    for path in files:
        rel = path.relative_to(folder).as_posix()
        key = f"{prefix}/{rel}" if prefix else rel
        digest, size = sha256_of(path), path.stat().st_size
        remote = _head(client, bucket, key)
        if remote and remote["size"] == size and remote["sha256"] == digest:
            log.info("s3: %s already published, unchanged", key)
        else:
            client.upload_file(str(path), bucket, key, Config=transfer, ExtraArgs={"Metadata": {"sha256": digest}})
            remote = _head(client, bucket, key)
            if not remote or remote["size"] != size or remote["sha256"] != digest:
                raise IOError(f"s3://{bucket}/{key}: verification failed after upload (size/checksum differ)")
            log.info("s3: uploaded %s (%d bytes)", key, size)
        entries.append({"name": rel, "size": size, "sha256": digest})
    manifest = {"files": entries, "complete": True}
    manifest_key = f"{prefix}/{MANIFEST}" if prefix else MANIFEST
    client.put_object(Bucket=bucket, Key=manifest_key, Body=json.dumps(manifest, indent=2).encode(),
                      ContentType="application/json")
    return {"uri": f"s3://{bucket}/{prefix}", **manifest}


def _head(client, bucket: str, key: str) -> dict | None:
    from botocore.exceptions import ClientError

    try:
        head = client.head_object(Bucket=bucket, Key=key)
    except ClientError as e:
        if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            return None
        raise
    return {"size": head["ContentLength"], "sha256": head.get("Metadata", {}).get("sha256")}
