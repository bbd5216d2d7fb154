"""Content-addressed tensor stores on disk: entries packed into safetensors shards, written atomically, checked.

A key is the sha256 of everything that determines the tensor (inputs + model identity + settings), so a changed
flavour, resolution or caption can never reuse a wrong entry, and an unchanged one is never computed twice.

Layout: `<store>/shards/<name>.safetensors`. A shard holds up to `write_batch_size` entries as tensors named
`<key>/<tensor name>`, and lists them in its header with a sha256 per tensor. It appears by an atomic rename: a killed
writer leaves complete shards, which the next run reuses, and at most a temporary file, which is deleted.

Damage: a shard whose header does not parse or disagrees with the file size (truncated, partly overwritten) is
unusable. Writers (the encode stages, `verify=True`) also check the tensor checksums of every shard they have not
verified in its current (size, mtime) and delete damaged shards, so their entries are encoded again. Verification
stamps live beside the store in `../state/` (outside the DVC output: they describe files, not results). Readers
check each entry they load and, on a mismatch, withdraw the shard's stamp so the next encode run re-checks it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import UserError
from ..io import write_atomic, write_safetensors_atomic

log = logging.getLogger(__name__)

FORMAT = "flux2lora.tensorstore/1"
SHARD_SUFFIX = ".safetensors"


def content_key(**parts) -> str:
    """sha256 over a canonical JSON of `parts`."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def tensor_digest(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's raw bytes (any dtype, bf16 included)."""
    raw = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
    return hashlib.sha256(raw).hexdigest()


class CacheEntryDamaged(UserError, RuntimeError):
    """A stored tensor does not match its checksum: the encode stage must compute it again. Not permanent: the
    next run of train or validate re-checks the cache and re-encodes damaged entries first (cache/repair.py)."""

    permanent = False


class _DamagedShard(Exception):
    pass


@dataclass(frozen=True)
class _Entry:
    shard: str
    checksums: dict[str, str]  # tensor name -> sha256


def _read_header(path: Path) -> dict[str, dict[str, str]]:
    """{key: {tensor name: sha256}} from a shard's header; _DamagedShard if it cannot be trusted."""
    try:
        with safe_open(str(path), framework="pt") as f:  # checks the header against the file size
            metadata = f.metadata() or {}
            names = set(f.keys())
    except Exception as e:
        raise _DamagedShard(f"unreadable ({e})") from None
    if metadata.get("format") != FORMAT:
        raise _DamagedShard(f"not a {FORMAT} shard")
    try:
        entries = json.loads(metadata["entries"])
    except (KeyError, ValueError):
        raise _DamagedShard("its entry list is missing or broken") from None
    if {f"{key}/{name}" for key, checksums in entries.items() for name in checksums} != names:
        raise _DamagedShard("its entry list disagrees with its tensors")
    return entries


def _verify_shard(path: Path, entries: dict[str, dict[str, str]]) -> None:
    """Read every tensor and compare its checksum; _DamagedShard on the first mismatch."""
    try:
        with safe_open(str(path), framework="pt") as f:
            for key, checksums in entries.items():
                for name, digest in checksums.items():
                    if tensor_digest(f.get_tensor(f"{key}/{name}")) != digest:
                        raise _DamagedShard(f"checksum mismatch in {key}/{name}")
    except _DamagedShard:
        raise
    except Exception as e:
        raise _DamagedShard(f"unreadable ({e})") from None


