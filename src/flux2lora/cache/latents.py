"""The `encode-latents` stage: normalised, patchified VAE latents of every accepted image, at its bucket, cached.

Each image is resized (Lanczos) to cover its aspect bucket and cropped as prepare planned it (`data.buckets`); the
crop is normalised to [-1, 1] by diffusers' own `Flux2ImageProcessor` (the pipelines'). Latents are the latent
distribution's mode. One VAE forward holds one bucket (`vae_batch_size` images); images are decoded in threads
while the VAE runs; entries are written in shards of `write_batch_size`, so a killed run keeps what it encoded.
"""

from __future__ import annotations

import hashlib
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config import Params
from ..data.buckets import CropPlan, apply_plan
from ..data.images import ImageRejected, decode_rgb
from ..data.prepare import WORKERS
from ..io import read_jsonl
from ..io import write_json_atomic
from ..latents import encode_pixels
from ..layout import layout_for
from ..models import check_not_distilled, component_identity, load_vae, resolve_device, torch_dtype
from .masks import encode_masks, plan_mask_jobs
from .store import TensorStore, content_key

log = logging.getLogger(__name__)

INDEX = "index.json"


def image_processor():
    from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor

    # VAE /8 then 2x2 patches: sides must be multiples of 16
    return Flux2ImageProcessor(vae_scale_factor=16)


def preprocess(image, width: int, height: int) -> torch.Tensor:
    """PIL RGB -> (1, 3, height, width) in [-1, 1] exactly as the pipelines prepare a reference image of a size that
    is already a multiple of 16: Flux2ImageProcessor's `resize_mode="crop"` is a centre crop, without resizing."""
    return image_processor().preprocess(image, height=height, width=width, resize_mode="crop")


def latent_key(image_sha256: str, plan: CropPlan, vae_identity: str, cache_dtype: str) -> str:
    """Content key of one latent: the image's bytes, its bucket and crop, the VAE, the stored dtype."""
    return content_key(kind="latent", image=image_sha256, bucket=plan.bucket, resize=plan.resize, offset=plan.offset,
                       vae=vae_identity, dtype=cache_dtype)


@dataclass(frozen=True)
class Job:
    key: str
    path: str  # relative to the project root (or absolute)
    sha256: str
    plan: CropPlan


def load_pixels(root: Path, job: Job) -> torch.Tensor:
    """The job's image as pixels (1, 3, H, W) in [-1, 1] at its bucket. ValueError if the file changed since prepare
    (its bytes no longer match the hash the cache key is made of)."""
    path = Path(root) / job.path
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != job.sha256:
        raise ValueError(f"{path} changed since prepare ran; run prepare again (dvc repro does)")
    image = apply_plan(decode_rgb(data, str(path)), job.plan)
    width, height = job.plan.bucket
    return image_processor().preprocess(image, height=height, width=width)


def plan_jobs(rows: list[dict], identity: str, cache_dtype: str) -> tuple[dict[str, Job], dict, dict]:
    """Every latent to have, by key (identical image + crop: one job), and per image id its key and reference keys."""
    jobs: dict[str, Job] = {}
    images: dict[str, str] = {}
    references: dict[str, list[str]] = {}
    for row in rows:
        for item in [row] + row.get("references", []):
            plan = CropPlan.from_json(item)
            key = latent_key(item["sha256"], plan, identity, cache_dtype)
            jobs.setdefault(key, Job(key, item["path"], item["sha256"], plan))
            if item is row:
                images[row["id"]] = key
            else:
                references.setdefault(row["id"], []).append(key)
    return jobs, images, references


def _vae_batches(todo: list[Job], size: int) -> list[list[Job]]:
    """Jobs grouped by bucket (one shape per VAE forward), `size` at most per group."""
    todo = sorted(todo, key=lambda job: (job.plan.bucket, job.key))
    batches: list[list[Job]] = []
    for job in todo:
        if batches and len(batches[-1]) < size and batches[-1][0].plan.bucket == job.plan.bucket:
            batches[-1].append(job)
        else:
            batches.append([job])
    return batches


