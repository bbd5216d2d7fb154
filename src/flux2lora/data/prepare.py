"""The `prepare` stage: scan the datasets, pair captions and references, bucket, skip what cannot be used.

Writes `images.jsonl` (what encode-latents needs: id, path, content hash, upright size, bucket and crop, repeats,
references) and `captions.jsonl` (what encode-text needs: `caption`, plus `captions`, every one of them in order,
for an image with several, e.g. a multi-line caption file) separately, so a caption edit leaves images.jsonl
byte-identical and DVC does not re-run encode-latents. Every skipped file is in `report.json` with its reason.

Each file is decoded once in its life: the outcome is remembered by (path, size, mtime_ns) in
`state/prepare_files.sqlite`, so a rerun after adding a few images decodes only those.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from ..config import Params
from ..io import write_json_atomic, write_jsonl_atomic
from ..layout import layout_for
from .buckets import aspect_out_of_range, plan_crop, plan_like, plan_loose, too_small
from .captions import caption_source
from .config import Dataset, relative_to_root, resolve_datasets
from .images import ImageRejected, inspect_image
from .links import DVCIGNORE, sync_dvcignore
from .records import FileRecord, FileRecords

log = logging.getLogger(__name__)

# Image formats users drop into folders that we do not train on: reported, not silently ignored.
UNSUPPORTED_IMAGE_SUFFIXES = {".gif", ".heic", ".heif", ".avif", ".jxl", ".jp2", ".ico", ".psd", ".svg", ".raw",
                              ".cr2", ".cr3", ".nef", ".arw", ".dng", ".exr", ".hdr"}
# Decoding releases the GIL (Pillow's decoders, hashlib): threads overlap it without pickling images.
WORKERS = min(8, os.cpu_count() or 1)


# Paths are plain strings on the per-file paths below: a rerun touches every file of the dataset, and pathlib's
# parsing and comparisons would cost more than the stat and caption read it needs.


def list_files(folder: Path | str, suffixes: set[str], linked_folders: list[str] | None = None) -> list[str]:
    """Absolute paths of the files under `folder` with one of `suffixes`, sorted; hidden files and folders
    (.DS_Store, ._x.jpg, .git) are passed over. Links to folders are not descended into (see data/links.py);
    their paths are appended to `linked_folders` when it is given."""
    found = []
    for dirpath, dirnames, filenames in os.walk(str(folder)):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        if linked_folders is not None:
            linked_folders += [os.path.join(dirpath, d) for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
        found += [os.path.join(dirpath, f) for f in filenames
                  if not f.startswith(".") and os.path.splitext(f)[1].lower() in suffixes]
    return sorted(found)


def inspect_files(paths: list[str], records: FileRecords) -> tuple[dict[str, FileRecord], int]:
    """A FileRecord per path: remembered when the file is unchanged, else inspected now (in threads).
    Returns the records and how many files were decoded."""
    out: dict[str, FileRecord] = {}
    todo: list[tuple[str, int, int]] = []
    for path in paths:
        try:
            stat = os.stat(path)
        except OSError as e:
            out[path] = FileRecord(0, 0, reason="unreadable", detail=f"{path}: {e.strerror or e}")
            continue
        known = records.lookup(path, stat.st_size, stat.st_mtime_ns)
        if known is None:
            todo.append((path, stat.st_size, stat.st_mtime_ns))
        else:
            out[path] = known

    def inspect(job: tuple[str, int, int]) -> tuple[str, FileRecord]:
        path, size, mtime_ns = job
        try:
            facts = inspect_image(path)
            return path, FileRecord(size, mtime_ns, facts.sha256, facts.width, facts.height)
        except ImageRejected as e:
            return path, FileRecord(size, mtime_ns, reason=e.reason, detail=str(e))

    if todo:
        with ThreadPoolExecutor(WORKERS) as pool, tqdm(total=len(todo), desc="prepare", unit="img") as bar:
            for path, record in pool.map(inspect, todo):
                records.add(path, record)
                out[path] = record
                bar.update()
        records.commit()
    return out, len(todo)


@dataclass
class Skip:
    dataset: str
    file: str
    reason: str
    detail: str

    def to_json(self) -> dict:
        return {"dataset": self.dataset, "file": self.file, "reason": self.reason, "detail": self.detail}


def _relative(path: str, folder: str) -> str:
    """`path` relative to `folder` (which contains it), with / separators."""
    return path[len(folder) + 1:].replace(os.sep, "/")


def _reference_index(dataset: Dataset, extensions: set[str]) -> dict[str, list[str]]:
    """Files of a conditioning dataset by relative path without extension (pairing ignores extensions)."""
    index: dict[str, list[str]] = {}
    folder = str(dataset.folder)
    for path in list_files(folder, extensions):
        index.setdefault(os.path.splitext(_relative(path, folder))[0], []).append(path)
    return index


def _paired_mask(mask: Dataset, index: dict[str, list[str]], rel: str, stem: str) -> str:
    """The mask file of the image `rel` in the mask dataset (same relative name, any image extension)."""
    matches = index.get(stem)
    if not matches:
        raise FileNotFoundError(f"mask dataset {mask.id!r}: no mask for {rel} in {mask.folder} (expected "
                                f"{mask.folder / stem}.png or another image extension); every image of a dataset "
                                "with a mask dataset in its conditioning_data needs a mask with the same name")
    return matches[0]


def mask_row(pair: tuple[Dataset, str], facts: dict[str, FileRecord], image: FileRecord, image_path: str, plan,
             manifest_path) -> dict | Skip:
    """The manifest entry of an image's mask: cropped exactly as the image (the same plan), so it must have the
    image's size. An unusable mask file skips the image; a mask of another size is an error naming both files."""
    mask_dataset, mask_path = pair
    mask = facts[mask_path]
    if mask.reason:
        return Skip(mask_dataset.id, mask_path, f"mask_{mask.reason}", f"its mask {mask_path} is unusable: "
                    f"{mask.detail}")
    if (mask.width, mask.height) != (image.width, image.height):
        raise ValueError(f"mask dataset {mask_dataset.id!r}: {mask_path} is {mask.width}x{mask.height} but its image "
                         f"{image_path} is {image.width}x{image.height}; a mask must have its image's size (after "
                         "EXIF rotation)")
    return {"dataset": mask_dataset.id, "path": manifest_path(mask_path), "sha256": mask.sha256,
            "width": mask.width, "height": mask.height, **plan.to_json()}


