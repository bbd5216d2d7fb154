"""Credentials for the Hub and S3 come from the environment, the libraries' own credential files
(~/.cache/huggingface/token, ~/.aws/credentials) or Prefect Secret blocks; never from params, and they are never
logged, tagged or written.

A Secret block fills in a variable only when the environment lacks it, and only while the flow runs: huggingface_hub
and boto3 read it from the environment, as they would a user's export. Create one with
`prefect block create secret` in the UI, or `Secret(value="...").save("hf-token")`.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

# environment variable -> name of the Prefect Secret block that may hold it
SECRET_BLOCKS = {
    "HF_TOKEN": "hf-token",
    "AWS_ACCESS_KEY_ID": "aws-access-key-id",
    "AWS_SECRET_ACCESS_KEY": "aws-secret-access-key",
    "AWS_SESSION_TOKEN": "aws-session-token",
}


def _read_block(name: str) -> str | None:
    from prefect.blocks.system import Secret

    try:
        return Secret.load(name).get()
    except ValueError:  # no block of that name
        return None


@contextmanager
def credentials_from_secret_blocks(logger) -> Iterator[list[str]]:
    """Export each credential the environment lacks from its Secret block while the block runs; yields the names
    taken from blocks (names only: values are never logged)."""
    taken = []
    for variable, block in SECRET_BLOCKS.items():
        if os.environ.get(variable):
            continue
        value = _read_block(block)
        if value:
            os.environ[variable] = value
            taken.append(variable)
            logger.info("%s: from Prefect Secret block %r", variable, block)
    try:
        yield taken
    finally:
        for variable in taken:
            os.environ.pop(variable, None)
