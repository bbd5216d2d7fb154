"""What the caches hold: entries, shards, bytes and dtypes per store, and how they relate to the current indexes."""

from __future__ import annotations

import json
from contextlib import chdir
from pathlib import Path

from ..config import Params
from ..layout import layout_for
from .store import TensorStore


def _index_keys(index: dict) -> set[str]:
    """Every cache key an index.json refers to (strings nested in its maps and lists that look like sha256s)."""
    keys: set[str] = set()

    def walk(value) -> None:
        if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
            keys.add(value)
        elif isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    for name in ("images", "references", "masks", "captions", "caption_lines", "prompts", "empty"):
        walk(index.get(name))
    return keys


def cache_info(params: Params, root: Path, verify: bool = False) -> dict[str, dict]:
    """Per store (latents, text_embeds, prompt_embeds): entries, shards, bytes, dtypes, damaged shards, and how many entries the
    store's index.json uses. verify=True reads every tensor and checks its checksum."""
    layout = layout_for(root, params.output_dir)
    out = {}
    for name, folder in (("latents", layout.latents_dir), ("text_embeds", layout.text_embeds_dir),
                         ("prompt_embeds", layout.prompt_embeds_dir)):
        store = TensorStore(folder)
        info = store.info()
        index_path = folder / "index.json"
        used = _index_keys(json.loads(index_path.read_text())) if index_path.exists() else set()
        keys = store.keys()
        info.update({"folder": str(folder), "indexed": len(used & keys), "not_indexed": len(keys - used),
                     "missing": len(used - keys)})
        if verify:
            info["damaged"] = sorted(set(info["damaged"]) | set(store.verify_all()))
        out[name] = info
    return out


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _current_stages(root: Path) -> list[str]:
    """The pipeline's stages that dvc.lock says are up to date (none without a dvc.lock)."""
    from ..stages import STAGES, DvcPipeline

    if not (root / "dvc.lock").exists() or not (root / "dvc.yaml").exists():
        return []
    with chdir(root), DvcPipeline(root) as dvc:  # DVC resolves its run cache against the working directory
        return [name for name in STAGES if dvc.is_current(name)]


def prune_unused(params: Params, root: Path, dry_run: bool = False) -> dict[str, dict]:
    """Remove from each store (latents, text_embeds, prompt_embeds) the entries its index.json does not use, and
    rewrite the shards that held them, so their bytes leave the disk. Returns per store the entries removed and the
    bytes freed (dry_run: what would be, estimated from the shards' sizes; nothing is touched), under "stores", and
    the stages recorded again in dvc.lock under "recorded_stages".

    The stores are DVC outputs: a prune changes their hash without changing a single entry the index (and so the
    stages after it) reads. Stages that dvc.lock said were up to date before the prune are recorded again after it
    (as `dvc commit --force` would), so a prune never makes `dvc repro` retrain; stages out of date stay so. A store
    without an index.json (its encode stage never finished) is left alone: nothing says which entries it needs.
    """
    layout = layout_for(root, params.output_dir)
    plan = {}
    for name, folder in (("latents", layout.latents_dir), ("text_embeds", layout.text_embeds_dir),
                         ("prompt_embeds", layout.prompt_embeds_dir)):
        index_path = folder / "index.json"
        store = TensorStore(folder)
        if not index_path.exists():
            plan[name] = {"entries": 0, "bytes": 0, "skipped": "no index.json (run its encode stage first)"}
            continue
        used = _index_keys(json.loads(index_path.read_text()))
        by_shard: dict[Path, set[str]] = {}
        for key in store.keys():
            by_shard.setdefault(store.shard_of(key), set()).add(key)
        unused = store.keys() - used
        # a shard holding only unused entries frees its whole size; a mixed one about the unused entries' share
        freed = 0
        for shard, keys in by_shard.items():
            dead = len(keys - used)
            if shard is not None and dead:
                freed += shard.stat().st_size * dead // len(keys)
        plan[name] = {"entries": len(unused), "bytes": freed, "store": store, "used": used}
    recorded: list[str] = []
    if not dry_run and any(row["entries"] for row in plan.values()):
        recorded = _current_stages(root)
        for row in plan.values():
            if row["entries"]:
                before = row["store"].nbytes()
                row["store"].prune(row["used"], compact_all=True)
                row["bytes"] = before - row["store"].nbytes()
        if recorded:
            from ..stages import DvcPipeline

            with chdir(root), DvcPipeline(root) as dvc:
                for stage in recorded:
                    dvc.record(stage)
    return {"dry_run": dry_run, "recorded_stages": recorded,
            "stores": {name: {k: v for k, v in row.items() if k not in ("store", "used")} for name, row in plan.items()}}