def prepare(params: Params, root: Path) -> dict:
    """Scan every dataset of `prepare`, write images.jsonl, captions.jsonl and report.json. Returns the report."""
    started = time.perf_counter()
    cfg = params.prepare
    root = Path(root).resolve()
    layout = layout_for(root, params.output_dir)
    data_root = (root / cfg.data_root).resolve()
    if layout.output_dir.resolve() == data_root or data_root in layout.output_dir.resolve().parents:
        raise ValueError(f"prepare.data_root ({data_root}) contains output_dir: DVC would see the pipeline's own "
                         "outputs as its input; point data_root at the folder holding the datasets")
    datasets = resolve_datasets(cfg, root)
    # dangling links out of DVC's sight first (a `.dvcignore` block in data_root), so the next `dvc status` can hash
    # data_root; they are skipped below with their reason
    dangling = sync_dvcignore(data_root, root)
    if dangling:
        log.warning("prepare: %d dangling symlink(s) in %s skipped and listed in %s: %s", len(dangling),
                    cfg.data_root, DVCIGNORE, ", ".join(dangling[:5]) + (" ..." if len(dangling) > 5 else ""))
    data_root_prefix = str(data_root) + os.sep
    linked_outside: list[str] = []
    extensions = {e.lower() for e in cfg.image_extensions}
    multi = len(datasets) > 1
    root_prefix = str(root) + os.sep

    def manifest_path(path: str) -> str:  # relative to the project root when inside it (portable), else absolute
        return path[len(root_prefix):].replace(os.sep, "/") if path.startswith(root_prefix) else path

    # 1. captions first: they are cheap, and an image without one is skipped without being decoded
    skipped: list[Skip] = []
    candidates: list[tuple[Dataset, str, str, list[str]]] = []  # dataset, path, rel, captions
    counted: Counter = Counter()
    for dataset in datasets:
        caption_for = caption_source(dataset.options, dataset.folder, root)
        folder = str(dataset.folder)
        linked_folders: list[str] = []
        for path in list_files(folder, extensions | UNSUPPORTED_IMAGE_SUFFIXES, linked_folders):
            rel = _relative(path, folder)
            counted[dataset.id] += 1
            suffix = os.path.splitext(path)[1]
            if os.path.islink(path):
                if not os.path.exists(path):
                    skipped.append(Skip(dataset.id, rel, "dangling_symlink",
                                        f"{path}: a symbolic link to {os.readlink(path)}, which does not exist; fix "
                                        f"or delete the link (meanwhile {DVCIGNORE} hides it from DVC)"))
                    continue
                if not os.path.realpath(path).startswith(data_root_prefix):
                    linked_outside.append(manifest_path(path))
            if suffix.lower() not in extensions:
                skipped.append(Skip(dataset.id, rel, "unsupported_format",
                                    f"{path}: {suffix} is not one of prepare.image_extensions; convert it"))
                continue
            try:
                candidates.append((dataset, path, rel, caption_for(path, rel)))
            except ImageRejected as e:
                skipped.append(Skip(dataset.id, rel, e.reason, str(e)))
        for link in linked_folders:
            skipped.append(Skip(dataset.id, _relative(link, folder), "linked_folder",
                                f"{link}: a symbolic link to a folder ({os.readlink(link)}); prepare does not follow "
                                "links to folders: move or copy the folder into the dataset, or make it a dataset of "
                                "its own in prepare.datasets"))

    # 2. references, paired by name: a missing one is an error, not a skip (an edit LoRA without its pair is wrong);
    # so is a missing mask (the image would train on its background)
    reference_indexes = {c.id: _reference_index(c, extensions) for d in datasets for c in d.conditioning}
    references: dict[str, list[tuple[Dataset, str]]] = {}
    masks: dict[str, tuple[Dataset, str]] = {}
    for dataset, path, rel, _ in candidates:
        stem = os.path.splitext(rel)[0]
        if dataset.mask is not None:
            masks[path] = (dataset.mask, _paired_mask(dataset.mask, reference_indexes[dataset.mask.id], rel, stem))
        for cond in dataset.references:
            matches = reference_indexes[cond.id].get(stem)
            if not matches:
                raise FileNotFoundError(f"conditioning_data: no reference for {rel} in {cond.folder} (expected "
                                        f"{cond.folder / stem}.png or another image extension); every edit image "
                                        "needs a reference file with the same name")
            references.setdefault(path, []).append((cond, matches[0]))

    # 3. decode what is new or changed, remember the outcome
    to_inspect = sorted({p for _, p, _, _ in candidates} | {r for refs in references.values() for _, r in refs}
                        | {m for _, m in masks.values()})
    with FileRecords(layout.prepare_records, root) as records:
        facts, inspected = inspect_files(to_inspect, records)
        records.forget_except(set(to_inspect))

    # 4. accept, bucket and crop
    images, captions = [], []
    for dataset, path, rel, texts in candidates:
        record = facts[path]
        if record.reason:
            skipped.append(Skip(dataset.id, rel, record.reason, record.detail))
            continue
        small = too_small(record.width, record.height, dataset.options)
        if small:
            skipped.append(Skip(dataset.id, rel, "too_small", f"{path}: {small}"))
            continue
        extreme = aspect_out_of_range(record.width, record.height, dataset.options)
        if extreme:
            skipped.append(Skip(dataset.id, rel, "aspect_ratio", f"{path}: {extreme}"))
            continue
        plan = plan_crop(record.width, record.height, dataset.options, record.sha256)
        image_id = f"{dataset.id}/{rel}" if multi else rel
        row = {"id": image_id, "dataset": dataset.id, "path": manifest_path(path), "sha256": record.sha256,
               "width": record.width, "height": record.height, **plan.to_json(), "repeats": dataset.options.repeats}
        refs = []
        for cond, ref_path in references.get(path, []):
            ref = facts[ref_path]
            if ref.reason:
                refs = None
                skipped.append(Skip(dataset.id, rel, f"reference_{ref.reason}",
                                    f"its reference {ref_path} is unusable: {ref.detail}"))
                break
            ref_plan = (plan_like if cond.conditioning_type == "reference_strict" else plan_loose)(
                ref.width, ref.height, plan)
            refs.append({"dataset": cond.id, "path": manifest_path(ref_path), "sha256": ref.sha256,
                         "type": cond.conditioning_type, "width": ref.width, "height": ref.height,
                         **ref_plan.to_json()})
        if refs is None:
            continue
        if dataset.references:
            row["references"] = refs
        if path in masks:
            mask = mask_row(masks[path], facts, record, path, plan, manifest_path)
            if isinstance(mask, Skip):
                skipped.append(Skip(dataset.id, rel, mask.reason, mask.detail))
                continue
            row["mask"] = mask
        if dataset.regularisation:
            row["regularisation"] = True
        if dataset.eval:  # dataset_type eval: scored by the evaluation loss, never trained on
            row["eval"] = True
        if dataset.probability is not None:
            row["probability"] = dataset.probability
        images.append(row)
        # one caption: the row as it always was; several: also all of them (the first is `caption`)
        captions.append({"id": image_id, "caption": texts[0], **({"captions": texts} if len(texts) > 1 else {})})

    for s in skipped:
        log.warning("skipped %s (%s): %s", s.file, s.reason, s.detail)
    if not images:
        raise ValueError(f"prepare: no usable images in {', '.join(str(d.folder) for d in datasets)} "
                         f"({len(skipped)} skipped: {dict(Counter(s.reason for s in skipped))}); see report.json")
    seconds = time.perf_counter() - started
    report = build_report(cfg.data_root, datasets, counted, images, skipped, inspected, len(to_inspect) - inspected,
                          root, sorted(linked_outside))
    write_jsonl_atomic(layout.images_manifest, images)
    write_jsonl_atomic(layout.captions_manifest, captions)
    write_json_atomic(layout.prepare_report, report)
    log.info("prepare: %d images accepted, %d skipped %s; %d decoded, %d remembered (%.1fs)", len(images),
             len(skipped), report["skipped_by_reason"], inspected, len(to_inspect) - inspected, seconds)
    return {k: report[k] for k in ("candidates", "accepted", "skipped", "skipped_by_reason", "buckets", "inspected",
                                   "remembered")}


