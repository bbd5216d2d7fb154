"""Dataset configuration in the seed trainer's (SimpleTuner's) `multidatabackend.json` vocabulary.

`prepare.datasets` is a list of backends with the seed's keys (`id`, `type: local`, `instance_data_dir`, `crop`,
`crop_aspect`, `crop_style`, `resolution`, `resolution_type`, `minimum_image_size`, `repeats`, `caption_strategy`,
`conditioning_data`, `dataset_type`, ...). The same per-dataset keys may also be set directly under `prepare`, where
they are the defaults of every listed dataset, as the seed's global options are; with no `datasets` list, `prepare`
itself describes the one dataset (`prepare.instance_data_dir`).

Every dataset folder must lie inside `prepare.data_root`, the one folder DVC watches for the prepare stage: DVC cannot
template a list into `deps`, so a folder outside it would change without `dvc repro` noticing.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Aspect ratios (width / height) offered by crop_aspect closest / random when crop_aspect_buckets is not set:
# the common photo and screen formats, portrait and landscape.
DEFAULT_ASPECT_BUCKETS = (0.5, 0.5625, 0.6667, 0.75, 0.8, 1.0, 1.25, 1.3333, 1.5, 1.7778, 2.0)

# Units of `resolution` / `minimum_image_size` per resolution_type.
MEGAPIXEL = 1_000_000


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ParquetConfig(_Strict):
    """Captions from a metadata table (the seed's `parquet` block): a .parquet or .jsonl file, one row per image."""

    path: str  # relative to the dataset folder, or to the project root, or absolute
    filename_column: str = "filename"
    caption_column: str = "caption"
    fallback_caption_column: str | None = None  # used where caption_column is empty
    # false: the column holds file names without extension (matched against any image extension)
    identifier_includes_extension: bool = False


class DatasetOptions(_Strict):
    """Per-dataset keys that may also be given once under `prepare` as defaults for every dataset."""

    # Cropping. crop false: the image keeps its aspect ratio (only the <16 px needed to align to 16 is trimmed).
    crop: bool = False
    crop_aspect: Literal["square", "closest", "preserve", "random"] = "square"
    crop_aspect_buckets: list[float] | None = None  # width/height ratios for closest / random
    crop_style: Literal["center", "centre", "random", "corner"] = "random"
    # pixel: shorter side in px; pixel_area: side of the square of equal area, px; area: megapixels.
    resolution: int | float = Field(1024, gt=0)
    resolution_type: Literal["pixel", "pixel_area", "area"] = "pixel"
    # Smaller images are skipped (in resolution_type's unit).
    minimum_image_size: int | float | None = Field(None, ge=0)
    repeats: int = Field(0, ge=0)  # extra times each image is seen per epoch (0: once), as in the seed
    caption_strategy: Literal["textfile", "filename", "instanceprompt", "parquet"] = "textfile"
    caption_extension: str = ".txt"  # textfile: the caption file beside each image
    # textfile: a file with several non-empty lines holds one caption per line, and training picks one per sample
    # and step (the seed's behaviour); true: the whole file is one caption.
    disable_multiline_split: bool = False
    instance_prompt: str | None = None  # the caption of every image (instanceprompt), or the prefix (prepend_...)
    prepend_instance_prompt: bool = False
    parquet: ParquetConfig | None = None
    # Edit / reference training: ids of `dataset_type: conditioning` datasets (or folder paths) paired by file name.
    conditioning_data: list[str] = []
    # mask: a `dataset_type: conditioning` dataset of masks (white: trained, black: ignored) weighting the loss
    conditioning_type: Literal["reference_strict", "reference_loose", "mask"] | None = None
    disabled: bool = False

    @field_validator("conditioning_data", mode="before")
    @classmethod
    def _one_or_many(cls, value):
        return [value] if isinstance(value, str) else value

    @field_validator("crop_aspect_buckets")
    @classmethod
    def _positive_ratios(cls, value):
        if value is not None and (not value or any(r <= 0 for r in value)):
            raise ValueError("crop_aspect_buckets must be a non-empty list of positive width/height ratios")
        return value


class DatasetConfig(DatasetOptions):
    """One entry of `prepare.datasets` (one backend of the seed's multidatabackend.json)."""

    id: str = Field(min_length=1)
    type: Literal["local"] = "local"
    # mask: shorthand for `dataset_type: conditioning` + `conditioning_type: mask` (SimpleTuner's spelling)
    # eval: an image dataset scored only by the evaluation loss, never trained on (SimpleTuner's `dataset_type: eval`)
    dataset_type: Literal["image", "eval", "conditioning", "text_embeds", "mask"] = "image"
    instance_data_dir: str | None = None
    # image datasets: the training target is the base model's own prediction (the adapter disabled), not the image's
    # flow-matching velocity (SimpleTuner's parent-teacher regularisation)
    is_regularisation_data: bool = False
    # image datasets, when any sets it: each batch comes from a dataset drawn with weight probability x its batches
    # per epoch (unset: 1); with none set, datasets mix in proportion to their images x (1 + repeats)
    probability: float | None = Field(None, ge=0)
    # text_embeds entries: the text cache lives in output_dir/text_embeds (content-addressed, a DVC output); the
    # `default` entry's `write_batch_size` sets encode_text's.
    default: bool = False
    write_batch_size: int | None = Field(None, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _mask_shorthand(cls, values):
        if isinstance(values, dict) and values.get("dataset_type") == "mask":
            if values.get("conditioning_type") not in (None, "mask"):
                raise ValueError(f"dataset {values.get('id')!r}: dataset_type mask cannot have conditioning_type "
                                 f"{values['conditioning_type']!r}")
            values = {**values, "dataset_type": "conditioning", "conditioning_type": "mask"}
        return values

    @model_validator(mode="after")
    def _needs_a_folder(self):
        if self.dataset_type != "text_embeds" and not self.instance_data_dir:
            raise ValueError(f"dataset {self.id!r} ({self.dataset_type}) needs instance_data_dir")
        if self.dataset_type != "image":
            for key in ("is_regularisation_data", "probability"):
                if key in self.model_fields_set and getattr(self, key) not in (False, None):
                    raise ValueError(f"dataset {self.id!r}: {key} applies to image datasets only (this one is "
                                     f"{self.dataset_type})")
        return self


# dataset types whose images are prepared, captioned and encoded (eval ones are scored, never trained on)
IMAGE_TYPES = ("image", "eval")


@dataclass
class Dataset:
    """A dataset with its defaults applied and its folder resolved; what `prepare` works from."""

    id: str
    kind: Literal["image", "conditioning"]
    folder: Path  # absolute
    options: DatasetOptions
    conditioning: list["Dataset"] = field(default_factory=list)  # image datasets: their reference datasets, in order
    regularisation: bool = False  # is_regularisation_data
    eval: bool = False  # dataset_type eval: its images are the evaluation loss's, never trained on
    probability: float | None = None

    @property
    def conditioning_type(self) -> str:
        return self.options.conditioning_type or "reference_strict"

    @property
    def references(self) -> list["Dataset"]:
        """The reference (edit) datasets: conditioning datasets that are not masks."""
        return [c for c in self.conditioning if c.conditioning_type != "mask"]

    @property
    def mask(self) -> "Dataset | None":
        """The mask dataset weighting this dataset's loss, if any."""
        return next((c for c in self.conditioning if c.conditioning_type == "mask"), None)


def check_datasets(prepare) -> None:
    """Cross-entry rules of `prepare` (called by its validator): unique ids, one way to name the dataset, a caption
    source per image dataset, conditioning_data naming conditioning datasets (names that are no dataset's id are
    read as folders when prepare runs)."""
    entries = prepare.datasets
    if entries and prepare.instance_data_dir:
        raise ValueError("set either prepare.instance_data_dir (one dataset) or prepare.datasets (several), not both")
    ids = [d.id for d in entries]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ValueError(f"prepare.datasets: duplicate id(s) {duplicates}")
    if sum(d.dataset_type == "text_embeds" and d.default for d in entries) > 1:
        raise ValueError("prepare.datasets: only one text_embeds dataset can be the default")
    kinds = {d.id: d.dataset_type for d in entries}
    # with a list, the prepare-level keys are only defaults: each image dataset is checked as it will be used
    checked = [(merged_options(prepare, d), d.id) for d in entries if d.dataset_type in IMAGE_TYPES] if entries \
        else [(prepare, "prepare")]
    for options, name in checked:
        if options.caption_strategy == "instanceprompt" and not options.instance_prompt:
            raise ValueError(f"{name}: caption_strategy instanceprompt needs instance_prompt")
        if options.caption_strategy == "parquet" and options.parquet is None:
            raise ValueError(f"{name}: caption_strategy parquet needs a `parquet` block (path, caption_column, ...)")
        for ref in options.conditioning_data:
            if ref in kinds and kinds[ref] != "conditioning":
                raise ValueError(f"{name}: conditioning_data {ref!r} is a {kinds[ref]} dataset; it must have "
                                 "dataset_type: conditioning")
    if entries and any(d.dataset_type == "eval" and not d.disabled for d in entries) \
            and not any(d.dataset_type == "image" and not d.disabled for d in entries):
        raise ValueError("prepare.datasets: every enabled image dataset is an eval dataset (dataset_type: eval), "
                         "whose images are only scored, never trained on; add a dataset_type: image dataset to "
                         "train on")
    if entries and not any(d.dataset_type == "image" and not d.disabled for d in entries):
        raise ValueError("prepare.datasets has no enabled image dataset to train on")
    images = [d for d in entries if d.dataset_type == "image" and not d.disabled]
    if images and all(d.is_regularisation_data for d in images):
        raise ValueError("prepare.datasets: every enabled image dataset has is_regularisation_data: true, so the "
                         "adapter would only learn the base model's own predictions; give it a dataset to learn")
    if any(d.probability is not None for d in images) and not any((d.probability is None or d.probability > 0)
                                                                  and not d.is_regularisation_data for d in images):
        raise ValueError("prepare.datasets: probability is 0 for every image dataset to learn; give one a "
                         "probability above 0")
    masks = {d.id for d in entries if d.dataset_type == "conditioning" and d.conditioning_type == "mask"}
    for entry in images:
        named = [ref for ref in merged_options(prepare, entry).conditioning_data if ref in masks]
        if len(named) > 1:
            raise ValueError(f"dataset {entry.id!r}: conditioning_data names {len(named)} mask datasets "
                             f"({', '.join(named)}); one mask weights an image's loss")


def merged_options(prepare, entry: DatasetConfig) -> DatasetOptions:
    """`entry`'s options, with what it does not set taken from the `prepare` level (the defaults)."""
    names = DatasetOptions.model_fields
    values = {name: getattr(prepare, name) for name in names}
    values.update({name: getattr(entry, name) for name in entry.model_fields_set if name in names})
    return DatasetOptions.model_validate(values)


def apply_dataset_defaults(prepare) -> None:
    """Fill each image / conditioning entry's unset keys from the prepare level, in place, once at load time: the
    entries then hold the values prepare uses, and MLflow's params show exactly those."""
    for i, entry in enumerate(prepare.datasets):
        if entry.dataset_type == "text_embeds":
            continue
        merged = merged_options(prepare, entry).model_dump()
        # item assignment, not attribute assignment: no re-validation of `prepare` (this runs inside it)
        prepare.datasets[i] = DatasetConfig.model_validate({**entry.model_dump(), **merged})


def text_embeds_write_batch_size(prepare) -> int | None:
    """write_batch_size of the text_embeds entry (the default one if several), if it sets one."""
    entries = [d for d in prepare.datasets if d.dataset_type == "text_embeds" and d.write_batch_size]
    entries.sort(key=lambda d: not d.default)
    return entries[0].write_batch_size if entries else None


def training_side(prepare) -> int:
    """Side in pixels (a multiple of 16) of the square with the largest dataset's training area: what memory and
    speed estimates need. resolution_type pixel fixes the shorter side, so its non-square buckets are larger by their
    aspect ratio; crop_aspect square gives exactly this size."""
    entries = [merged_options(prepare, d) for d in prepare.datasets
               if d.dataset_type in IMAGE_TYPES and not d.disabled] or [prepare]
    sides = [math.sqrt(o.resolution * MEGAPIXEL) if o.resolution_type == "area" else o.resolution for o in entries]
    return max(16, math.floor(max(sides) / 16 + 0.5) * 16)


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def resolve_datasets(prepare, root: Path) -> list[Dataset]:
    """The enabled image datasets, each with its conditioning datasets, folders checked against `data_root`.

    Raises FileNotFoundError for a missing folder and ValueError for one outside data_root (DVC would not see it).
    """
    data_root = (root / prepare.data_root).resolve()

    def folder_of(path: str, what: str) -> Path:
        folder = (root / path).resolve()
        if not _inside(folder, data_root):
            raise ValueError(f"{what}: {folder} is outside prepare.data_root ({data_root}). `dvc repro` watches only "
                             "data_root for the prepare stage, so changes there would go unnoticed: move the folder "
                             "under data_root, or set data_root to a folder that holds every dataset")
        if not folder.is_dir():
            raise FileNotFoundError(f"{what}: {folder} is not a folder")
        return folder

    if prepare.datasets:
        entries = [d for d in prepare.datasets if not d.disabled and d.dataset_type != "text_embeds"]
    else:
        if not prepare.instance_data_dir:
            raise ValueError("prepare: set instance_data_dir (a folder of images) or a list of datasets")
        name = Path(prepare.instance_data_dir).name or "dataset"
        entries = [DatasetConfig(id=name, instance_data_dir=prepare.instance_data_dir)]
    by_id = {d.id: d for d in entries}

    conditioning: dict[str, Dataset] = {}

    def conditioning_dataset(ref: str, owner: str, default_type: str | None) -> Dataset:
        # an id of a conditioning dataset, or (shorthand, and what older params used) a folder path
        if ref not in conditioning:
            if ref in by_id:
                entry = by_id[ref]
                options = merged_options(prepare, entry)
                conditioning[ref] = Dataset(ref, "conditioning", folder_of(entry.instance_data_dir,
                                                                           f"dataset {ref!r} instance_data_dir"),
                                            options)
            else:
                options = DatasetOptions(conditioning_type=default_type)
                what = f"{owner}: conditioning_data {ref!r} (no dataset has this id, so it is read as a folder)"
                conditioning[ref] = Dataset(ref, "conditioning", folder_of(ref, what), options)
        return conditioning[ref]

    datasets = []
    for entry in entries:
        if entry.dataset_type not in IMAGE_TYPES:
            continue
        options = merged_options(prepare, entry)  # single dataset: the entry sets nothing, prepare is all
        folder = folder_of(entry.instance_data_dir, f"dataset {entry.id!r} instance_data_dir"
                           if prepare.datasets else "prepare.instance_data_dir")
        refs = [conditioning_dataset(ref, entry.id, options.conditioning_type) for ref in options.conditioning_data]
        datasets.append(Dataset(entry.id, "image", folder, options, refs, regularisation=entry.is_regularisation_data,
                                eval=entry.dataset_type == "eval", probability=entry.probability))
    if not datasets:
        raise ValueError("prepare: no enabled image dataset")
    return datasets


def relative_to_root(path: Path, root: Path) -> str:
    """`path` as written into manifests: relative to the project root when inside it (portable), else absolute."""
    try:
        return path.relative_to(root.resolve()).as_posix()
    except ValueError:
        return Path(os.path.abspath(path)).as_posix()
