"""`flux2lora import-simpletuner`: an imported SimpleTuner config trains the run SimpleTuner would have trained.

Every key of the seed guide's configs is reported as mapped (with SimpleTuner's meaning), refused or without effect
(with the reason), every value the import writes for a key left unset is reported as defaulted (SimpleTuner's
default, or ours where it has no such key), and the written params pass `check-params`. The expected values come
from SimpleTuner's documented behaviour (its OPTIONS.md, cmd_args.py, cli_utils.py, custom_schedule.py, trainer.py
and the FLUX.2 model's check_user_config: read to learn what it does, not copied)."""

from __future__ import annotations

import json
import math
import shutil
import tomllib
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from flux2lora.cli import app
from flux2lora.config import ParamsError, load_params
from flux2lora.simpletuner import READ_BY_IMPORT, SEED_KEYS, import_simpletuner, megapixel_resolution
from flux2lora.train.schedules import build_lr_scheduler
from helpers import REPO

FIXTURES = Path(__file__).parent / "fixtures" / "simpletuner"
ONE_DATASET = [{"id": "d", "type": "local", "instance_data_dir": "datasets/d", "caption_strategy": "textfile"}]


@pytest.fixture
def project(tmp_path) -> Path:
    root = tmp_path / "project"
    root.mkdir()
    for name in ("params.yaml", "user_prompt_library.json"):
        shutil.copy2(REPO / name, root / name)
    return root


def seed_folder(tmp_path: Path, config: dict, backends: list | dict | None = None, name: str = "seed") -> Path:
    folder = tmp_path / name
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "multidatabackend.json").write_text(json.dumps(ONE_DATASET if backends is None else backends))
    return folder


def imported(tmp_path, project, config: dict, backends=None):
    report = import_simpletuner(seed_folder(tmp_path, config, backends), project / "params.yaml")
    return report, load_params(project / "params.yaml")


def seed_keys(folder: Path) -> set[str]:
    """Every key of a fixture folder as the report names it: "<file> <key>" and "<file>[<id>] <key>"."""
    config = folder / "config.json"
    keys = {f"config.json {k.lstrip('-')}" for k in json.loads(config.read_text())} if config.exists() else {
        f"config.toml {k.lstrip('-')}" for k in tomllib.loads((folder / "config.toml").read_text())}
    for backend in json.loads((folder / "multidatabackend.json").read_text()):
        keys |= {f"multidatabackend.json[{backend['id']}] {k}" for k in backend}
    return keys


def check_params_passes(path: Path) -> None:
    result = CliRunner().invoke(app, ["check-params", "--params", str(path)])
    assert result.exit_code == 0, result.output


