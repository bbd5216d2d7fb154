"""What the caches hold: entries, shards, bytes and dtypes per store, and how they relate to the current indexes."""

from __future__ import annotations

import json
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

    for name in ("images", "references", "captions", "caption_lines", "prompts", "empty"):
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
