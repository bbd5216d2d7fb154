"""Atomic file writes: a killed process leaves the old file or the new one, never half of one."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp_path)` then rename over `path` (same folder, so the rename is atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text))


def write_json_atomic(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_jsonl_atomic(path: Path, rows: Iterable[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSON-lines manifest; FileNotFoundError naming the stage to run when it is missing."""
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run the stage that writes it first (dvc repro / flux2lora stage)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def canonical_safetensors(data: bytes) -> bytes:
    """A safetensors file's bytes with its `__metadata__` keys in sorted order.

    The safetensors writer keeps metadata in a Rust HashMap, whose order changes from process to process, so the
    same tensors and metadata gave different bytes (and DVC hashes) on every run. Only the header's JSON is
    rewritten: the tensor entries, their offsets and the data block stay as safetensors wrote them (offsets are
    relative to the end of the header, which is padded with spaces to 8 bytes as the format asks)."""
    import struct

    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    ordered = {}
    if "__metadata__" in header:
        ordered["__metadata__"] = dict(sorted(header.pop("__metadata__").items()))
    ordered.update(header)
    text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data[8 + length:]


def write_safetensors_atomic(path: Path, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """safetensors.torch.save with sorted metadata (byte-stable: same tensors and metadata, same bytes), written
    atomically."""
    from safetensors.torch import save

    data = canonical_safetensors(save(tensors, metadata=metadata))
    write_atomic(path, lambda tmp: tmp.write_bytes(data))


def sha256_of(path: Path, chunk: int = 8 << 20) -> str:
    """The sha256 (hex) of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()
