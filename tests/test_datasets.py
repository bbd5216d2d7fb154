"""Datasets in the seed's vocabulary: typed config with helpful errors, every caption strategy, several datasets
sampled by repeats, references by id, one DVC-watched data_root, a prepare report that accounts for every bad file,
and a rerun that decodes only what changed."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
import yaml
from PIL import Image

from flux2lora.config import ParamsError, load_params, parse_params
from flux2lora.data.synthetic import BAD_INPUTS, write_awkward_inputs, write_bad_inputs, write_images
from flux2lora.stages import run_stage

# --------------------------------------------------------------------------------------------------------------
# a model-free project: prepare needs only params.yaml and the data


def project(root: Path, prepare: dict, **sections) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump({"output_dir": "outputs", "prepare": prepare, **sections}))
    return root


def rows(root: Path, name: str = "images") -> list[dict]:
    return [json.loads(line) for line in (root / f"outputs/prepare/{name}.jsonl").read_text().splitlines()]


def report(root: Path) -> dict:
    return json.loads((root / "outputs/prepare/report.json").read_text())


# --------------------------------------------------------------------------------------------------------------
# configuration


def test_unknown_dataset_key_names_the_entry_and_suggests_the_closest():
    with pytest.raises(ParamsError) as err:
        parse_params({"prepare": {"datasets": [{"id": "a", "instance_data_dir": "data/a", "crop_aspec": "square"}]}})
    assert "prepare.datasets.0.crop_aspec" in str(err.value) and "'prepare.datasets.0.crop_aspect'" in str(err.value)
    with pytest.raises(ParamsError, match="caption_colum.*'prepare.datasets.0.parquet.caption_column'"):
        parse_params({"prepare": {"datasets": [{"id": "a", "instance_data_dir": "d", "caption_strategy": "parquet",
                                                "parquet": {"path": "m.jsonl", "caption_colum": "text"}}]}})


def test_bad_values_and_inconsistent_datasets_are_errors():
    with pytest.raises(ParamsError, match="crop_aspect.*'square', 'closest', 'preserve' or 'random'"):
        parse_params({"prepare": {"crop_aspect": "sqaure"}})
    with pytest.raises(ParamsError, match="only 'local'|type"):
        parse_params({"prepare": {"datasets": [{"id": "a", "type": "aws", "instance_data_dir": "d"}]}})
    with pytest.raises(ParamsError, match="duplicate id"):
        parse_params({"prepare": {"datasets": [{"id": "a", "instance_data_dir": "d"}] * 2}})
    with pytest.raises(ParamsError, match="instanceprompt needs instance_prompt"):
        parse_params({"prepare": {"datasets": [{"id": "a", "instance_data_dir": "d",
                                                "caption_strategy": "instanceprompt"}]}})
    with pytest.raises(ParamsError, match="either prepare.instance_data_dir .* or prepare.datasets"):
        parse_params({"prepare": {"instance_data_dir": "d", "datasets": [{"id": "a", "instance_data_dir": "d"}]}})


def test_moved_resolution_key_says_where_it_went():
    with pytest.raises(ParamsError, match="encode_latents.resolution.*moved to prepare.resolution"):
        parse_params({"encode_latents": {"resolution": 1024}})


def test_text_embeds_backend_sets_encode_texts_write_batch_size():
    datasets = [{"id": "a", "instance_data_dir": "d"},
                {"id": "text-embeds", "dataset_type": "text_embeds", "default": True,
                 "write_batch_size": 32}]
    assert parse_params({"prepare": {"datasets": datasets}}).encode_text.write_batch_size == 32
    with pytest.raises(ParamsError, match="disagrees"):
        parse_params({"prepare": {"datasets": datasets}, "encode_text": {"write_batch_size": 8}})


# --------------------------------------------------------------------------------------------------------------
# caption strategies


def test_caption_strategies(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = tmp_path / "data"
    for name in ("text", "names", "fixed", "table", "lines"):
        write_images(data / name, 2, formats=("png",))
    for name in ("names", "fixed", "table", "lines"):
        for txt in (data / name).glob("*.txt"):
            txt.unlink()
    pq.write_table(pa.table({"file": ["img_00000", "img_00001"], "text": ["a parquet caption", ""],
                             "tags": ["x", "fallback tags"]}), data / "table" / "meta.parquet")
    (data / "lines" / "meta.jsonl").write_text(json.dumps({"filename": "img_00000.png", "caption": ["first", "2nd"]})
                                               + "\n")
    datasets = [
        {"id": "text", "instance_data_dir": "data/text", "caption_strategy": "textfile"},
        {"id": "names", "instance_data_dir": "data/names", "caption_strategy": "filename"},
        {"id": "fixed", "instance_data_dir": "data/fixed", "caption_strategy": "instanceprompt",
         "instance_prompt": "sks dog"},
        {"id": "table", "instance_data_dir": "data/table", "caption_strategy": "parquet", "prepend_instance_prompt":
         True, "instance_prompt": "sks", "parquet": {"path": "meta.parquet", "filename_column": "file",
                                                     "caption_column": "text", "fallback_caption_column": "tags"}},
        {"id": "lines", "instance_data_dir": "data/lines", "caption_strategy": "parquet",
         "parquet": {"path": "data/lines/meta.jsonl", "identifier_includes_extension": True}},
    ]
    root = project(tmp_path, {"data_root": "data", "resolution": 64, "datasets": datasets})
    run_stage("prepare", root / "params.yaml")
    captions = {row["id"]: row["caption"] for row in rows(root, "captions")}
    assert captions["text/img_00000.png"] == "sks style, picture 0 of coloured shapes"
    assert captions["names/img_00001.png"] == "img 00001"
    assert captions["fixed/img_00000.png"] == "sks dog"
    assert captions["table/img_00000.png"] == "sks a parquet caption"
    assert captions["table/img_00001.png"] == "sks fallback tags"  # empty caption column: the fallback column
    assert captions["lines/img_00000.png"] == "first"  # a list cell: its first caption
    skipped = {s["file"]: s["reason"] for s in report(root)["skipped_files"] if s["dataset"] == "lines"}
    assert skipped == {"img_00001.png": "missing_caption"}


# --------------------------------------------------------------------------------------------------------------
# several datasets, buckets, references, data_root


def test_several_datasets_with_their_own_buckets_repeats_and_references(tmp_path):
    data = tmp_path / "data"
    write_images(data / "wide", 3, sizes=((192, 96),), formats=("jpg",))
    write_images(data / "square", 4, sizes=((80, 80),), formats=("png",))
    write_images(data / "edits", 2, sizes=((100, 60),), formats=("png",))
    write_images(data / "before", 2, sizes=((100, 60),), formats=("jpg",))
    datasets = [
        {"id": "wide", "instance_data_dir": "data/wide", "crop": False, "resolution": 64,
         "resolution_type": "pixel", "repeats": 2},
        {"id": "square", "instance_data_dir": "data/square", "crop": True, "crop_aspect": "square",
         "crop_style": "corner", "resolution": 48, "resolution_type": "pixel_area"},
        {"id": "edits", "instance_data_dir": "data/edits", "conditioning_data": ["before"], "crop": True,
         "crop_aspect": "closest", "crop_aspect_buckets": [1.0, 1.5], "resolution": 64,
         "resolution_type": "pixel_area"},
        {"id": "before", "dataset_type": "conditioning", "instance_data_dir": "data/before",
         "conditioning_type": "reference_strict"},
        {"id": "off", "instance_data_dir": "data/missing-folder", "disabled": True},
    ]
    root = project(tmp_path, {"data_root": "data", "datasets": datasets})
    summary = run_stage("prepare", root / "params.yaml")
    assert summary["accepted"] == 3 + 4 + 2 and summary["skipped"] == 0
    by_id = {row["id"]: row for row in rows(root)}
    assert by_id["wide/img_00000.jpg"]["bucket"] == [128, 64] and by_id["wide/img_00000.jpg"]["repeats"] == 2
    assert by_id["square/img_00001.png"]["bucket"] == [48, 48]
    assert by_id["square/img_00001.png"]["offset"] == [0, 0]  # 80x80 -> 48x48: nothing left to crop
    edit = by_id["edits/img_00000.png"]
    assert edit["bucket"] == [80, 48]  # 5:3 is closest to 1.5 at ~64^2 pixels
    (reference,) = edit["references"]
    assert reference["path"] == "data/before/img_00000.jpg" and reference["dataset"] == "before"
    assert reference["bucket"] == edit["bucket"] and reference["offset"] == edit["offset"]  # strict: aligned
    assert report(root)["buckets"] == {"128x64": 3, "48x48": 4, "80x48": 2}


def test_a_dataset_outside_data_root_is_refused_because_dvc_would_not_see_it(tmp_path):
    write_images(tmp_path / "data" / "a", 1)
    write_images(tmp_path / "elsewhere" / "refs", 1)
    root = project(tmp_path, {"data_root": "data", "instance_data_dir": "data/a",
                              "conditioning_data": ["elsewhere/refs"]})
    with pytest.raises(ValueError, match=r"elsewhere/refs is outside prepare.data_root.*dvc repro"):
        run_stage("prepare", root / "params.yaml")
    root = project(tmp_path, {"data_root": ".", "instance_data_dir": "data/a"})
    with pytest.raises(ValueError, match="contains output_dir"):
        run_stage("prepare", root / "params.yaml")


@pytest.mark.slow
def test_dvc_reruns_prepare_when_a_conditioning_folder_changes(tmp_path):
    """The conditioning folder is not named in dvc.yaml; it is seen because it lies inside data_root."""
    from helpers import make_project, run

    root = make_project(tmp_path / "p", images=2, **{"prepare.conditioning_data": ["data/refs"]})
    (root / "data" / "refs").mkdir()
    for image in (root / "data" / "demo").glob("*.png"):
        Image.open(image).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(root / "data" / "refs" / image.name)
    run(["dvc", "repro", "prepare"], root)
    assert "prepare" not in run(["dvc", "status", "prepare"], root).stdout
    Image.new("RGB", (96, 96), (1, 2, 3)).save(root / "data" / "refs" / "shape_001.png")
    assert "changed deps" in run(["dvc", "status", "prepare"], root).stdout


# --------------------------------------------------------------------------------------------------------------
# bad inputs: counted with their reason, never a crash; the pipeline trains on the rest


def test_prepare_report_counts_every_bad_input_and_training_uses_the_good_images(tmp_path):
    from helpers import make_project

    root = make_project(tmp_path / "p", git=False, images=4,
                        **{"train.max_train_steps": 2, "train.train_batch_size": 2, "prepare.minimum_image_size": 32,
                           "validate.validation_step_interval": None})
    data = root / "data" / "demo"
    write_bad_inputs(data)
    write_awkward_inputs(data)
    summary = run_stage("prepare", root / "params.yaml")
    result = report(root)
    expected = {}
    for reason in BAD_INPUTS.values():
        expected[reason] = expected.get(reason, 0) + 1
    assert result["skipped_by_reason"] == expected
    assert {(s["file"], s["reason"]) for s in result["skipped_files"]} == set(BAD_INPUTS.items())
    assert all(s["file"] in s["detail"] or s["file"].rsplit(".", 1)[0] in s["detail"] for s in result["skipped_files"])
    good = 4 + 7  # demo images + the awkward but valid ones
    assert summary["accepted"] == result["accepted"] == good
    assert result["candidates"] == good + len(BAD_INPUTS)

    for stage in ("encode-text", "encode-latents", "train"):
        run_stage(stage, root / "params.yaml")
    latents = json.loads((root / "outputs/latents/index.json").read_text())
    assert len(latents["images"]) == good and not set(latents["images"]) & set(BAD_INPUTS)
    assert json.loads((root / "outputs/train/metrics.json").read_text())["steps"] == 2


def test_prepare_report_is_logged_to_mlflow(tmp_path):
    from flux2lora import tracking
    from flux2lora.data.prepare import log_prepare_report
    from flux2lora.layout import layout_for

    root = project(tmp_path, {"data_root": "data", "instance_data_dir": "data/a", "resolution": 64})
    write_images(root / "data/a", 2)
    write_bad_inputs(root / "data/a")
    run_stage("prepare", root / "params.yaml")
    mlflow = tracking.configure(load_params(root / "params.yaml"), root)
    with mlflow.start_run() as run:
        log_prepare_report(mlflow, layout_for(root, "outputs"))
    client = mlflow.tracking.MlflowClient()
    logged = client.get_run(run.info.run_id).data
    assert logged.tags["prepare.accepted"] == "2" and logged.tags["prepare.skipped.truncated"] == "1"
    assert not any(key.startswith("prepare") for key in logged.metrics)  # no chart section above the loss
    assert [a.path for a in client.list_artifacts(run.info.run_id, "prepare")] == ["prepare/report.json"]


# --------------------------------------------------------------------------------------------------------------
# incremental prepare


def decoded_paths(root: Path) -> set[str]:
    db = sqlite3.connect(root / "outputs/state/prepare_files.sqlite")
    return {Path(p).name for (p,) in db.execute("SELECT path FROM files")}


def test_rerun_decodes_only_new_and_changed_files_and_writes_the_same_manifests(tmp_path, monkeypatch):
    import flux2lora.data.prepare as prepare_module

    root = project(tmp_path, {"data_root": "data", "instance_data_dir": "data/a", "resolution": 64})
    write_images(root / "data/a", 20)
    write_bad_inputs(root / "data/a")
    run_stage("prepare", root / "params.yaml")
    first = (root / "outputs/prepare/images.jsonl").read_bytes(), report(root)["skipped_by_reason"]

    decoded = []
    real = prepare_module.inspect_image
    monkeypatch.setattr(prepare_module, "inspect_image", lambda path: decoded.append(Path(path).name) or real(path))
    summary = run_stage("prepare", root / "params.yaml")
    assert decoded == [] and summary["inspected"] == 0, "nothing changed: nothing is decoded again"
    assert ((root / "outputs/prepare/images.jsonl").read_bytes(), report(root)["skipped_by_reason"]) == first

    write_images(root / "data/a", 2, start=20)  # two new images
    Image.new("RGB", (90, 90), (5, 5, 5)).save(root / "data/a/img_00002.png")  # one changed image
    (root / "data/a/img_00004.png").unlink()  # one removed
    summary = run_stage("prepare", root / "params.yaml")
    assert sorted(decoded) == ["img_00002.png", "img_00020.png", "img_00021.jpg"]
    assert summary["accepted"] == 20 - 1 + 2
    assert "img_00004.png" not in decoded_paths(root), "records of removed files are dropped"


def test_caption_only_edit_leaves_images_manifest_byte_identical(tmp_path):
    root = project(tmp_path, {"data_root": "data", "instance_data_dir": "data/a", "resolution": 64})
    write_images(root / "data/a", 3)
    run_stage("prepare", root / "params.yaml")
    before = (root / "outputs/prepare/images.jsonl").read_bytes()
    (root / "data/a/img_00002.txt").write_text("a new caption")
    run_stage("prepare", root / "params.yaml")
    assert (root / "outputs/prepare/images.jsonl").read_bytes() == before
    assert {r["id"]: r["caption"] for r in rows(root, "captions")}["img_00002.png"] == "a new caption"


def test_shipped_params_describe_one_dataset_inside_data_root():
    from helpers import REPO

    params = load_params(REPO / "params.yaml")
    assert params.prepare.instance_data_dir.startswith(params.prepare.data_root + "/")
