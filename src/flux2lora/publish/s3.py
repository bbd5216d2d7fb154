"""Upload a folder to S3 (or MinIO and other S3-compatible stores): verified, retried, idempotent, never half-done.

Files go to `s3://bucket/prefix/<run-name>/`. `manifest.json` (every file's name, size and sha256) is the
completion marker: it is deleted before anything in the folder changes and written last, after every file is
verified, so a folder with a manifest is complete and matches it, and an interrupted or failed publish leaves a
folder without one. Re-running uploads only what differs and removes objects no longer published.

Integrity: each upload asks S3 for a SHA-256 checksum (`ChecksumAlgorithm`): the server checks the bytes it
received against the client's checksum and stores it; after the upload we compare the stored checksum (or, from
stores without checksum support, the MD5 ETag) with one computed from the local file, and the size.

Retries: botocore's standard mode retries throttling, 5xx answers and connection errors with exponential backoff
and jitter, up to `max_attempts` per request. Credentials come from boto3's usual chain (environment,
~/.aws/credentials, instance roles), never from params.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MIB = 1024 * 1024


class PublishVerificationError(IOError):
    """An uploaded object does not match the local file (size or checksum)."""


@dataclass(frozen=True)
class TransferSettings:
    """Multipart and retry settings (`publish.s3_*` params)."""

    multipart_threshold: int = 64 * MIB  # bytes; files at least this large are uploaded in parts
    multipart_chunksize: int = 64 * MIB  # bytes per part (S3's minimum is 5 MiB)
    max_attempts: int = 8  # per request, including the first

    def transfer_config(self):
        from boto3.s3.transfer import TransferConfig

        return TransferConfig(multipart_threshold=self.multipart_threshold,
                              multipart_chunksize=self.multipart_chunksize)

    def part_size(self, size: int) -> int | None:
        """The part size s3transfer will use for a file of `size` bytes; None when it is uploaded in one piece."""
        from s3transfer.utils import ChunksizeAdjuster

        if size < self.multipart_threshold:
            return None
        return ChunksizeAdjuster().adjust_chunksize(self.multipart_chunksize, size)


@dataclass(frozen=True)
class LocalFile:
    """A file to publish and what its upload must look like on the server."""

    path: Path
    name: str  # relative to the published folder, "/"-separated
    size: int
    sha256: str  # hex, of the whole file
    checksum_sha256: str  # base64; S3's composite form (sha256 of the parts' sha256s) for multipart uploads
    etag: str  # S3's MD5 ETag for the same upload (composite "<md5 of md5s>-N" for multipart)

    def manifest_entry(self) -> dict:
        return {"name": self.name, "size": self.size, "sha256": self.sha256}


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/a/b` -> ("bucket", "a/b")."""
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(f"publish.s3_uri: {uri!r} is not of the form s3://bucket/prefix")
    return parsed.netloc, parsed.path.strip("/")


def describe_file(path: Path, name: str, settings: TransferSettings) -> LocalFile:
    """Hash a file once: its sha256, and the checksum and ETag S3 will report for its upload with `settings`."""
    size = path.stat().st_size
    part = settings.part_size(size)
    whole_sha, whole_md5 = hashlib.sha256(), hashlib.md5()
    part_shas, part_md5s = [], []
    with open(path, "rb") as f:
        while True:
            block = f.read(part or MIB)
            if not block:
                break
            whole_sha.update(block)
            whole_md5.update(block)
            if part:
                part_shas.append(hashlib.sha256(block).digest())
                part_md5s.append(hashlib.md5(block).digest())
    if part:
        checksum = base64.b64encode(hashlib.sha256(b"".join(part_shas)).digest()).decode()
        etag = f"{hashlib.md5(b''.join(part_md5s)).hexdigest()}-{len(part_md5s)}"
    else:
        checksum = base64.b64encode(whole_sha.digest()).decode()
        etag = whole_md5.hexdigest()
    return LocalFile(path, name, size, whole_sha.hexdigest(), checksum, etag)


def s3_client(endpoint_url: str | None, max_attempts: int = 8):
    """A boto3 S3 client with standard-mode retries (exponential backoff with jitter)."""
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=endpoint_url,
                        config=Config(retries={"max_attempts": max_attempts, "mode": "standard"},
                                      connect_timeout=10, read_timeout=60))


def _key(prefix: str, name: str) -> str:
    return f"{prefix}/{name}"


def _head(client, bucket: str, key: str) -> dict | None:
    """HEAD with the stored checksum; None when the object does not exist."""
    from botocore.exceptions import ClientError

    try:
        return client.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
    except ClientError as e:
        if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            return None
        raise


def _is_published(head: dict | None, local: LocalFile) -> bool:
    """The object exists with the size and the sha256 metadata of the local file (a previous verified upload)."""
    return bool(head) and head["ContentLength"] == local.size \
        and head.get("Metadata", {}).get("sha256") == local.sha256


