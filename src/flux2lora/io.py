"""Atomic file writes: a killed process leaves the old file or the new one, never half of one."""

from __future__ import annotations

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


def sort_safetensors_metadata(path: Path) -> None:
    """Rewrite a safetensors file's header with its `__metadata__` keys sorted, in place.

    safetensors keeps metadata in a hash map whose order changes from process to process, so two writes of the same
    tensors and metadata differ in their header bytes (and DVC, S3 and the Hub see a changed file). The tensors'
    entries and offsets are left as they are; the data section is not touched when the sorted header fits the
    original's length (it always does: the same keys and values, reordered), else the file is rewritten whole.
    """
    path = Path(path)
    with open(path, "r+b") as f:
        length = int.from_bytes(f.read(8), "little")
        raw = f.read(length)
        header = json.loads(raw)
        metadata = header.get("__metadata__")
        if not metadata:
            return
        ordered = {"__metadata__": dict(sorted(metadata.items())),
                   **{k: v for k, v in header.items() if k != "__metadata__"}}
        new = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode()
        if new == raw.rstrip(b" "):
            return
        if len(new) <= length:
            f.seek(8)
            f.write(new + b" " * (length - len(new)))  # safetensors pads its header with spaces
            return
    padded = new + b" " * (-len(new) % 8)
    tmp = path.with_name(f".{path.name}.header.tmp")
    with open(path, "rb") as src, open(tmp, "wb") as dst:
        src.seek(8 + length)
        dst.write(len(padded).to_bytes(8, "little") + padded)
        for chunk in iter(lambda: src.read(1 << 24), b""):
            dst.write(chunk)
    os.replace(tmp, path)


def save_safetensors(tensors: dict, path: Path, metadata: dict[str, str] | None = None) -> None:
    """`safetensors.torch.save_file` with byte-stable output: identical tensors and metadata give identical bytes
    (metadata keys sorted; see sort_safetensors_metadata). Not atomic by itself: wrap in write_atomic."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    sort_safetensors_metadata(path)
