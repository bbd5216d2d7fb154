"""Where an image's caption comes from: the seed's caption strategies.

- textfile: a text file beside the image with the same stem (`caption_extension`, .txt by default)
- filename: the file name, underscores as spaces
- instanceprompt: `instance_prompt` for every image
- parquet: a metadata table (.parquet, or .jsonl for JSON lines) with a file-name column and a caption column

A caption source gives a list: an image may have several captions, as in the seed. A textfile with several
non-empty lines is one caption per line (unless the dataset sets `disable_multiline_split`), a table cell holding a
list is one caption per item; training then uses one of them per sample and step (`caption_choice`). Every caption
is embedded once by encode-text.

A missing, empty or undecodable caption raises ImageRejected: the image is skipped with that reason.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Callable

from .config import DatasetOptions
from .images import ImageRejected

CaptionFor = Callable[[str, str], list[str]]  # (image path, path relative to the dataset folder) -> its captions


def read_caption_file(image_path: Path | str, extension: str) -> str:
    """The caption in the text file beside `image_path`; ImageRejected if missing, empty or not UTF-8."""
    caption_path = os.path.splitext(image_path)[0] + extension
    try:
        with open(caption_path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise ImageRejected("missing_caption", f"{image_path}: no caption file "
                                               f"{os.path.basename(caption_path)}") from None
    except OSError as e:
        raise ImageRejected("missing_caption", f"{caption_path}: cannot be read ({e.strerror or e})") from None
    try:
        caption = raw.decode("utf-8-sig").strip()
    except UnicodeDecodeError as e:
        raise ImageRejected("undecodable_caption", f"{caption_path}: not UTF-8 text ({e})") from None
    if not caption:
        raise ImageRejected("empty_caption", f"{caption_path}: caption file is empty")
    return caption


def split_caption_lines(caption: str) -> list[str]:
    """The captions of a multi-line caption text: one per non-empty line (stripped; \\r\\n and \\n both end a line),
    in file order, as the seed splits them."""
    return [line.strip() for line in caption.split("\n") if line.strip()]


def read_caption_lines(image_path: Path | str, extension: str, split_lines: bool = True) -> list[str]:
    """The captions in the text file beside `image_path`: one per non-empty line, or (split_lines=False) the whole
    text as one caption; ImageRejected if missing, empty or not UTF-8."""
    caption = read_caption_file(image_path, extension)
    return split_caption_lines(caption) if split_lines else [caption]


def caption_choice(seed: int, micro_batch: int, position: int, count: int) -> int:
    """Which of a sample's `count` captions it trains with: the sample at `position` of global micro-batch
    `micro_batch` (the loop's (step * gradient_accumulation_steps + j) * processes + process) of a run seeded `seed`.

    Uniform over the captions and a pure function of its arguments: it needs no generator state (a resumed run picks
    what an uninterrupted one picks; every process computes the same), and it draws nothing from the training's
    noise generator, so runs whose images have one caption each are unchanged."""
    if count <= 1:
        return 0
    digest = hashlib.blake2b(f"caption:{seed}:{micro_batch}:{position}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % count


def caption_texts(row: dict) -> list[str]:
    """Every caption of a `captions.jsonl` row, first one first: its `captions` list when it has several, else its
    `caption`."""
    return list(row.get("captions") or [row["caption"]])


def caption_from_filename(image_path: Path | str) -> str:
    """`a_red_circle (2).png` -> "a red circle (2)"."""
    caption = re.sub(r"\s+", " ", Path(image_path).stem.replace("_", " ")).strip()
    if not caption:
        raise ImageRejected("empty_caption", f"{image_path}: the file name gives no caption")
    return caption


def _texts(value) -> list[str]:
    """A table cell as captions: a string, or every non-empty string of a list (a multi-caption cell)."""
    if isinstance(value, str):
        return [value.strip()] if value.strip() else []
    if isinstance(value, (list, tuple)):
        return [text for item in value for text in _texts(item)]
    return []


def read_metadata_table(path: Path, columns: list[str]) -> list[dict]:
    """Rows of a .parquet or .jsonl file (pyarrow), restricted to `columns`; ValueError naming a missing column."""
    import pyarrow.json as pa_json
    import pyarrow.parquet as pq

    if path.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        table = pa_json.read_json(str(path))
    else:
        table = pq.read_table(str(path))
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise ValueError(f"{path}: column(s) {missing} not found; the table has {table.column_names}")
    return table.select(columns).to_pylist()


class MetadataCaptions:
    """Captions looked up by file name in a metadata table (the seed's `parquet` block)."""

    def __init__(self, options: DatasetOptions, folder: Path, root: Path):
        cfg = options.parquet
        path = Path(cfg.path)
        candidates = [path] if path.is_absolute() else [folder / path, root / path]
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            raise FileNotFoundError(f"parquet.path: {cfg.path} not found (looked in {', '.join(map(str, candidates))})")
        columns = [cfg.filename_column, cfg.caption_column] + ([cfg.fallback_caption_column]
                                                               if cfg.fallback_caption_column else [])
        self.cfg, self.source = cfg, found
        self.captions: dict[str, list[str]] = {}
        for row in read_metadata_table(found, columns):
            name = str(row[cfg.filename_column]).replace("\\", "/").strip("/")
            captions = _texts(row[cfg.caption_column])
            if not captions and cfg.fallback_caption_column:
                captions = _texts(row[cfg.fallback_caption_column])
            self.captions[name] = captions
            if cfg.identifier_includes_extension:
                self.captions.setdefault(name.rsplit(".", 1)[0], captions)

    def __call__(self, image_path: str, rel: str) -> list[str]:
        stem = rel.rsplit(".", 1)[0]
        for key in (rel, stem, os.path.basename(rel), os.path.basename(stem)):
            if key in self.captions:
                caption = self.captions[key]
                if not caption:
                    raise ImageRejected("empty_caption", f"{image_path}: empty caption in {self.source.name}")
                return caption
        raise ImageRejected("missing_caption", f"{image_path}: no row for {rel} in {self.source.name}")


def caption_source(options: DatasetOptions, folder: Path, root: Path) -> CaptionFor:
    """The caption function of a dataset; the instance prompt is prepended when asked."""
    strategy = options.caption_strategy
    if strategy == "textfile":
        extension, split_lines = options.caption_extension, not options.disable_multiline_split

        def source(path: str, rel: str) -> list[str]:
            return read_caption_lines(path, extension, split_lines)
    elif strategy == "filename":
        def source(path: str, rel: str) -> list[str]:
            return [caption_from_filename(path)]
    elif strategy == "instanceprompt":
        def source(path: str, rel: str) -> list[str]:
            return [options.instance_prompt]
    else:
        source = MetadataCaptions(options, folder, root)
    if options.prepend_instance_prompt and options.instance_prompt and strategy != "instanceprompt":
        inner = source

        def source(path: str, rel: str) -> list[str]:  # noqa: F811 - the wrapped strategy
            return [f"{options.instance_prompt} {caption}" for caption in inner(path, rel)]
    return source