class TensorStore:
    """A folder of content-addressed entries, each a dict of named tensors, packed into safetensors shards.

    `put` buffers entries and writes a shard every `write_batch_size` of them (and on `flush` / leaving a `with`
    block). `verify=True` is for writers: shards not verified before are checked in full and damaged ones deleted.
    """

    def __init__(self, folder: Path, write_batch_size: int = 1, verify: bool = False):
        self.folder = Path(folder)
        self.shards_dir = self.folder / "shards"
        self.write_batch_size = write_batch_size
        self.verify = verify
        # next to the store, outside it: the store folder is a DVC output, the stamps are bookkeeping
        self.stamps_path = self.folder.parent / "state" / f"{self.folder.name}.verified.jsonl"
        self._damaged: list[str] = []
        self._catalog: dict[str, _Entry] | None = None
        self._shard_keys: dict[str, set[str]] = {}
        self._pending: dict[str, dict[str, torch.Tensor]] = {}

    # -- catalog

    def _read_stamps(self) -> dict[str, list[int]]:
        stamps: dict[str, list[int]] = {}
        if self.stamps_path.exists():
            for line in self.stamps_path.read_text().splitlines():
                try:
                    row = json.loads(line)
                    stamps[row["shard"]] = row["stamp"]  # later lines win; "stamp": null withdraws
                except (ValueError, KeyError, TypeError):
                    continue  # a line torn by a kill
        return {k: v for k, v in stamps.items() if v}

    def _append_stamp(self, shard: str, stamp: list[int] | None) -> None:
        self.stamps_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.stamps_path, "a") as f:
            f.write(json.dumps({"shard": shard, "stamp": stamp}) + "\n")

    @staticmethod
    def _stamp(path: Path) -> list[int]:
        stat = path.stat()
        return [stat.st_size, stat.st_mtime_ns]

    def _load(self) -> dict[str, _Entry]:
        if self._catalog is not None:
            return self._catalog
        catalog: dict[str, _Entry] = {}
        stamps = self._read_stamps() if self.verify else {}
        verified: dict[str, list[int]] = {}
        shards = list(self.shards_dir.glob(f"*{SHARD_SUFFIX}")) if self.shards_dir.exists() else []
        # oldest first, so a key written again (a later put) resolves to its newest copy
        shards.sort(key=lambda p: (p.stat().st_mtime_ns, p.name))
        for path in shards:
            try:
                entries = _read_header(path)
                if self.verify:
                    stamp = self._stamp(path)
                    if stamps.get(path.name) != stamp:
                        _verify_shard(path, entries)
                    verified[path.name] = stamp
            except _DamagedShard as e:
                self._damaged.append(path.name)
                if self.verify:
                    log.warning("cache shard %s is damaged (%s): deleted, its entries will be encoded again", path, e)
                    path.unlink(missing_ok=True)
                else:
                    log.warning("cache shard %s is damaged (%s): its entries count as missing", path, e)
                continue
            for key, checksums in entries.items():
                catalog[key] = _Entry(path.name, checksums)
            self._shard_keys[path.name] = set(entries)
        if self.verify:  # rewrite the stamps compactly: only shards that exist and were verified
            write_atomic(self.stamps_path, lambda tmp: tmp.write_text(
                "".join(json.dumps({"shard": s, "stamp": v}) + "\n" for s, v in sorted(verified.items()))))
        self._catalog = catalog
        return catalog

    @property
    def damaged(self) -> list[str]:
        """Shards found damaged when the store was opened (deleted there if verify=True)."""
        self._load()
        return list(self._damaged)

    # -- the interface train and validate use

    def has(self, key: str) -> bool:
        """True when `key` is stored (or buffered) and its shard is intact."""
        return key in self._pending or key in self._load()

    def get(self, key: str) -> dict[str, torch.Tensor]:
        """The tensors of `key`, checked against their checksums (CacheEntryDamaged on a mismatch)."""
        if key in self._pending:
            return dict(self._pending[key])
        entry = self._load().get(key)
        if entry is None:
            raise FileNotFoundError(f"{self.folder}: cache entry {key} missing; re-run the encode stage")
        path = self.shards_dir / entry.shard
        try:
            with safe_open(str(path), framework="pt") as f:
                # copies: safetensors' tensors view the memory-mapped file, which compaction or damage may change
                tensors = {name: f.get_tensor(f"{key}/{name}").clone() for name in entry.checksums}
        except Exception as e:
            self._withdraw(entry.shard)
            raise CacheEntryDamaged(f"{path}: cannot read entry {key} ({e}); run the stage again (dvc repro): it "
                                    "re-checks the cache first and re-encodes damaged entries") from None
        for name, tensor in tensors.items():
            if tensor_digest(tensor) != entry.checksums[name]:
                self._withdraw(entry.shard)
                raise CacheEntryDamaged(f"{path}: entry {key}/{name} does not match its checksum (damaged on disk); "
                                        "run the stage again (dvc repro): it re-checks the cache first and "
                                        "re-encodes damaged entries")
        return tensors

    def _withdraw(self, shard: str) -> None:
        try:
            self._append_stamp(shard, None)
        except OSError:
            pass  # read-only checkout: the encode stage's own checks still apply

    def put(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        """Buffer an entry; a shard is written when `write_batch_size` entries are buffered."""
        self._pending[key] = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
        if len(self._pending) >= self.write_batch_size:
            self.flush()

    def flush(self) -> None:
        """Write the buffered entries as one shard (atomically)."""
        if not self._pending:
            return
        catalog = self._load()
        pending, self._pending = self._pending, {}
        checksums = {key: {name: tensor_digest(t) for name, t in tensors.items()} for key, tensors in pending.items()}
        flat = {f"{key}/{name}": t for key, tensors in pending.items() for name, t in tensors.items()}
        name = hashlib.sha256("\n".join(sorted(pending)).encode()).hexdigest()[:24] + SHARD_SUFFIX
        path = self.shards_dir / name
        metadata = {"format": FORMAT, "entries": json.dumps(checksums, sort_keys=True)}
        write_safetensors_atomic(path, flat, metadata)  # sorted metadata: the same entries give the same bytes
        for key in pending:
            catalog[key] = _Entry(name, checksums[key])
        self._shard_keys[name] = set(pending)
        if self.verify:
            self._append_stamp(name, self._stamp(path))

    def __enter__(self) -> "TensorStore":
        return self

    def __exit__(self, *exc) -> None:
        self.flush()  # entries computed before an error are kept: they are complete

    # -- maintenance

    def keys(self) -> set[str]:
        return set(self._load()) | set(self._pending)

    def shard_of(self, key: str) -> Path | None:
        """The shard file holding `key` (None when missing or only buffered)."""
        entry = self._load().get(key)
        return self.shards_dir / entry.shard if entry else None

    def prune(self, keep: set[str], compact_all: bool = False) -> int:
        """Forget entries not in `keep` (the store mirrors the current dataset). Shards left with no live entry are
        deleted; shards less than half live are compacted (compact_all=True: every shard holding an entry not in
        `keep`, so none of their bytes stay on disk, as `flux2lora cache prune` wants). Returns how many entries were
        dropped."""
        self.flush()
        catalog = self._load()
        stale = set(catalog) - keep
        for shard, keys in sorted(self._shard_keys.items()):
            live = {k for k in keys if k in keep and catalog.get(k) and catalog[k].shard == shard}
            if len(live) == len(keys):
                continue
            path = self.shards_dir / shard
            if live and len(live) * 2 >= len(keys) and not compact_all:
                continue  # mostly live: rewriting it would cost more than the space it frees
            for key in sorted(live):
                self._pending[key] = self.get(key)
            self.flush()  # written (atomically) before the old shard goes
            path.unlink(missing_ok=True)
            del self._shard_keys[shard]
        for key in stale:
            catalog.pop(key, None)
        if self.shards_dir.exists():
            for tmp in self.shards_dir.glob(".*.tmp"):
                tmp.unlink(missing_ok=True)  # leftovers of a killed write
        legacy = self.folder / "entries"  # one-file-per-entry stores of earlier versions
        if legacy.is_dir():
            shutil.rmtree(legacy, ignore_errors=True)
        return len(stale)

    def nbytes(self) -> int:
        """Bytes on disk of all shards."""
        return sum(p.stat().st_size for p in self.shards_dir.glob(f"*{SHARD_SUFFIX}")) if self.shards_dir.exists() \
            else 0

    def info(self) -> dict:
        """Entries, shards, bytes and tensor dtypes of the store (headers only; no tensor is read)."""
        catalog = self._load()
        dtypes: Counter = Counter()
        for shard in self._shard_keys:
            with safe_open(str(self.shards_dir / shard), framework="pt") as f:
                dtypes.update(f.get_slice(name).get_dtype() for name in f.keys())
        return {"entries": len(catalog), "shards": len(self._shard_keys), "bytes": self.nbytes(),
                "dtypes": dict(dtypes), "damaged": self.damaged}

    def verify_all(self) -> list[str]:
        """Check every tensor of every shard (ignoring stamps); returns the damaged shards and withdraws their
        stamps, so the next encode run deletes and re-encodes them."""
        damaged = []
        for path in sorted(self.shards_dir.glob(f"*{SHARD_SUFFIX}")) if self.shards_dir.exists() else []:
            try:
                _verify_shard(path, _read_header(path))
            except _DamagedShard as e:
                log.warning("cache shard %s is damaged: %s", path, e)
                damaged.append(path.name)
                self._withdraw(path.name)
        return damaged