def test_the_guide_with_every_flag_it_names(project):
    """The guide's config plus every option and flag it shows: each key has one status, mapped keys carry
    SimpleTuner's meaning, and the result passes check-params."""
    report = import_simpletuner(FIXTURES / "guide", project / "params.yaml")
    check_params_passes(project / "params.yaml")
    status = report.status()
    assert not seed_keys(FIXTURES / "guide") - set(status), "keys without a status"
    assert all(row["meaning"] for row in report.mapped)
    assert all(row["reason"] for row in report.refused + report.no_effect + report.defaulted)
    assert not report.refused, report.refused

    params = load_params(project / "params.yaml")
    train = params.train
    assert params.model.model_flavour == "dev" and params.model.model_path == "black-forest-labs/FLUX.2-dev"
    assert (train.lora_rank, train.learning_rate, train.max_train_steps, train.num_train_epochs) == (16, 1e-4,
                                                                                                       10000, None)
    assert (train.base_model_precision, params.encode_text.text_encoder_1_precision) == ("int8-quanto", "int8-quanto")
    assert train.tread_config.routes[0].start_layer_idx == 4 and train.flux_lora_target == "all"
    assert (train.enable_group_offload, train.group_offload_type, train.group_offload_blocks_per_group,
            train.group_offload_use_stream, train.offload_during_startup, train.quantize_via) == (
        True, "block_level", 1, True, True, "cpu")  # "--offload_during_startup": "true", a string, is a bool here
    assert params.encode_text.group_offload_text_encoder and params.encode_latents.group_offload_vae
    assert params.encode_latents.vae_batch_size == 2 and params.encode_latents.write_batch_size == 128
    assert params.encode_text.write_batch_size == 64  # the text_embeds backend's own, as in SimpleTuner
    assert (train.max_grad_norm, train.grad_clip_method) == (1.0, "value")  # SimpleTuner clips by value by default
    assert train.conditioning_multidataset_sampling == "combined"
    # FLUX.2 in SimpleTuner trains with constant guidance 1.0 whatever the config says
    assert (train.flux_guidance_mode, train.flux_guidance_value) == ("constant", 1.0)
    assert status["config.json flux_guidance_mode"] == "no effect"
    assert "check_user_config" in next(r["reason"] for r in report.no_effect
                                       if r["source"] == "config.json flux_guidance_mode")
    # datasets: SimpleTuner's keys; the unused ones are said to be so
    by_id = {d.id: d for d in params.prepare.datasets}
    assert set(by_id) == {"my-dataset", "flux2-edits", "flux2-references"}
    mine = by_id["my-dataset"]
    assert (mine.crop, mine.crop_aspect, mine.crop_style, mine.resolution, mine.resolution_type, mine.repeats,
            mine.minimum_image_size) == (True, "square", "center", 1024, "pixel_area", 10, 1024)
    for key in ("maximum_image_size", "metadata_backend", "cache_dir_vae"):
        assert status[f"multidatabackend.json[my-dataset] {key}"] == "no effect"
    # the edit dataset sets no resolution_type: SimpleTuner's default pixel_area (~1 MP), not ours (pixel)
    assert by_id["flux2-edits"].resolution_type == "pixel_area" and by_id["flux2-edits"].conditioning_data == [
        "flux2-references"]
    assert by_id["flux2-references"].conditioning_type == "reference_strict"
    assert params.prepare.data_root == "datasets"
    library = json.loads((project / "user_prompt_library.json").read_text())
    assert set(library) == {"portrait_subject", "artistic_subject", "cinematic_subject"}


@pytest.mark.parametrize("fixture", ["quickstart", "snippets", "toml", "guide"])
def test_every_fixture_key_has_one_status_and_the_result_passes_check_params(project, fixture):
    report = import_simpletuner(FIXTURES / fixture, project / "params.yaml")
    check_params_passes(project / "params.yaml")
    sources = [row["source"] for row in report.refused + report.no_effect]
    assert len(sources) == len(set(sources)) and not set(sources) & {row["source"] for row in report.mapped}
    if fixture != "toml":
        assert not seed_keys(FIXTURES / fixture) - set(report.status())


def test_unset_keys_take_simpletuner_defaults(tmp_path, project):
    """A config that sets almost nothing: the run is SimpleTuner's default run, each value listed as defaulted."""
    report, params = imported(tmp_path, project, {"model_family": "flux2", "model_flavour": "klein-4b",
                                                  "max_train_steps": 100},
                              [{"id": "d", "type": "local", "instance_data_dir": "datasets/d"}])
    train, validate = params.train, params.validate_
    expected = {
        "train.lora_dropout": 0.1, "train.lora_init_type": "default", "train.learning_rate": 4e-7,
        "train.train_batch_size": 4, "train.lr_scheduler": "constant_with_warmup", "train.lr_end": 4e-7,
        "train.lr_power": 0.8, "train.max_grad_norm": 2.0, "train.grad_clip_method": "value",
        "train.caption_dropout_probability": 0.1, "train.conditioning_multidataset_sampling": "random",
        "train.checkpointing_steps": 500, "train.checkpoints_total_limit": 5, "train.timestep_shift": 3.0,
        "validate.validation_num_inference_steps": 30, "validate.validation_step_interval": 100,
        "validate.validation_resolution": "256x256", "validate.validation_guidance": 7.5,
        "encode_text.write_batch_size": 128, "encode_latents.write_batch_size": 128,
        "prepare.resolution_type": "pixel_area", "prepare.caption_strategy": "filename", "prepare.resolution": 1024,
        "publish.hub_repo_id": None,
    }
    defaulted = {row["target"]: row["value"] for row in report.defaulted}
    for target, value in expected.items():
        assert defaulted[target] == value, target
        section, key = target.split(".")
        holder = {"train": train, "validate": validate, "encode_text": params.encode_text,
                  "encode_latents": params.encode_latents, "publish": params.publish}.get(section)
        assert getattr(holder or params.prepare.datasets[0], key) == value, target  # prepare: the dataset's value
    assert all("SimpleTuner" in row["reason"] or "flux2lora" in row["reason"] for row in report.defaulted)
    seed_row = next(r for r in report.defaulted if r["target"] == "train.seed")
    assert seed_row["value"] == 42 and "random" in seed_row["reason"]
    check_params_passes(project / "params.yaml")