def encode_latents(params: Params, root: Path) -> dict:
    """Cache latents (128, H/16, W/16) of every image (and reference) in images.jsonl at its bucket; writes
    `latents/index.json` {"images": {id: key}, "references": {id: [keys]}, "buckets": {id: [W, H]},
    "repeats": {id: n}, "datasets": {id: dataset id}, "vae": identity}, and when used "masks": {id: mask key}
    (loss masks, `cache.masks`), "regularisation": [ids], "eval": [ids] (eval datasets' images),
    "probability": {id: its dataset's probability}."""
    layout = layout_for(root, params.output_dir)
    cfg = params.encode_latents
    rows = read_jsonl(layout.images_manifest)
    check_not_distilled(params.model)  # latents are cached for training only: refuse a step-distilled klein early
    identity = component_identity(params.model, "vae")
    jobs, image_keys, reference_keys = plan_jobs(rows, identity, cfg.cache_dtype)

    store = TensorStore(layout.latents_dir, write_batch_size=cfg.write_batch_size, verify=True)
    todo = [job for key, job in jobs.items() if not store.has(key)]
    log.info("encode-latents: %d images (+%d references), %d latents: %d cached, %d to encode%s", len(rows),
             sum(map(len, reference_keys.values())), len(jobs), len(jobs) - len(todo), len(todo),
             f"; {len(store.damaged)} damaged shard(s) deleted" if store.damaged else "")
    failed: dict[str, str] = {}
    if todo:
        device = resolve_device(params.model.device)
        vae = load_vae(params.model, device, group_offload=cfg.group_offload_vae)
        store_dtype = torch_dtype(cfg.cache_dtype)

        def load(job: Job):
            try:
                return job, load_pixels(root, job)
            except (ImageRejected, OSError, ValueError) as e:  # one bad file never ends hours of encoding
                return job, e

        batches = _vae_batches(todo, cfg.vae_batch_size)
        with store, ThreadPoolExecutor(WORKERS) as pool, \
                tqdm(total=len(todo), desc="encode-latents", unit="img") as bar:
            upcoming = [pool.submit(load, job) for job in batches[0]]
            for i in range(len(batches)):
                current = [f.result() for f in upcoming]
                upcoming = [pool.submit(load, job) for job in batches[i + 1]] if i + 1 < len(batches) else []
                good = [(job, pixels) for job, pixels in current if isinstance(pixels, torch.Tensor)]
                for job, error in current:
                    if not isinstance(error, torch.Tensor):
                        failed[job.key] = str(error)
                        log.warning("encode-latents: skipped %s: %s", job.path, error)
                if good:
                    latents = encode_pixels(vae, torch.cat([pixels for _, pixels in good]))
                    for (job, _), latent in zip(good, latents):
                        store.put(job.key, {"latents": latent.to(store_dtype)})
                bar.update(len(current))
        del vae

    # loss masks: no VAE, the same store (a DVC output like the latents)
    mask_jobs, mask_keys = plan_mask_jobs(rows)
    for key, error in encode_masks(store, root, mask_jobs).items():
        failed[key] = error
        log.warning("encode-latents: skipped the images of mask %s: %s", mask_jobs[key]["path"], error)

    # an image is trainable when its latent and all its references' (and its mask) are stored
    usable = {i: k for i, k in image_keys.items()
              if store.has(k) and all(store.has(r) for r in reference_keys.get(i, []))
              and (i not in mask_keys or store.has(mask_keys[i]))}
    pruned = store.prune(set(jobs) | set(mask_jobs))
    by_id = {row["id"]: row for row in rows if row["id"] in usable}
    index = {"images": usable, "references": {i: reference_keys[i] for i in usable if i in reference_keys},
             "buckets": {i: by_id[i]["bucket"] for i in usable}, "repeats": {i: by_id[i].get("repeats", 0)
                                                                            for i in usable},
             "datasets": {i: by_id[i].get("dataset") for i in usable}, "vae": identity}
    # only when used, so a project without them keeps its index (and its train fingerprint) byte for byte
    extras = {"masks": {i: mask_keys[i] for i in usable if i in mask_keys},
              "regularisation": sorted(i for i in usable if by_id[i].get("regularisation")),
              "eval": sorted(i for i in usable if by_id[i].get("eval")),
              "probability": {i: by_id[i]["probability"] for i in usable if "probability" in by_id[i]}}
    index.update({name: value for name, value in extras.items() if value})
    write_json_atomic(layout.latents_dir / INDEX, index)
    return {"images": len(usable), "references": sum(len(index["references"][i]) for i in index["references"]),
            "encoded": len(todo) - len(failed), "reused": len(jobs) - len(todo), "failed": len(failed),
            "pruned": pruned, "damaged_shards": len(store.damaged)}


def read_latent_index(layout) -> dict:
    path = layout.latents_dir / INDEX
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run the encode-latents stage first")
    return json.loads(path.read_text())
