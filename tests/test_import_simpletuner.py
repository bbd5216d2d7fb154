"""`flux2lora import-simpletuner`: the seed guide's own example configs become our params.yaml, every key is
accounted for (mapped, accepted without effect, or not mapped with a reason), and the result runs."""

from __future__ import annotations

import json
import shutil
import tomllib
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from flux2lora.cli import app
from flux2lora.config import load_params
from flux2lora.simpletuner import import_simpletuner
from helpers import REPO

FIXTURES = Path(__file__).parent / "fixtures" / "simpletuner"


@pytest.fixture
def project(tmp_path) -> Path:
    for name in ("params.yaml", "user_prompt_library.json"):
        shutil.copy2(REPO / name, tmp_path / name)
    return tmp_path


def seed_keys(folder: Path) -> set[str]:
    """Every key of a fixture folder as the report names it: "<file> <key>" and "<file>[<id>] <key>"."""
    config = folder / "config.json"
    keys = {f"config.json {k.lstrip('-')}" for k in json.loads(config.read_text())} if config.exists() else {
        f"config.toml {k.lstrip('-')}" for k in tomllib.loads((folder / "config.toml").read_text())}
    for backend in json.loads((folder / "multidatabackend.json").read_text()):
        keys |= {f"multidatabackend.json[{backend['id']}] {k}" for k in backend}
    return keys


def accounted(report) -> dict[str, str]:
    out = {}
    for kind, rows in (("mapped", report.mapped), ("no effect", report.without_effect),
                       ("not mapped", report.not_mapped)):
        for row in rows:
            assert row["source"] not in out, f"{row['source']} reported twice"
            out[row["source"]] = kind
    return out


def test_quickstart_example_maps_every_key(project):
    report = import_simpletuner(FIXTURES / "quickstart", project / "params.yaml")
    params = load_params(project / "params.yaml")
    assert params.model.model_flavour == "dev" and params.model.model_path == "black-forest-labs/FLUX.2-dev"
    assert (params.train.lora_rank, params.train.learning_rate, params.train.max_train_steps) == (16, 1e-4, 10000)
    assert params.train.mixed_precision == "bf16" and params.train.gradient_checkpointing
    assert params.train.flux_guidance_mode == "constant" and params.train.flux_guidance_value == 1.0
    assert params.validate_.validation_resolution == "1024x1024"
    assert params.validate_.validation_num_inference_steps == 20
    assert params.encode_text.write_batch_size == 64  # from the text_embeds backend

    (dataset,) = params.prepare.datasets
    assert dataset.id == "my-dataset" and dataset.instance_data_dir == "datasets/my-dataset"
    assert (dataset.crop, dataset.crop_aspect, dataset.crop_style) == (True, "square", "center")
    assert (dataset.resolution, dataset.resolution_type, dataset.repeats) == (1024, "pixel_area", 10)
    assert (dataset.minimum_image_size, dataset.maximum_image_size) == (1024, 1024)
    assert params.prepare.data_root == "datasets/my-dataset"

    kinds = accounted(report)
    missing = seed_keys(FIXTURES / "quickstart") - set(kinds) - {
        f"multidatabackend.json[{i}] {k}" for i in ("my-dataset", "text-embeds") for k in ("id", "type",
                                                                                            "dataset_type")}
    assert not missing, f"seed keys not reported: {sorted(missing)}"
    assert kinds["config.json output_dir"] == "not mapped"
    assert kinds["config.json model_type"] == kinds["config.json model_family"] == "no effect"
    assert kinds["multidatabackend.json[my-dataset] cache_dir_vae"] == "no effect"
    assert kinds["multidatabackend.json[text-embeds] cache_dir"] == "no effect"
    library = json.loads((project / "user_prompt_library.json").read_text())
    assert set(library) == {"portrait_subject", "artistic_subject", "cinematic_subject"}


def test_import_keeps_comments_and_resets_what_the_seed_leaves_unset(project):
    report = import_simpletuner(FIXTURES / "quickstart", project / "params.yaml")
    text = (project / "params.yaml").read_text()
    assert "# klein-4b | klein-9b (default) | dev" in text and "# flux2lora pipeline parameters" in text
    raw = yaml.safe_load(text)
    assert raw["train"]["lora_alpha"] is None, "the demo's alpha 8 must not silently halve a rank-16 seed LoRA"
    assert {"target": "train.lora_alpha", "was": 8, "now": None} in report.reset
    assert raw["validate"]["user_prompt_library"] == "user_prompt_library.json"  # project wiring kept
    assert raw["tracking"] == yaml.safe_load((REPO / "params.yaml").read_text())["tracking"]


def test_option_snippets_and_edit_datasets(project):
    report = import_simpletuner(FIXTURES / "snippets", project / "params.yaml")
    params = load_params(project / "params.yaml")
    assert params.train.flux_lora_target == "all"  # written "--flux_lora_target" in the guide
    assert (params.train.flux_guidance_mode, params.train.flux_guidance_min, params.train.flux_guidance_max) == (
        "random-range", 1.0, 5.0)
    assert params.encode_text.text_encoder_1_precision == "int8-quanto"
    assert params.model.base_model_default_dtype == "bf16"
    edits, references = params.prepare.datasets
    assert edits.conditioning_data == ["flux2-references"] and references.dataset_type == "conditioning"
    assert references.conditioning_type == "reference_strict"
    assert params.prepare.data_root == "/datasets/flux2"
    assert any("absolute" in note for note in report.notes)
    kinds = accounted(report)
    for key in ("base_model_precision", "tread_config"):  # keys another part of flux2lora may or may not support
        assert f"config.json {key}" in kinds


