"""The `encode-latents` stage: normalised, patchified VAE latents of every accepted image, cached.

Images are resized to cover the square training resolution and centre-cropped by diffusers' own
`Flux2ImageProcessor` (the pipelines' preprocessing), then encoded with the latent distribution's mode.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config import Params
from ..data.images import open_rgb
from ..data.prepare import read_jsonl
from ..io import write_json_atomic
from ..latents import encode_pixels
from ..layout import layout_for
from ..models import component_identity, load_vae, resolve_device, torch_dtype
from .store import TensorStore, content_key

log = logging.getLogger(__name__)

INDEX = "index.json"
CROP = "center"


def image_processor():
    from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor

    # VAE /8 then 2x2 patches: sides must be multiples of 16
    return Flux2ImageProcessor(vae_scale_factor=16)


def preprocess(image, width: int, height: int) -> torch.Tensor:
    """PIL RGB -> (1, 3, height, width) in [-1, 1]: resize to cover, then centre crop, as the pipelines do."""
    return image_processor().preprocess(image, height=height, width=width, resize_mode="crop")


def latent_key(params: Params, image_sha256: str, vae_identity: str) -> str:
    cfg = params.encode_latents
    return content_key(kind="latent", image=image_sha256, width=cfg.resolution, height=cfg.resolution, crop=CROP,
                       vae=vae_identity, dtype=cfg.cache_dtype)


def encode_latents(params: Params, root: Path) -> dict:
    """Cache latents (128, R/16, R/16) for every image in images.jsonl; writes `latents/index.json`."""
    layout = layout_for(root, params.output_dir)
    cfg = params.encode_latents
    images = read_jsonl(layout.images_manifest)
    identity = component_identity(params.model, "vae")
    keys = {row["id"]: latent_key(params, row["sha256"], identity) for row in images}
    store = TensorStore(layout.latents_dir)
    todo = [row for row in images if not store.has(keys[row["id"]])]
    todo = list({keys[r["id"]]: r for r in todo}.values())  # identical files are encoded once
    log.info("encode-latents: %d images, %d cached, %d to encode", len(images), len(images) - len(todo), len(todo))
    if todo:
        device = resolve_device(params.model.device)
        vae = load_vae(params.model, device)
        store_dtype = torch_dtype(cfg.cache_dtype)
        with tqdm(total=len(todo), desc="encode-latents", unit="img") as bar:
            for start in range(0, len(todo), cfg.vae_batch_size):
                chunk = todo[start:start + cfg.vae_batch_size]
                pixels = torch.cat([preprocess(open_rgb(root / row["path"]), cfg.resolution, cfg.resolution)
                                    for row in chunk])
                latents = encode_pixels(vae, pixels)
                for row, lat in zip(chunk, latents):
                    store.put(keys[row["id"]], {"latents": lat.to(store_dtype)})
                bar.update(len(chunk))
        del vae
    pruned = store.prune(set(keys.values()))
    write_json_atomic(layout.latents_dir / INDEX, {"images": keys, "resolution": [cfg.resolution, cfg.resolution],
                                                    "vae": identity})
    return {"images": len(images), "encoded": len(todo), "reused": len(images) - len(todo), "pruned": pruned}


def read_latent_index(layout) -> dict:
    path = layout.latents_dir / INDEX
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run the encode-latents stage first")
    return json.loads(path.read_text())