def build_report(data_root: str, datasets: list[Dataset], counted: Counter, images: list[dict], skipped: list[Skip],
                 inspected: int, remembered: int, root: Path, linked_outside: list[str] = ()) -> dict:
    """The prepare report: totals, per-dataset and per-reason counts, every skipped file, bucket sizes, files that
    are links to outside the data root. Byte-stable: paths relative to the project root, no timings."""
    root_prefix = str(Path(root).resolve()) + os.sep

    def relocatable(skip: Skip) -> dict:
        return {**skip.to_json(), "detail": skip.detail.replace(root_prefix, "")}

    by_reason = lambda skips: dict(sorted(Counter(s.reason for s in skips).items()))  # noqa: E731
    accepted = Counter(row["dataset"] for row in images)
    per_dataset = {d.id: {"folder": relative_to_root(d.folder, root), "candidates": counted[d.id],
                          "accepted": accepted[d.id], "skipped": sum(s.dataset == d.id for s in skipped),
                          "skipped_by_reason": by_reason([s for s in skipped if s.dataset == d.id]),
                          "repeats": d.options.repeats,
                          "conditioning": [c.id for c in d.conditioning]} for d in datasets}
    buckets = Counter(f"{row['bucket'][0]}x{row['bucket'][1]}" for row in images)
    return {"data_root": data_root, "datasets": per_dataset, "candidates": sum(counted.values()),
            "accepted": len(images), "skipped": len(skipped), "skipped_by_reason": by_reason(skipped),
            "skipped_files": [relocatable(s) for s in sorted(skipped, key=lambda s: (s.dataset, s.file))],
            "buckets": dict(sorted(buckets.items())), "inspected": inspected, "remembered": remembered,
            "linked_outside_data_root": list(linked_outside)}


def log_prepare_report(mlflow, layout) -> None:
    """Log the prepare report to the active MLflow run: counts as tags (`prepare.accepted`,
    `prepare.skipped.<reason>`) and report.json as an artifact under `prepare/`.

    Tags, not metrics: a count has no steps, and every metric becomes a chart on the run's Model metrics tab, whose
    sections MLflow sorts by name, so a `prepare/` section of bar charts would come before the validation images
    and the loss chart."""
    if not layout.prepare_report.exists():
        return
    report = json.loads(layout.prepare_report.read_text())
    counts = {"prepare.candidates": report["candidates"], "prepare.accepted": report["accepted"],
              "prepare.skipped": report["skipped"]}
    counts.update({f"prepare.skipped.{reason}": n for reason, n in report["skipped_by_reason"].items()})
    mlflow.set_tags({key: str(n) for key, n in counts.items()})
    mlflow.log_artifact(str(layout.prepare_report), artifact_path="prepare")
