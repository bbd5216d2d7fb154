"""What prepare learned about each file, remembered by (path, size, mtime_ns), so a rerun only stats unchanged files.

Decoding every image is what makes prepare slow; its outcome (content hash, upright size, or the reason the file is
unusable) depends only on the file's bytes. A record is reused while the file's size and modification time are
unchanged (the test git and DVC use too). Records are committed in batches as they are made, so a killed prepare
keeps what it already inspected. The store is a cache outside DVC's outputs: deleting it only costs time.
"""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass, replace
from pathlib import Path

from .images import MAX_IMAGE_PIXELS

# Bump when what `inspect_image` checks changes: older records are then ignored.
INSPECTION_VERSION = f"3:{MAX_IMAGE_PIXELS}"  # 3: paths relative to the project


@dataclass(frozen=True)
class FileRecord:
    """The outcome of inspecting one file: facts when usable, else a skip reason and its explanation."""

    size: int
    mtime_ns: int
    sha256: str | None = None
    width: int = 0
    height: int = 0
    reason: str | None = None
    detail: str | None = None


class FileRecords:
    """An sqlite table of FileRecord by path relative to `root` (the project): a moved or copied project keeps
    its records, and prepare re-decodes nothing."""

    def __init__(self, path: Path, root: Path | None = None):
        self.path = Path(path)
        self.root = Path(root).resolve() if root is not None else None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(self.path), timeout=60)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
        self.db.execute("CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, "
                        "sha256 TEXT, width INTEGER, height INTEGER, reason TEXT, detail TEXT)")
        version = self.db.execute("SELECT value FROM meta WHERE key = 'version'").fetchone()
        if version is None or version[0] != INSPECTION_VERSION:
            self.db.execute("DELETE FROM files")
            self.db.execute("INSERT OR REPLACE INTO meta VALUES ('version', ?)", (INSPECTION_VERSION,))
        self.db.commit()
        self._known = {row[0]: FileRecord(*row[1:]) for row in self.db.execute("SELECT * FROM files")}
        self._pending: list[tuple] = []

    def _key(self, path) -> str:
        if self.root is None:
            return str(path)
        return os.path.relpath(os.path.abspath(path), self.root)

    def lookup(self, path: Path, size: int, mtime_ns: int) -> FileRecord | None:
        """The record of `path` if it was made for a file of this size and mtime, else None."""
        record = self._known.get(self._key(path))
        return record if record and record.size == size and record.mtime_ns == mtime_ns else None

    def add(self, path: Path, record: FileRecord) -> None:
        if record.detail and self.root is not None:
            # a rejection's explanation names the file: kept relative, so a moved project's report names it as before
            record = replace(record, detail=record.detail.replace(str(self.root) + os.sep, ""))
        self._known[self._key(path)] = record
        self._pending.append((self._key(path), record.size, record.mtime_ns, record.sha256, record.width, record.height,
                              record.reason, record.detail))
        if len(self._pending) >= 256:
            self.commit()

    def commit(self) -> None:
        if self._pending:
            self.db.executemany("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, ?, ?, ?)", self._pending)
            self.db.commit()
            self._pending.clear()

    def forget_except(self, paths: set[str]) -> None:
        """Drop records of files no longer in any dataset (keeps the table the size of the data)."""
        paths = {self._key(p) for p in paths}
        stale = [(p,) for p in self._known if p not in paths]
        if stale:
            self.db.executemany("DELETE FROM files WHERE path = ?", stale)
            self.db.commit()
            for (p,) in stale:
                del self._known[p]

    def close(self) -> None:
        self.commit()
        self.db.close()

    def __enter__(self) -> "FileRecords":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