def verify_upload(head: dict | None, local: LocalFile, where: str) -> str:
    """Check an uploaded object against the local file; returns how it was verified. Raises when it differs."""
    if not head:
        raise PublishVerificationError(f"{where}: missing right after its upload")
    if head["ContentLength"] != local.size:
        raise PublishVerificationError(f"{where}: {head['ContentLength']} bytes on the server, {local.size} here")
    stored = head.get("ChecksumSHA256")
    if stored:
        # AWS appends "-<parts>" to composite checksums; some stores do not.
        if stored.split("-")[0] != local.checksum_sha256:
            raise PublishVerificationError(f"{where}: SHA-256 checksum {stored} on the server, "
                                           f"{local.checksum_sha256} computed here")
        return "sha256 checksum"
    etag = head.get("ETag", "").strip('"')
    if etag != local.etag:
        raise PublishVerificationError(f"{where}: the server reports no SHA-256 checksum and its ETag {etag!r} is "
                                       f"not the MD5 {local.etag!r} of the local file")
    return "md5 etag"


def read_manifest(client, bucket: str, prefix: str) -> dict | None:
    """The published folder's manifest, or None (never published, or a publish in progress or failed)."""
    from botocore.exceptions import ClientError

    try:
        body = client.get_object(Bucket=bucket, Key=_key(prefix, MANIFEST))["Body"].read()
    except ClientError as e:
        if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            return None
        raise
    return json.loads(body)


def _remote_keys(client, bucket: str, prefix: str) -> set[str]:
    keys = set()
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/"):
        keys.update(obj["Key"] for obj in page.get("Contents", []))
    return keys


def upload_folder(folder: Path, uri: str, endpoint_url: str | None = None, client=None,
                  settings: TransferSettings | None = None) -> dict:
    """Publish every file of `folder` under `uri` (see the module docstring for the guarantees).

    Returns {"uri", "files" (the manifest's entries), "complete": True, "uploaded", "unchanged", "removed"}.
    Raises (leaving no manifest) when an upload fails after its retries or does not verify.
    """
    settings = settings or TransferSettings()
    bucket, prefix = parse_s3_uri(uri)
    if not prefix:  # objects in the folder that are not published get deleted: never do that to a whole bucket
        raise ValueError(f"{uri}: publish into a folder of the bucket (s3://bucket/prefix), not its root")
    client = client or s3_client(endpoint_url, settings.max_attempts)
    local = [describe_file(p, p.relative_to(folder).as_posix(), settings)
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST]
    manifest = {"files": [f.manifest_entry() for f in local], "complete": True}
    result = {"uri": f"s3://{bucket}/{prefix}", **manifest, "uploaded": [], "unchanged": [], "removed": []}
    manifest_key = _key(prefix, MANIFEST)

    heads = {f.name: _head(client, bucket, _key(prefix, f.name)) for f in local}
    remote_keys = _remote_keys(client, bucket, prefix)
    stale = sorted(remote_keys - {_key(prefix, f.name) for f in local} - {manifest_key})
    if read_manifest(client, bucket, prefix) == manifest and not stale \
            and all(_is_published(heads[f.name], f) for f in local):
        log.info("s3: %s already published and complete, nothing to do", result["uri"])
        result["unchanged"] = [f.name for f in local]
        return result

    # From here until the new manifest is written the folder is incomplete, and says so by having no manifest.
    if manifest_key in remote_keys:
        client.delete_object(Bucket=bucket, Key=manifest_key)
    for f in local:
        key = _key(prefix, f.name)
        if _is_published(heads[f.name], f):
            result["unchanged"].append(f.name)
            continue
        client.upload_file(str(f.path), bucket, key, Config=settings.transfer_config(),
                           ExtraArgs={"Metadata": {"sha256": f.sha256}, "ChecksumAlgorithm": "SHA256"})
        try:
            how = verify_upload(_head(client, bucket, key), f, f"s3://{bucket}/{key}")
        except PublishVerificationError:
            # Its sha256 metadata would make the next run take this bad copy for a published one.
            client.delete_object(Bucket=bucket, Key=key)
            raise
        log.info("s3: uploaded %s (%d bytes, verified by %s)", key, f.size, how)
        result["uploaded"].append(f.name)
    for start in range(0, len(stale), 1000):  # DeleteObjects takes at most 1000 keys
        client.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in stale[start:start + 1000]],
                                                     "Quiet": True})
    result["removed"] = [k.removeprefix(f"{prefix}/") for k in stale]

    body = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    client.put_object(Bucket=bucket, Key=manifest_key, Body=body, ContentType="application/json",
                      ChecksumAlgorithm="SHA256")
    if read_manifest(client, bucket, prefix) != manifest:
        client.delete_object(Bucket=bucket, Key=manifest_key)
        raise PublishVerificationError(f"s3://{bucket}/{manifest_key}: does not read back as written")
    log.info("s3: %s complete (%d uploaded, %d unchanged, %d removed)", result["uri"], len(result["uploaded"]),
             len(result["unchanged"]), len(result["removed"]))
    return result
