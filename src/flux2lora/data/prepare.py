"""The `prepare` stage: scan an image folder, pair captions, drop what cannot be used, write manifests."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

from tqdm.auto import tqdm

from ..config import Params
from ..io import write_json_atomic, write_jsonl_atomic
from ..layout import layout_for
from .images import ImageRejected, file_sha256, open_rgb

log = logging.getLogger(__name__)


def read_caption(image_path: Path, extension: str) -> str:
    """The caption in the text file beside `image_path`; ImageRejected if missing, empty or not UTF-8."""
    caption_path = image_path.with_suffix(extension)
    if not caption_path.exists():
        raise ImageRejected("missing_caption", f"{image_path}: no caption file {caption_path.name}")
    try:
        caption = caption_path.read_bytes().decode("utf-8-sig").strip()
    except UnicodeDecodeError as e:
        raise ImageRejected("undecodable_caption", f"{caption_path}: not UTF-8 text ({e})") from None
    if not caption:
        raise ImageRejected("empty_caption", f"{caption_path}: caption file is empty")
    return caption


def prepare(params: Params, root: Path) -> dict:
    """Scan `prepare.instance_data_dir`, write images.jsonl, captions.jsonl and report.json. Returns the report."""
    cfg = params.prepare
    layout = layout_for(root, params.output_dir)
    data_dir = (root / cfg.instance_data_dir).resolve()
    if not data_dir.is_dir():
        raise FileNotFoundError(f"prepare.instance_data_dir: {data_dir} is not a folder; put images (with "
                                f"{cfg.caption_extension} captions beside them) there or change params.yaml")
    extensions = {e.lower() for e in cfg.image_extensions}
    candidates = sorted(p for p in data_dir.rglob("*") if p.is_file() and p.suffix.lower() in extensions)

    images, captions, skipped = [], [], []
    for path in tqdm(candidates, desc="prepare", unit="img"):
        rel = path.relative_to(data_dir).as_posix()
        try:
            caption = read_caption(path, cfg.caption_extension)
            image = open_rgb(path, minimum_side=cfg.minimum_image_size)
        except ImageRejected as e:
            skipped.append({"file": rel, "reason": e.reason, "detail": str(e)})
            log.warning("skipped %s", e)
            continue
        images.append({"id": rel, "path": str(Path(cfg.instance_data_dir) / rel), "sha256": file_sha256(path),
                       "width": image.size[0], "height": image.size[1]})
        captions.append({"id": rel, "caption": caption})

    if not images:
        raise ValueError(f"prepare: no usable images in {data_dir} ({len(skipped)} skipped: "
                         f"{dict(Counter(s['reason'] for s in skipped))}); see the warnings above")
    report = {"dataset_dir": cfg.instance_data_dir, "candidates": len(candidates), "accepted": len(images),
              "skipped": len(skipped), "skipped_by_reason": dict(sorted(Counter(s["reason"] for s in skipped).items())),
              "skipped_files": skipped}
    write_jsonl_atomic(layout.images_manifest, images)
    write_jsonl_atomic(layout.captions_manifest, captions)
    write_json_atomic(layout.prepare_report, report)
    log.info("prepare: %d images accepted, %d skipped %s", len(images), len(skipped), report["skipped_by_reason"])
    return report


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run the stage that writes it first (dvc repro / flux2lora stage)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