def test_unset_length_is_one_epoch_and_zero_epochs_means_unused(tmp_path, project):
    _, params = imported(tmp_path, project, {"model_family": "flux2"})
    assert (params.train.max_train_steps, params.train.num_train_epochs) == (0, 1)  # SimpleTuner: 1 epoch
    report, params = imported(tmp_path, project, {"max_train_steps": 300, "num_train_epochs": 0})
    assert (params.train.max_train_steps, params.train.num_train_epochs) == (300, None)
    assert report.status()["config.json num_train_epochs"] == "no effect"
    report, params = imported(tmp_path, project, {"max_train_steps": 0, "num_train_epochs": 5})
    assert (params.train.max_train_steps, params.train.num_train_epochs) == (0, 5)
    with pytest.raises(ParamsError, match="both 0"):
        imported(tmp_path, project, {"max_train_steps": 0, "num_train_epochs": 0})


@pytest.mark.parametrize("given,expected", [
    ({"lr_scheduler": "cosine", "lr_warmup_steps": 100}, ("cosine_oscillating", 100)),
    ({"lr_scheduler": "cosine_with_warmup", "lr_warmup_steps": 50}, ("cosine_oscillating", 50)),
    ({"lr_scheduler": "cosine"}, ("cosine_oscillating", 1000)),  # its Cosine class's period when warmup is 0
    ({"lr_scheduler": "constant", "lr_warmup_steps": 100}, ("constant_with_warmup", 100)),
    ({"lr_scheduler": "constant"}, ("constant", 0)),
    ({"lr_scheduler": "sine", "lr_warmup_steps": 30}, ("sine", 30)),
    ({"lr_scheduler": "cosine_with_restarts", "lr_warmup_steps": 30}, ("constant", 30)),
    ({"lr_scheduler": "polynomial", "lr_warmup_steps": 10, "lr_end": 1e-6, "lr_power": 2.0}, ("polynomial", 10)),
    ({"lr_scheduler": "linear", "lr_warmup_steps": 10}, ("linear", 10)),
])
def test_schedulers_get_simpletuner_semantics(tmp_path, project, given, expected):
    _, params = imported(tmp_path, project, {"learning_rate": 1e-4, "max_train_steps": 1000, **given})
    assert (params.train.lr_scheduler, params.train.lr_warmup_steps) == expected


def test_imported_cosine_trains_simpletuners_curve(tmp_path, project):
    """The issue's example: SimpleTuner's cosine at step 500 of 1000 with warmup 100 is at lr_end (4.0e-7)."""
    from test_schedules import simpletuner_rate

    _, params = imported(tmp_path, project, {"learning_rate": 1e-4, "max_train_steps": 1000,
                                             "lr_scheduler": "cosine", "lr_warmup_steps": 100})
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=params.train.learning_rate)
    scheduler = build_lr_scheduler(optimizer, params.train, params.train.max_train_steps)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for k in range(1001):
            if k % 50 == 0:
                assert math.isclose(scheduler.get_last_lr()[0], simpletuner_rate("cosine", k), rel_tol=1e-9), k
            scheduler.step()
    assert simpletuner_rate("cosine", 500) == pytest.approx(4.0e-7)


