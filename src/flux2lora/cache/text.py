"""The `encode-text` stage: prompt embeddings of captions, validation prompts and the empty prompt, cached.

Embeddings equal what the flavour's diffusers pipeline computes in `encode_prompt` (see text_encoding.py; the
encoder is cut after its deepest stacked layer): (512, 3*D) per prompt, all padded positions kept (the
transformer sees them; there is no attention mask). Identical prompts are encoded once: the key is the prompt text
plus everything that shapes its embedding (flavour, stacked layers, max length, encoder identity and precision, stored
dtype). `text_encoder_batch_size` prompts go through the encoder at once; entries are written in shards of
`write_batch_size`, so a killed run keeps what it encoded.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config import Params
from ..data.prepare import read_jsonl
from ..io import write_json_atomic
from ..layout import layout_for
from ..models import component_identity, resolve_device, torch_dtype
from ..prompts import load_prompt_library
from ..text_encoding import PromptEncoder
from .store import TensorStore, content_key

log = logging.getLogger(__name__)

INDEX = "index.json"


def text_layers(params: Params) -> tuple[int, ...]:
    return tuple(params.encode_text.text_encoder_out_layers or params.model.flavour.stacked_layers)


def text_key(params: Params, prompt: str, encoder_identity: str) -> str:
    cfg = params.encode_text
    precision = cfg.text_encoder_1_precision or params.model.base_model_default_dtype
    return content_key(kind="text", prompt=prompt, flavour=params.model.model_flavour, layers=text_layers(params),
                       max_sequence_length=cfg.max_sequence_length, encoder=encoder_identity,
                       precision=precision, dtype=cfg.cache_dtype)


def encode_text(params: Params, root: Path) -> dict:
    """Cache embeddings for every caption and validation prompt, plus "" (CFG negative / caption dropout).

    Writes `text_embeds/index.json`: {"captions": {image_id: key}, "prompts": {name: key}, "empty": key}.
    """
    layout = layout_for(root, params.output_dir)
    cfg = params.encode_text
    captions = {row["id"]: row["caption"] for row in read_jsonl(layout.captions_manifest)}
    library = load_prompt_library(root / params.validate_.user_prompt_library, params.validate_.validation_subject)

    identity = component_identity(params.model, "text_encoder")
    caption_keys = {image_id: text_key(params, c, identity) for image_id, c in captions.items()}
    prompt_keys = {name: text_key(params, p, identity) for name, p in library.items()}
    empty_key = text_key(params, "", identity)
    by_key = {text_key(params, p, identity): p for p in [*captions.values(), *library.values(), ""]}

    store = TensorStore(layout.text_embeds_dir, write_batch_size=cfg.write_batch_size, verify=True)
    todo = [(k, p) for k, p in by_key.items() if not store.has(k)]
    log.info("encode-text: %d unique prompts (%d captions), %d cached, %d to encode%s", len(by_key), len(captions),
             len(by_key) - len(todo), len(todo),
             f"; {len(store.damaged)} damaged shard(s) deleted" if store.damaged else "")
    if todo:
        device = resolve_device(params.model.device)
        encoder = PromptEncoder.from_pretrained(params.model, text_layers(params), cfg.max_sequence_length, device,
                                                precision=cfg.text_encoder_1_precision,
                                                truncate=cfg.truncate_text_encoder,
                                                group_offload=cfg.group_offload_text_encoder)
        store_dtype = torch_dtype(cfg.cache_dtype)
        # `with store`: shards of write_batch_size are written as they fill, the last partial one on the way out
        with store, tqdm(total=len(todo), desc="encode-text", unit="prompt") as bar:
            for start in range(0, len(todo), cfg.text_encoder_batch_size):
                chunk = todo[start:start + cfg.text_encoder_batch_size]
                embeds = encoder.encode([p for _, p in chunk])
                for (key, _), emb in zip(chunk, embeds):
                    store.put(key, {"prompt_embeds": emb.to(store_dtype)})
                bar.update(len(chunk))
        del encoder
    pruned = store.prune(set(by_key))
    index = {"captions": caption_keys, "prompts": prompt_keys, "prompt_texts": library, "empty": empty_key,
             "layers": list(text_layers(params)), "encoder": identity}
    write_json_atomic(layout.text_embeds_dir / INDEX, index)
    return {"unique_prompts": len(by_key), "encoded": len(todo), "reused": len(by_key) - len(todo), "pruned": pruned}


def read_text_index(layout) -> dict:
    import json

    path = layout.text_embeds_dir / INDEX
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run the encode-text stage first")
    return json.loads(path.read_text())
