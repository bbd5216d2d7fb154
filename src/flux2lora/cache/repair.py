"""Caches that heal where the pipeline reads them: before train (and validate) run, the entries they are about to
use are checked and damaged ones re-encoded through the encode stages' own functions.

Why here and not in DVC: DVC trusts its record of a file's (inode, size, mtime), so bit rot that keeps the mtime
(a flipped byte, a restored backup) leaves `dvc status` saying everything is up to date, and the encode stages'
own checks skip shards whose (size, mtime) they verified before. The stage that reads a cache therefore checks the
shards it will read in full (every tensor's sha256 against the shard header), deletes the damaged ones, and calls
`encode_latents` / `encode_text`, which re-encode exactly the missing entries into shards of the same names. The
encoders are deterministic, so the repaired shards are byte-identical to the originals and DVC's records of the
encode stages and of train's dependencies stay true: a plain `dvc repro` heals the cache and trains, and a later
`dvc status` is clean. Each repair is logged and recorded in `<output_dir>/state/cache_repairs.jsonl`.

Cost: one read of the shards in use before training (train reads each entry anyway, checked the same way, every
epoch); the hashing runs in threads.
"""

from __future__ import annotations

import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..config import Params
from ..layout import layout_for
from .info import _index_keys
from .store import TensorStore, _DamagedShard, _read_header, _verify_shard

log = logging.getLogger(__name__)

STORES = ("latents", "text_embeds")
REPAIRS_FILE = "cache_repairs.jsonl"


def damaged_shards(folder: Path, keys: set[str], workers: int = 4) -> tuple[list[str], int]:
    """Shards of the store in `folder` that hold one of `keys` and fail a full check, and how many of `keys` are
    in no intact shard (a shard whose header is damaged hides its entries)."""
    store = TensorStore(folder)
    shards = sorted({store.shard_of(k).name for k in keys if store.shard_of(k) is not None})
    missing = sum(1 for k in keys if not store.has(k))

    def check(name: str) -> str | None:
        path = store.shards_dir / name
        try:
            _verify_shard(path, _read_header(path))
        except _DamagedShard as e:
            log.warning("cache shard %s is damaged (%s)", path, e)
            return name
        return None

    with ThreadPoolExecutor(workers) as pool:  # hashlib releases the GIL on large buffers
        damaged = [name for name in pool.map(check, shards) if name]
    return sorted(set(damaged) | set(store.damaged)), missing


def _encode(params: Params, root: Path, name: str) -> dict:
    """Run the encode stage that fills the store `name` (it re-encodes exactly the entries that are missing)."""
    if name == "latents":
        from .latents import encode_latents

        return encode_latents(params, root)
    if name in ("text_embeds", "prompt_embeds"):  # captions, and validation prompts where they have their own store
        from .text import encode_text

        return encode_text(params, root)
    raise ValueError(f"no encode stage fills a store named {name!r}")


def repair_caches(params: Params, root: Path, stores: tuple[str, ...] = STORES) -> dict:
    """Check the entries the current index.json files of `stores` use; delete damaged shards and re-encode their
    entries (and any missing ones) with the encode stage of each store. Returns {store: {"damaged_shards": [...],
    "missing_entries": n, "reencoded": n}} for the stores that needed a repair ({} when all were intact).

    Called once per stage run, before the stage reads anything (flux2lora.stages.run_stage; for a multi-process
    train, by the launcher before it starts the processes), so no two processes repair at once."""
    layout = layout_for(root, params.output_dir)
    repaired: dict[str, dict] = {}
    for name in stores:
        folder = layout.output_dir / name
        index_path = folder / "index.json"
        if not index_path.exists():
            continue  # never encoded: the reader's own error says which stage to run
        keys = _index_keys(json.loads(index_path.read_text()))
        damaged, missing = damaged_shards(folder, keys)
        if not damaged and not missing:
            continue
        store = TensorStore(folder)
        for shard in damaged:
            (store.shards_dir / shard).unlink(missing_ok=True)
            store._withdraw(shard)
        log.warning("%s cache: %d damaged shard(s) deleted and %d entries missing; re-encoding them with the "
                    "%s stage before reading the cache", name, len(damaged), missing,
                    "encode-latents" if name == "latents" else "encode-text")
        summary = _encode(params, root, name)
        repaired[name] = {"damaged_shards": damaged, "missing_entries": missing,
                          "reencoded": summary.get("encoded", 0)}
        layout.state_dir.mkdir(parents=True, exist_ok=True)
        with open(layout.state_dir / REPAIRS_FILE, "a") as f:
            f.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "store": name,
                                **repaired[name]}, sort_keys=True) + "\n")
    return repaired