def test_periodic_schedules_without_a_period_stop_like_simpletuner(tmp_path, project):
    with pytest.raises(ParamsError, match="lr_warmup_steps"):
        imported(tmp_path, project, {"lr_scheduler": "sine"})


def test_checkpoint_interval_names(tmp_path, project):
    _, params = imported(tmp_path, project, {"checkpoint_step_interval": 100})
    assert params.train.checkpointing_steps == 100
    _, params = imported(tmp_path, project, {"checkpointing_steps": 100})  # the legacy alias
    assert params.train.checkpointing_steps == 100
    report, params = imported(tmp_path, project, {"checkpoint_step_interval": 100, "checkpointing_steps": 300})
    assert params.train.checkpointing_steps == 100 and report.status()["config.json checkpointing_steps"] == \
        "no effect"
    report, params = imported(tmp_path, project, {"save_total_limit": 2, "validation_steps": 25})
    assert (params.train.checkpoints_total_limit, params.validate_.validation_step_interval) == (2, 25)


def test_push_to_hub_gates_the_upload(tmp_path, project):
    report, params = imported(tmp_path, project, {"hub_model_id": "me/my-lora"})
    assert params.publish.hub_repo_id is None  # SimpleTuner uploads nothing without push_to_hub
    assert "push_to_hub is false" in next(r["reason"] for r in report.no_effect
                                          if r["source"] == "config.json hub_model_id")
    _, params = imported(tmp_path, project, {"hub_model_id": "https://huggingface.co/me/my-lora",
                                             "push_to_hub": True, "model_card_private": False})
    assert (params.publish.hub_repo_id, params.publish.hub_private) == ("me/my-lora", False)
    _, params = imported(tmp_path, project, {"push_to_hub": "true", "tracker_project_name": "me/proj"})
    assert params.publish.hub_repo_id == "me/proj"  # its HubManager falls back on tracker_project_name
    assert params.tracking.experiment_name == "me/proj"


def test_hub_and_s3_datasets_stop_the_import(tmp_path, project):
    before = (project / "params.yaml").read_text()
    for backend in ({"id": "hf", "type": "huggingface", "huggingface": {"dataset_name": "me/set"}},
                    {"id": "s3", "type": "aws", "aws_bucket_name": "b"}):
        with pytest.raises(ParamsError, match=rf"\[{backend['id']}\].*local folders only"):
            imported(tmp_path, project, {"model_family": "flux2"}, [backend])
    with pytest.raises(ParamsError, match="no multidatabackend.json"):
        folder = seed_folder(tmp_path, {"lora_rank": 4}, name="nodata")
        (folder / "multidatabackend.json").unlink()
        import_simpletuner(folder, project / "params.yaml")
    assert (project / "params.yaml").read_text() == before, "a stopped import writes nothing"


def test_the_previous_dataset_never_survives(tmp_path, project):
    assert load_params(project / "params.yaml").prepare.instance_data_dir == "data/demo"
    _, params = imported(tmp_path, project, {"lora_rank": 4})
    assert params.prepare.instance_data_dir is None and [d.id for d in params.prepare.datasets] == ["d"]


@pytest.mark.parametrize("precision,ours", [("int8-torchao", "int8-quanto"), ("int8-sdnq", "int8-quanto"),
                                            ("nf4-bnb", "int4-quanto"), ("fp8-quanto", "fp8-torchao"),
                                            ("fp8-torchao", "fp8-torchao")])
def test_precisions_map_to_the_nearest_with_a_note(tmp_path, project, precision, ours):
    report, params = imported(tmp_path, project, {"base_model_precision": precision,
                                                  "text_encoder_1_precision": precision})
    assert params.train.base_model_precision == ours
    assert params.encode_text.text_encoder_1_precision == ("int8-quanto" if ours == "fp8-torchao" else ours)
    if precision != ours:
        assert any(precision in note and ours in note for note in report.notes)
    check_params_passes(project / "params.yaml")


