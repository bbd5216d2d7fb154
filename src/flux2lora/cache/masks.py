"""Loss masks (`conditioning_type: mask` datasets), cached by the encode-latents stage beside the latents.

A mask is a greyscale image with its training image's size (white: trained, black: ignored, grey: weighted). It is
cropped and resized exactly as its image (the image's crop plan), then averaged over each 16x16 pixel block: one
weight in [0, 1] per latent token (the latents are (128, H/16, W/16): VAE /8, then 2x2 patches), so the loss of a
token is weighted by the share of its pixels the mask keeps. CPU only, deterministic: entries are byte-stable.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from ..data.buckets import CropPlan, apply_plan
from ..data.images import ImageRejected, decode_rgb
from .store import content_key

# Bump when what a mask entry holds changes: older entries are then re-made.
MASK_VERSION = 1
PATCH = 16  # pixels per latent token side


def mask_key(mask_sha256: str, plan: CropPlan) -> str:
    """Content key of one latent-resolution mask: the mask file's bytes and its image's bucket and crop."""
    return content_key(kind="mask", image=mask_sha256, bucket=plan.bucket, resize=plan.resize, offset=plan.offset,
                       version=MASK_VERSION)


def latent_mask(root: Path, path: str, sha256: str, plan: CropPlan) -> torch.Tensor:
    """The mask file at `path` (relative to `root`) as weights (H/16, W/16) float32 in [0, 1] at its bucket.
    ValueError if the file changed since prepare."""
    file = Path(root) / path
    data = file.read_bytes()
    if hashlib.sha256(data).hexdigest() != sha256:
        raise ValueError(f"{file} (a mask) changed since prepare ran; run prepare again (dvc repro does)")
    pixels = np.asarray(apply_plan(decode_rgb(data, str(file)), plan).convert("L"), dtype=np.float32) / 255.0
    weights = torch.from_numpy(pixels)[None, None]
    return torch.nn.functional.avg_pool2d(weights, PATCH)[0, 0].clamp(0.0, 1.0).contiguous()


def plan_mask_jobs(rows: list[dict]) -> tuple[dict[str, dict], dict[str, str]]:
    """Every mask entry to have, by key (its row from images.jsonl), and per image id its mask's key."""
    jobs: dict[str, dict] = {}
    keys: dict[str, str] = {}
    for row in rows:
        if "mask" in row:
            mask = row["mask"]
            key = mask_key(mask["sha256"], CropPlan.from_json(mask))
            jobs.setdefault(key, mask)
            keys[row["id"]] = key
    return jobs, keys


def encode_masks(store, root: Path, jobs: dict[str, dict]) -> dict[str, str]:
    """Store every mask job not yet in `store` ({"mask": (h, w)}); returns {key: error} for masks that failed."""
    failed: dict[str, str] = {}
    todo = [key for key in sorted(jobs) if not store.has(key)]
    if not todo:
        return failed
    with store:
        for key in todo:
            job = jobs[key]
            try:
                store.put(key, {"mask": latent_mask(root, job["path"], job["sha256"], CropPlan.from_json(job))})
            except (ImageRejected, OSError, ValueError) as e:
                failed[key] = str(e)
    return failed
