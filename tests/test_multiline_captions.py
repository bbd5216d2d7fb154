"""Several captions per image, as in the seed: a multi-line caption file is one caption per non-empty line (a list
cell of a metadata table too), prepare writes all of them, and `caption_choice` picks one per sample and step,
uniformly and as a pure function of (seed, micro-batch, position), so a resumed run picks what an uninterrupted one
picks."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import yaml

from flux2lora.data.captions import caption_choice, caption_texts, split_caption_lines
from flux2lora.data.synthetic import write_images
from flux2lora.stages import run_stage


def _prepare(root: Path, prepare: dict) -> dict[str, dict]:
    (root / "params.yaml").write_text(yaml.safe_dump({"output_dir": "outputs", "prepare": prepare}))
    run_stage("prepare", root / "params.yaml")
    rows = [json.loads(line) for line in (root / "outputs/prepare/captions.jsonl").read_text().splitlines()]
    return {row["id"]: row for row in rows}


def test_multi_line_caption_files_become_one_caption_per_line(tmp_path):
    images = write_images(tmp_path / "data/a", 3)
    images[0].with_suffix(".txt").write_text("a red circle\r\n\n  a circle, red  \nsks style\n")
    images[1].with_suffix(".txt").write_text("one caption with a trailing newline\n")
    rows = _prepare(tmp_path, {"data_root": "data", "instance_data_dir": "data/a"})
    first, second, third = (rows[p.name] for p in images)
    assert first == {"id": images[0].name, "caption": "a red circle",
                     "captions": ["a red circle", "a circle, red", "sks style"]}
    assert second == {"id": images[1].name, "caption": "one caption with a trailing newline"}  # as before
    assert "captions" not in third
    assert caption_texts(first) == ["a red circle", "a circle, red", "sks style"]
    assert caption_texts(second) == ["one caption with a trailing newline"]

    # the seed's disable_multiline_split: the whole file is one caption; prepend_instance_prompt applies per line
    rows = _prepare(tmp_path, {"data_root": "data", "instance_data_dir": "data/a", "disable_multiline_split": True})
    assert rows[images[0].name] == {"id": images[0].name, "caption": "a red circle\r\n\n  a circle, red  \nsks style"}
    rows = _prepare(tmp_path, {"data_root": "data", "instance_data_dir": "data/a", "instance_prompt": "sks",
                               "prepend_instance_prompt": True})
    assert rows[images[0].name]["captions"] == ["sks a red circle", "sks a circle, red", "sks sks style"]


def test_list_cells_of_a_metadata_table_are_several_captions(tmp_path):
    images = write_images(tmp_path / "data/a", 2)
    table = [{"file": images[0].stem, "text": ["first", "", "second"]}, {"file": images[1].stem, "text": ["only"]}]
    (tmp_path / "data/a/meta.jsonl").write_text("".join(json.dumps(r) + "\n" for r in table))
    rows = _prepare(tmp_path, {"data_root": "data", "instance_data_dir": "data/a", "caption_strategy": "parquet",
                               "parquet": {"path": "meta.jsonl", "filename_column": "file",
                                           "caption_column": "text"}})
    assert rows[images[0].name]["captions"] == ["first", "second"]
    assert rows[images[1].name] == {"id": images[1].name, "caption": "only"}


def test_split_caption_lines_drops_blank_lines():
    assert split_caption_lines("a\n\n b \r\n\t\nc") == ["a", "b", "c"]


def test_caption_choice_is_uniform_deterministic_and_varies_by_step():
    seed, count = 42, 3
    picks = [caption_choice(seed, micro_batch, position, count) for micro_batch in range(3000) for position in
             range(2)]
    assert set(picks) == {0, 1, 2}
    counts = Counter(picks)
    assert all(abs(n - 2000) < 200 for n in counts.values()), counts  # 6000 draws: ~2000 each (sd ~37)
    # a pure function: the same arguments (a resumed run, another process) give the same caption
    assert picks == [caption_choice(seed, micro_batch, position, count) for micro_batch in range(3000)
                     for position in range(2)]
    # another seed picks differently; one caption needs no draw
    assert picks != [caption_choice(7, m, p, count) for m in range(3000) for p in range(2)]
    assert {caption_choice(seed, m, 0, 1) for m in range(100)} == {0}