def test_unknown_precision_is_refused_and_says_what_is_used(tmp_path, project):
    report, params = imported(tmp_path, project, {"base_model_precision": "int2-quanto"})
    row = next(r for r in report.refused if r["source"] == "config.json base_model_precision")
    assert "no near equivalent" in row["reason"] and "'no_change'" in row["reason"]
    assert params.train.base_model_precision == "no_change"
    check_params_passes(project / "params.yaml")


def test_validation_resolution_numbers_and_megapixels(tmp_path, project):
    assert (megapixel_resolution(1.0), megapixel_resolution(1.5), megapixel_resolution(2)) == (1024, 1024, 2000)
    for given, expected in (("1.0", "1024x1024"), (1.0, "1024x1024"), ("1024", "1024x1024"),
                            ("1024x768,768x1024", "1024x768,768x1024"), (512, "512x512")):
        _, params = imported(tmp_path, project, {"validation_resolution": given})
        assert params.validate_.validation_resolution == expected, given
        check_params_passes(project / "params.yaml")
    report, params = imported(tmp_path, project, {"validation_resolution": "0.5"})  # SimpleTuner makes it 0 px
    assert report.status()["config.json validation_resolution"] == "refused"
    assert params.validate_.validation_resolution == "256x256"  # SimpleTuner's default instead


def test_numeric_strings_are_converted(tmp_path, project):
    report, _ = imported(tmp_path, project, {"learning_rate": "1e-4", "lora_rank": "16", "max_train_steps": "200",
                                             "gradient_checkpointing": "false", "lr_warmup_steps": "10"})
    raw = yaml.safe_load((project / "params.yaml").read_text())["train"]
    assert (raw["learning_rate"], raw["lora_rank"], raw["max_train_steps"], raw["gradient_checkpointing"],
            raw["lr_warmup_steps"]) == (1e-4, 16, 200, False, 10)
    assert raw["lr_scheduler"] == "constant_with_warmup"  # SimpleTuner's default schedule, with the warmup


def test_web_ui_saved_format(tmp_path, project):
    folder = tmp_path / "webui"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_metadata": {"name": "mine", "created_at": "2025-01-01"},
                                                    "config": {"--lora_rank": 8, "--learning_rate": "0.0002"}}))
    (folder / "multidatabackend.json").write_text(json.dumps({"_metadata": {"name": "mine"},
                                                              "datasets": ONE_DATASET}))
    report = import_simpletuner(folder, project / "params.yaml")
    params = load_params(project / "params.yaml")
    assert (params.train.lora_rank, params.train.learning_rate) == (8, 2e-4)
    assert [d.id for d in params.prepare.datasets] == ["d"] and "config.json _metadata" not in report.status()


def test_multiline_split_option_and_unknown_keys(tmp_path, project):
    report, params = imported(tmp_path, project, {"some_future_option": 3},
                              [{**ONE_DATASET[0], "disable_multiline_split": True, "probability": 0.5}])
    assert params.prepare.datasets[0].disable_multiline_split is True
    status = report.status()
    assert status["config.json some_future_option"] == "refused"
    assert status["multidatabackend.json[d] probability"] == "mapped"
    assert params.prepare.datasets[0].probability == 0.5


def test_yaml_1_1_words_stay_strings(tmp_path, project):
    """mixed_precision "no" must not become `no` (False to PyYAML and DVC) in the written params."""
    _, params = imported(tmp_path, project, {"mixed_precision": "no"})
    assert params.train.mixed_precision == "no"
    assert yaml.safe_load((project / "params.yaml").read_text())["train"]["mixed_precision"] == "no"


@pytest.mark.parametrize("config,match", [({"lora_type": "lycoris"}, "lycoris_config file"),
                                          ({"model_type": "full"}, "LoRAs only"),
                                          ({"controlnet": True}, "ControlNets"),
                                          ({"model_family": "sdxl"}, "FLUX.2 only")])
def test_a_different_kind_of_model_stops_the_import(tmp_path, project, config, match):
    with pytest.raises(ParamsError, match=match):
        imported(tmp_path, project, config)


