"""The `encode-text` stage: prompt embeddings of captions, validation prompts and the empty prompt, cached in two
stores (captions for train, validation prompts for validate).

Embeddings equal what the flavour's diffusers pipeline computes in `encode_prompt` (see text_encoding.py; the
encoder is cut after its deepest stacked layer): (512, 3*D) per prompt, all padded positions kept (the
transformer sees them; there is no attention mask). Identical prompts are encoded once: the key is the prompt text
plus everything that shapes its embedding (flavour, stacked layers, max length, encoder identity and precision, stored
dtype). `text_encoder_batch_size` prompts go through the encoder at once; entries are written in shards of
`write_batch_size`, so a killed run keeps what it encoded.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

from tqdm.auto import tqdm

from ..config import Params
from ..data.captions import caption_texts
from ..io import read_jsonl, write_json_atomic
from ..layout import layout_for
from ..models import check_not_distilled, component_identity, resolve_device, torch_dtype
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
    """Cache embeddings for every caption and validation prompt, plus "" (caption dropout, the klein CFG negative).

    Two stores, so that each later stage depends on what it reads and nothing else: `text_embeds/` holds the
    captions' embeddings (train's input; index.json {"captions": {image_id: key}, "empty": key}) and
    `prompt_embeds/` the validation prompts' (validate's input; index.json {"prompts": {name: key}, "prompt_texts":
    {name: text}, "empty": key}). Editing a validation prompt encodes that prompt and leaves `text_embeds/`
    byte-identical, so DVC re-runs validate and not train. One encoder serves both.
    """
    check_not_distilled(params.model)  # embeddings are cached for training: refuse a step-distilled klein early
    layout = layout_for(root, params.output_dir)
    cfg = params.encode_text
    rows = read_jsonl(layout.captions_manifest)
    captions = {row["id"]: row["caption"] for row in rows}
    # images with several captions (a multi-line caption file): every one is embedded; train picks one per step
    caption_lines = {row["id"]: caption_texts(row) for row in rows if row.get("captions")}
    library = load_prompt_library(root / params.validate_.user_prompt_library, params.validate_.validation_subject)

    identity = component_identity(params.model, "text_encoder")
    caption_keys = {image_id: text_key(params, c, identity) for image_id, c in captions.items()}
    line_keys = {image_id: [text_key(params, c, identity) for c in lines] for image_id, lines in caption_lines.items()}
    prompt_keys = {name: text_key(params, p, identity) for name, p in library.items()}
    empty_key = text_key(params, "", identity)
    stores = {
        "captions": (TensorStore(layout.text_embeds_dir, write_batch_size=cfg.write_batch_size, verify=True),
                     {text_key(params, p, identity): p
                      for p in [*captions.values(), *(c for lines in caption_lines.values() for c in lines), ""]}),
        "prompts": (TensorStore(layout.prompt_embeds_dir, write_batch_size=cfg.write_batch_size, verify=True),
                    {text_key(params, p, identity): p for p in [*library.values(), ""]}),
    }
    # what each store lacks; a text both need (the empty prompt, a caption that is also a prompt) is encoded once
    todo = {name: {k: p for k, p in wanted.items() if not store.has(k)} for name, (store, wanted) in stores.items()}
    to_encode = {k: p for missing in todo.values() for k, p in missing.items()}
    unique = {k for _, wanted in stores.values() for k in wanted}
    damaged = sum(len(store.damaged) for store, _ in stores.values())
    log.info("encode-text: %d unique prompts (%d captions, %d validation prompts), %d cached, %d to encode%s",
             len(unique), len(captions), len(library), len(unique) - len(to_encode), len(to_encode),
             f"; {damaged} damaged shard(s) deleted" if damaged else "")
    if to_encode:
        _encode_into(params, list(to_encode.items()),
                     {name: (store, set(todo[name])) for name, (store, _) in stores.items()})
    pruned: set[str] = set()  # distinct keys: the empty prompt's entry lives in both stores
    for store, wanted in stores.values():
        before = store.keys()
        store.prune(set(wanted))
        pruned |= before - store.keys()
    common = {"layers": list(text_layers(params)), "encoder": identity, "empty": empty_key}
    # caption_lines only when some image has several: the index of single-caption data (part of the train
    # fingerprint) stays as it was
    lines = {"caption_lines": line_keys} if line_keys else {}
    write_json_atomic(layout.text_embeds_dir / INDEX, {"captions": caption_keys, **lines, **common})
    write_json_atomic(layout.prompt_embeds_dir / INDEX, {"prompts": prompt_keys, "prompt_texts": library, **common})
    return {"unique_prompts": len(unique), "encoded": len(to_encode), "reused": len(unique) - len(to_encode),
            "pruned": len(pruned)}


def _encode_into(params: Params, todo: list[tuple[str, str]], stores: dict[str, tuple[TensorStore, set[str]]]) -> None:
    """Encode (key, text) pairs in batches of text_encoder_batch_size; each embedding goes into every store whose
    key set holds its key. Shards are written as they fill, so a killed run keeps what it encoded."""
    cfg = params.encode_text
    device = resolve_device(params.model.device)
    encoder = PromptEncoder.from_pretrained(params.model, text_layers(params), cfg.max_sequence_length, device,
                                            precision=cfg.text_encoder_1_precision,
                                            truncate=cfg.truncate_text_encoder,
                                            group_offload=cfg.group_offload_text_encoder)
    store_dtype = torch_dtype(cfg.cache_dtype)
    with contextlib.ExitStack() as open_stores, tqdm(total=len(todo), desc="encode-text", unit="prompt") as bar:
        for store, _ in stores.values():
            open_stores.enter_context(store)  # the last partial shard is written on the way out
        for start in range(0, len(todo), cfg.text_encoder_batch_size):
            chunk = todo[start:start + cfg.text_encoder_batch_size]
            embeds = encoder.encode([p for _, p in chunk])
            for (key, _), emb in zip(chunk, embeds):
                for store, keys in stores.values():
                    if key in keys:
                        store.put(key, {"prompt_embeds": emb.to(store_dtype)})
            bar.update(len(chunk))


def read_text_index(layout) -> dict:
    """The captions' index (`text_embeds/index.json`)."""
    return _read_index(layout.text_embeds_dir / INDEX)


def read_prompt_index(layout) -> dict:
    """The validation prompts' index (`prompt_embeds/index.json`)."""
    return _read_index(layout.prompt_embeds_dir / INDEX)


def _read_index(path: Path) -> dict:
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run the encode-text stage first")
    return json.loads(path.read_text())
