"""Content-addressed tensor stores on disk: one safetensors file per key, written atomically.

A key is the sha256 of everything that determines the tensor (inputs + model identity + settings), so a changed
flavour, resolution or caption can never reuse a wrong entry, and an unchanged one is never computed twice. An
entry that fails to open (a damaged or truncated file) counts as missing and is recomputed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..io import write_atomic


def content_key(**parts) -> str:
    """sha256 over a canonical JSON of `parts`."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


class TensorStore:
    """A folder of `<key>.safetensors` entries."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.entries = self.folder / "entries"

    def path(self, key: str) -> Path:
        return self.entries / f"{key}.safetensors"

    def has(self, key: str) -> bool:
        path = self.path(key)
        if not path.exists():
            return False
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    f.get_slice(name)  # header and offsets are consistent with the file size
            return path.stat().st_size > 0
        except Exception:
            return False

    def put(self, key: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
        write_atomic(self.path(key), lambda tmp: save_file(tensors, str(tmp), metadata=metadata or {}))

    def get(self, key: str) -> dict[str, torch.Tensor]:
        path = self.path(key)
        try:
            return load_file(str(path))
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: cache entry missing; re-run the encode stage") from None

    def keys(self) -> set[str]:
        return {p.stem for p in self.entries.glob("*.safetensors")} if self.entries.exists() else set()

    def prune(self, keep: set[str]) -> int:
        """Delete entries not in `keep` (the store mirrors the current dataset exactly). Returns how many."""
        stale = self.keys() - keep
        for key in stale:
            self.path(key).unlink(missing_ok=True)
        for tmp in self.entries.glob(".*.tmp") if self.entries.exists() else []:
            tmp.unlink(missing_ok=True)  # leftovers of a killed write
        return len(stale)

    def nbytes(self) -> int:
        return sum(p.stat().st_size for p in self.entries.glob("*.safetensors")) if self.entries.exists() else 0