def test_every_table_entry_has_a_meaning():
    assert all(entry.meaning for entry in SEED_KEYS.values())


def test_config_toml_reads_like_config_json(project, tmp_path):
    toml_report = import_simpletuner(FIXTURES / "toml", project / "params.yaml", write=False)
    other = tmp_path / "json"
    other.mkdir()
    shutil.copy2(REPO / "params.yaml", other / "params.yaml")
    json_report = import_simpletuner(FIXTURES / "quickstart", other / "params.yaml", write=False)
    assert toml_report.params == json_report.params
    files = set(READ_BY_IMPORT.values())  # the toml names its datasets and prompts files; the json folder has them
    assert {r["target"] for r in toml_report.mapped} - files == {r["target"] for r in json_report.mapped}


def test_import_keeps_comments_and_project_wiring(project):
    import_simpletuner(FIXTURES / "quickstart", project / "params.yaml")
    text = (project / "params.yaml").read_text()
    assert "# klein-4b | klein-9b (default) | dev" in text and "# flux2lora pipeline parameters" in text
    raw = yaml.safe_load(text)
    assert raw["train"]["lora_alpha"] is None, "the demo's alpha 8 must not silently halve a rank-16 LoRA"
    assert raw["validate"]["user_prompt_library"] == "user_prompt_library.json"  # project wiring kept
    assert raw["tracking"] == yaml.safe_load((REPO / "params.yaml").read_text())["tracking"]