def test_config_toml_reads_like_config_json(project, tmp_path):
    toml_report = import_simpletuner(FIXTURES / "toml", project / "params.yaml", write=False)
    other = tmp_path / "json"
    other.mkdir()
    shutil.copy2(REPO / "params.yaml", other / "params.yaml")
    json_report = import_simpletuner(FIXTURES / "quickstart", other / "params.yaml", write=False)
    assert toml_report.params == json_report.params
    assert {r["target"] for r in toml_report.mapped} == {r["target"] for r in json_report.mapped}


def test_unsupported_values_are_reported_not_written(project, tmp_path):
    seed = tmp_path / "seed"
    seed.mkdir()
    (seed / "config.json").write_text(json.dumps({"model_family": "sdxl", "lr_scheduler": "sine", "lora_rank": 4,
                                                  "gradient_accumulation_steps": 4, "validation_steps": 100,
                                                  "validation_prompt": "a photo of sks dog"}))
    report = import_simpletuner(seed, project / "params.yaml")
    reasons = {r["source"]: r["reason"] for r in report.not_mapped}
    assert "flux2" in reasons["config.json model_family"]
    assert "lr_scheduler" in reasons["config.json lr_scheduler"]
    assert "config.json gradient_accumulation_steps" not in reasons
    params = load_params(project / "params.yaml")
    assert params.train.lr_scheduler == "constant" and params.train.lora_rank == 4
    assert params.train.gradient_accumulation_steps == 4  # same name in our train section
    assert params.validate_.validation_step_interval == 100  # the seed's validation_steps
    assert params.prepare.instance_data_dir == "data/demo", "no backends: the single-dataset prepare is kept"
    assert json.loads((project / "user_prompt_library.json").read_text()) == {
        "validation_prompt": "a photo of sks dog"}


def test_cli_dry_run_lists_everything_and_writes_nothing(project):
    before = (project / "params.yaml").read_text()
    result = CliRunner().invoke(app, ["import-simpletuner", str(FIXTURES / "quickstart"), "--params",
                                      str(project / "params.yaml"), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "NOT MAPPED  config.json output_dir" in result.output
    assert "mapped      config.json lora_rank -> train.lora_rank = 16" in result.output
    assert (project / "params.yaml").read_text() == before


def test_imported_quickstart_prepares_its_dataset(project):
    """The seed's dataset entry, run: 1024-px square centre crops, minimum size enforced, repeats carried."""
    from PIL import Image

    from flux2lora.stages import run_stage

    import_simpletuner(FIXTURES / "quickstart", project / "params.yaml")
    folder = project / "datasets" / "my-dataset"
    folder.mkdir(parents=True)
    for i, size in enumerate([(1280, 1024), (1024, 1536), (800, 800)]):
        Image.new("RGB", size, (40 * i, 90, 200)).save(folder / f"photo_{i}.png")
        (folder / f"photo_{i}.txt").write_text(f"sks photo {i}")
    summary = run_stage("prepare", project / "params.yaml")
    assert summary["accepted"] == 2 and summary["skipped_by_reason"] == {"too_small": 1}  # 800^2 < 1024^2
    rows = [json.loads(line) for line in (project / "outputs/prepare/images.jsonl").read_text().splitlines()]
    assert all(row["bucket"] == [1024, 1024] and row["repeats"] == 10 for row in rows)


def test_engine_options_of_the_guide_map_to_working_keys(project, tmp_path):
    """The guide's memory flags (group offload of transformer, text encoder and VAE; startup offload) and epochs
    land on the keys the trainer uses; with both lengths set the seed's max_train_steps decides, as there."""
    seed = tmp_path / "seed"
    seed.mkdir()
    (seed / "config.json").write_text(json.dumps({
        "enable_group_offload": True, "group_offload_type": "block_level", "group_offload_blocks_per_group": 1,
        "group_offload_use_stream": True, "group_offload_text_encoder": True, "group_offload_vae": True,
        "offload_during_startup": True, "base_model_precision": "fp8-torchao", "num_train_epochs": 5}))
    import_simpletuner(seed, project / "params.yaml")
    params = load_params(project / "params.yaml")
    train = params.train
    assert (train.enable_group_offload, train.group_offload_type, train.group_offload_blocks_per_group,
            train.group_offload_use_stream, train.offload_during_startup) == (True, "block_level", 1, True, True)
    assert params.encode_text.group_offload_text_encoder and params.encode_latents.group_offload_vae
    assert (train.base_model_precision, train.num_train_epochs, train.max_train_steps) == ("fp8-torchao", 5, 0)

    (seed / "config.json").write_text(json.dumps({"num_train_epochs": 5, "max_train_steps": 300}))
    report = import_simpletuner(seed, project / "params.yaml")
    params = load_params(project / "params.yaml")
    assert (params.train.max_train_steps, params.train.num_train_epochs) == (300, None)
    assert any(r["source"].endswith("num_train_epochs") for r in report.without_effect)