def test_cli_dry_run_lists_everything_and_writes_nothing(project):
    before = (project / "params.yaml").read_text()
    result = CliRunner().invoke(app, ["import-simpletuner", str(FIXTURES / "quickstart"), "--params",
                                      str(project / "params.yaml"), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "no effect   config.json output_dir" in result.output
    assert "mapped      config.json lora_rank -> train.lora_rank = 16 (LoRA rank)" in result.output
    assert "defaulted   train.lora_dropout = 0.1: SimpleTuner's default lora_dropout=0.1" in result.output
    assert (project / "params.yaml").read_text() == before
    result = CliRunner().invoke(app, ["import-simpletuner", str(FIXTURES / "quickstart"), "--params",
                                      str(project / "params.yaml"), "--dry-run", "--json"])
    assert set(json.loads(result.output)) >= {"mapped", "defaulted", "refused", "no_effect"}


def test_imported_quickstart_prepares_its_dataset(project):
    """SimpleTuner's dataset entry, run: 1024-px square centre crops, minimum size enforced, repeats carried."""
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


def test_global_only_instance_prompt_overrides_every_backends_captions(tmp_path, project):
    """SimpleTuner's data backend factory turns captions off in every backend when the global flag is set (a
    backend's own flag, else the global one), whatever the backend's caption_strategy."""
    backends = [dict(ONE_DATASET[0]), {"id": "e", "type": "local", "instance_data_dir": "datasets/e",
                                       "caption_strategy": "filename"}]
    report, params = imported(tmp_path, project, {"only_instance_prompt": True, "instance_prompt": "sks dog"},
                              backends)
    assert [d.caption_strategy for d in params.prepare.datasets] == ["instanceprompt", "instanceprompt"]
    assert {m["target"] for m in report.mapped if "global only_instance_prompt" in m["source"]} == {
        "prepare.datasets[d].caption_strategy", "prepare.datasets[e].caption_strategy"}
    _, params = imported(tmp_path, project, {"only_instance_prompt": False}, backends)
    assert [d.caption_strategy for d in params.prepare.datasets] == ["textfile", "filename"]


def test_a_parquet_tables_size_columns_are_reported_without_effect(tmp_path, project):
    backend = {"id": "p", "type": "local", "instance_data_dir": "datasets/p", "caption_strategy": "parquet",
               "parquet": {"path": "meta.parquet", "filename_column": "id", "caption_column": "caption",
                           "width_column": "width", "height_column": "height"}}
    report, params = imported(tmp_path, project, {"lora_rank": 4}, [backend])
    parquet = params.prepare.datasets[0].parquet
    assert (parquet.path, parquet.filename_column, parquet.caption_column) == ("meta.parquet", "id", "caption")
    assert {e["source"] for e in report.no_effect} >= {"multidatabackend.json[p] parquet.width_column",
                                                       "multidatabackend.json[p] parquet.height_column"}


@pytest.mark.parametrize("value", [["attn.to_q", "attn.add_q_proj"], '["attn.to_q", "attn.add_q_proj"]'])
def test_peft_target_modules_replace_the_preset(tmp_path, project, value):
    """SimpleTuner's peft_lora_target_modules (a list, or that list as a JSON string) wins over flux_lora_target."""
    report, params = imported(tmp_path, project, {"peft_lora_target_modules": value, "flux_lora_target": "mlp"})
    assert params.train.lora_target_modules == ["attn.to_q", "attn.add_q_proj"]
    assert params.train.flux_lora_target == "all"
    assert any(row["source"].endswith("flux_lora_target") and "replaces the preset" in row["reason"]
               for row in report.no_effect)
    check_params_passes(project / "params.yaml")


def test_use_dora_as_simpletuner_applies_it(tmp_path, project):
    """SimpleTuner's use_dora: DoRA with peft's default initialisation of A (whatever lora_init_type says), and
    switched off with a quanto base."""
    report, params = imported(tmp_path, project, {"use_dora": True, "lora_init_type": "gaussian"})
    assert params.train.use_dora and params.train.lora_init_type == "default"
    assert any(row["source"].endswith("lora_init_type") and "use_dora" in row["reason"] for row in report.no_effect)
    check_params_passes(project / "params.yaml")
    report, params = imported(tmp_path, project, {"use_dora": "true", "base_model_precision": "int8-quanto"})
    assert not params.train.use_dora and params.train.base_model_precision == "int8-quanto"
    assert any(row["source"].endswith("use_dora") and "quanto" in row["reason"] for row in report.no_effect)


def test_eval_and_ema_keys_map_by_meaning(tmp_path, project):
    report, params = imported(tmp_path, project, {"eval_steps_interval": 50, "num_eval_images": 3,
                                                  "eval_timesteps": 4, "use_ema": True, "ema_decay": 0.999,
                                                  "ema_update_interval": 10, "ema_device": "accelerator"})
    cfg = params.validate_
    assert (cfg.eval_every_n_steps, cfg.eval_max_samples) == (50, 3)
    assert cfg.eval_sigmas == [0.125, 0.375, 0.625, 0.875]  # 4 equal bands of (0, 1], their middles
    assert (params.train.use_ema, params.train.ema_decay, params.train.ema_update_interval) == (True, 0.999, 10)
    assert report.status()["config.json ema_device"] == "no effect"
    report, params = imported(tmp_path, project, {"eval_dataset_id": "held"})
    assert report.status()["config.json eval_dataset_id"] == "refused"
    assert params.validate_.eval_every_n_steps == 100  # unset: flux2lora's (the eval loss is on by default)


@pytest.mark.parametrize("given,expected", [
    ({"flow_schedule_auto_shift": True}, "auto"),
    ({"flow_schedule_auto_shift": True, "flow_schedule_shift": 0}, "auto"),
    ({"flow_schedule_auto_shift": False, "flow_schedule_shift": 2.5}, 2.5),
    ({"flow_schedule_shift": 0}, 1.0),  # SimpleTuner: no shift
    ({}, 3.0),
])
def test_auto_shift_maps_to_the_resolution_dependent_shift(tmp_path, project, given, expected):
    report, params = imported(tmp_path, project, given)
    assert params.train.timestep_shift == expected
    if expected == "auto":
        assert any("compute_empirical_mu" in note for note in report.notes)


def test_auto_shift_with_a_static_shift_stops_like_simpletuner(tmp_path, project):
    with pytest.raises(ParamsError, match="cannot be combined"):
        imported(tmp_path, project, {"flow_schedule_auto_shift": True, "flow_schedule_shift": 3.0})


@pytest.mark.parametrize("given,expected,noted", [
    ("adamw_bf16", "adamw_bf16", True), ("optimi-adamw", "adamw", False), ("bnb-adamw8bit", "adamw8bit", False),
    ("ao-adamw8bit", "adamw8bit", True), ("optimi-lion", "lion", False), ("bnb-lion8bit", "lion", True),
    ("optimi-stableadamw", "stableadamw", False), ("prodigy", "prodigy", False), (None, "adamw_bf16", False),
])
def test_optimizer_names_map_to_ours(tmp_path, project, given, expected, noted):
    report, params = imported(tmp_path, project, {} if given is None else {"optimizer": given})
    assert params.train.optimizer == expected and not params.train.use_8bit_adam
    assert any(note.startswith("train.optimizer:") for note in report.notes) == noted


def test_an_optimizer_we_lack_is_refused_and_simpletuners_default_used(tmp_path, project):
    report, params = imported(tmp_path, project, {"optimizer": "soap"})
    assert report.status()["config.json optimizer"] == "refused"
    assert params.train.optimizer == "adamw_bf16"


def test_scheduled_sampling_keys_map_by_name(tmp_path, project):
    report, params = imported(tmp_path, project, {"scheduled_sampling_max_step_offset": 8,
                                                  "scheduled_sampling_probability": 0.3,
                                                  "scheduled_sampling_ramp_steps": 100,
                                                  "scheduled_sampling_prob_end": 0.7,
                                                  "scheduled_sampling_ramp_shape": "cosine",
                                                  "scheduled_sampling_sampler": "unipc"})
    cfg = params.train
    assert (cfg.scheduled_sampling_max_step_offset, cfg.scheduled_sampling_probability,
            cfg.scheduled_sampling_ramp_steps, cfg.scheduled_sampling_prob_start,
            cfg.scheduled_sampling_prob_end) == (8, 0.3, 100, 0.0, 0.7)
    assert any("unipc" in note for note in report.notes)  # SimpleTuner's default solver, ours takes Euler steps
    assert report.status()["config.json scheduled_sampling_ramp_shape"] == "refused"
    assert report.status()["config.json scheduled_sampling_sampler"] == "refused"  # unipc: Euler is used
    report, params = imported(tmp_path, project, {})
    assert params.train.scheduled_sampling_max_step_offset == 0  # off, as SimpleTuner's default


def test_lycoris_lokr_config_maps_algo_dims_and_factorisation(tmp_path, project):
    """SimpleTuner's lora_type lycoris reads its lycoris_config JSON file (SimpleTuner's klein-9b LoKr example's
    shape): algo -> train.lora_type, linear_dim / linear_alpha -> lora_rank / lora_alpha, factor / full_matrix /
    decompose_both -> train.lycoris_config; the standard-LoRA keys SimpleTuner ignores there have no effect."""
    folder = seed_folder(tmp_path, {"lora_type": "lycoris", "lycoris_config": "config/lycoris_config.json",
                                    "lora_rank": 64, "lora_dropout": 0.1})
    (folder / "lycoris_config.json").write_text(json.dumps({
        "algo": "lokr", "multiplier": 1.0, "linear_dim": 10000, "linear_alpha": 1, "factor": 16,
        "apply_preset": {"target_module": ["Attention", "FeedForward"]}}))
    report = import_simpletuner(folder, project / "params.yaml")
    train = load_params(project / "params.yaml").train
    assert (train.lora_type, train.lora_rank, train.lora_alpha) == ("lokr", 10000, 1)
    assert train.lycoris_config.factor == 16 and train.lora_dropout == 0.0
    assert report.status()["config.json lora_rank"] == "no effect"
    assert any("apply_preset" in note for note in report.notes)
    check_params_passes(project / "params.yaml")
    (folder / "lycoris_config.json").write_text(json.dumps({"algo": "ia3"}))
    with pytest.raises(ParamsError, match="algo 'ia3'"):
        import_simpletuner(folder, project / "params.yaml")
