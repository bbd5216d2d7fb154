"""The one table of what every params key changes (flux2lora.params_table) and the stage graph derived from it.

Per key (generated from the table): on a demo project the flow trained once, the key is changed to another valid
value; the `params` stage's files then change for exactly the stages the table names, DVC (which both `dvc repro`
and the flow's `DvcPipeline.is_current` ask) calls exactly those stages out of date, and the nightly comparison sees
a change exactly when the key is not a `runs` key. Then the three cases the README promises are re-run for real:
a validation prompt edit (encode-text of that prompt and validate only), a trigger phrase (publish only) and
log_every_n_steps (nothing that computes), under `dvc repro` and under the flow.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import typing
from pathlib import Path

import pytest
import yaml
from helpers import project_env, run, set_params
from servers import prefect_in_process

from flux2lora import nightly, params_table
from flux2lora.config import Params, ParamsError, parse_params, read_raw_params
from flux2lora.layout import layout_for
from flux2lora.params_table import PIPELINE_STAGES, PUBLISHES, RUNS, TABLE, Computes
from flux2lora.stages import DvcPipeline, run_stage

# Keys whose new value must be a particular one to be valid (the rest are derived from their type).
EXAMPLES: dict[str, typing.Any] = {
    "model.model_flavour": "tiny-klein-9b",
    "model.pretrained_model_name_or_path": "models/tiny-klein-4b/",  # the same folder, written differently
    "model.revision": "main",
    "model.device": "cpu",
    "model.pretrained_text_encoder_name_or_path": "models/tiny-klein-4b",
    "model.text_encoder_subfolder": "text_encoder",
    "model.text_encoder_revision": "main",
    "model.pretrained_tokenizer_name_or_path": "models/tiny-klein-4b",
    "model.tokenizer_subfolder": "tokenizer",
    "model.tokenizer_revision": "main",
    "prepare.data_root": "data/",
    "prepare.instance_data_dir": "data/demo/",
    "prepare.datasets": [{"id": "demo", "instance_data_dir": "data/demo"}],
    "prepare.parquet": {"path": "captions.parquet"},
    "prepare.conditioning_data": ["data/refs"],
    "prepare.crop_aspect_buckets": [1.0, 1.5],
    "prepare.image_extensions": [".png"],
    "prepare.instance_prompt": "a photo",
    "encode_text.text_encoder_out_layers": [1, 2, 3],
    "encode_text.text_encoder_1_precision": "bf16",
    "train.lora_alpha": 4,
    "train.lora_target_modules": ["attn.to_q"],
    "train.num_train_epochs": 2,
    "train.gradient_checkpointing_blocks": 1,
    "train.vram_budget_gib": 20,
    "train.tread_config": {"routes": [{"selection_ratio": 0.5, "start_layer_idx": 0, "end_layer_idx": 1}]},
    "train.compile_backend": "aot_eager",
    "train.checkpoints_total_limit": 5,
    "train.resume_from_checkpoint": None,
    "validate.user_prompt_library": "prompts-copy.json",
    "validate.validation_resolution": "32x32",
    "validate.validation_step_interval": 5,
    "train.early_stopping_patience": 3,
    "train.lycoris_config": {"factor": 4},
    "runtime.ray_address": "127.0.0.2:6379",
    "runtime.ray_master_addr": "127.0.0.2",
    "runtime.storage": "s3://bucket/runs",
    "runtime.ray_project_dir": "/mnt/shared/project",
    "validate.eval_sigmas": [0.25, 0.75],
    "publish.s3_uri": "s3://bucket/loras",
    "publish.s3_endpoint_url": "http://127.0.0.1:9000",
    "publish.hub_repo_id": "someone/lora",
    "publish.registered_model_name": "other",
    "tracking.tracking_uri": "sqlite:///other.db",
    "tracking.run_name": "night",
    "runtime.accelerate_config": "infra/accelerate/fsdp2.yaml",
    "runtime.system_metrics": False,
}
# Keys set together with the example (the schema requires the pair).
COMPANIONS = {"train.num_train_epochs": {"train.max_train_steps": 0},
              "train.lycoris_config": {"train.lora_type": "lokr"},
              "prepare.datasets": {"prepare.instance_data_dir": None},
              "prepare.instance_data_dir": {}}
# Changing output_dir moves every output: DVC then finds none of them, so every stage is out of date whatever kind
# the key has. It computes nothing (it is where things go), and the layout tests in test_dvc.py cover moving it.
NOT_CHANGED_HERE = {"output_dir": "every output moves with it (tests/test_dvc.py moves it)"}


def test_every_key_has_exactly_one_kind():
    assert params_table.unclassified() == [], (
        "params keys without an entry in flux2lora.params_table.TABLE (or entries naming no key): every key must "
        "say whether it computes a stage, only changes how it runs, or publishes")
    for key, kind in TABLE.items():
        assert kind in (RUNS, PUBLISHES) or isinstance(kind, Computes), key


def test_dvc_yaml_is_derived_from_the_table():
    """No stage lists params.yaml keys itself: each depends on the params stage's file for it, and only the params
    stage reads params.yaml."""
    stages = yaml.safe_load((Path(__file__).parents[1] / "dvc.yaml").read_text())["stages"]
    assert list(stages) == ["params", *PIPELINE_STAGES]
    assert stages["params"]["deps"] == ["params.yaml"]
    for name in PIPELINE_STAGES:
        assert "params" not in stages[name], f"{name} lists params itself; they come from the table"
        assert f"${{output_dir}}/params/{name}.json" in stages[name]["deps"], name
    declared = [next(iter(o)) if isinstance(o, dict) else o for o in stages["params"]["outs"]]
    assert declared == [f"${{output_dir}}/params/{name}.json" for name in PIPELINE_STAGES]


def changed_value(key: str, current):
    """Another valid value for `key`."""
    if key in EXAMPLES:
        return EXAMPLES[key]
    annotation = _field(key).annotation
    options = [annotation, *typing.get_args(annotation)]
    literal = [c for option in options if typing.get_origin(option) is typing.Literal for c in typing.get_args(option)]
    if literal:
        return next(c for c in literal if c != current)
    if isinstance(current, bool):
        return not current
    if isinstance(current, int):
        return current + 1
    if isinstance(current, float):
        return current + 0.25 if current < 0.5 else current / 2
    if isinstance(current, str):
        return current + " (changed)"
    raise AssertionError(f"no example value for {key} (current {current!r}): add one to EXAMPLES")


def _field(key: str):
    section, _, name = key.partition(".")
    if not name:
        return Params.model_fields[section]
    model = Params.model_fields["validate_" if section == "validate" else section].annotation
    return model.model_fields[name]


def _value(raw: dict, params: Params, key: str):
    return params_table._lookup(params.model_dump(by_alias=True, mode="json"), key)


class Project:
    """The demo project, pipeline up to date; `restore` puts params.yaml back."""

    def __init__(self, root: Path):
        self.root = root
        self.params_file = root / "params.yaml"
        self.original = self.params_file.read_text()

    def restore(self, record: bool = False) -> None:
        """params.yaml and the params stage's files as they were; record=True also records the params stage in
        dvc.lock (after a test that ran it through DVC or the flow)."""
        self.params_file.write_text(self.original)
        run_stage("params", self.params_file)
        if record:  # DVC resolves the run cache's paths against the working directory
            with contextlib.chdir(self.root), DvcPipeline(self.root) as dvc:
                dvc.record("params")

    def stale_stages(self) -> list[str]:
        with DvcPipeline(self.root) as dvc:
            return [name for name in PIPELINE_STAGES if not dvc.is_current(name)]


@pytest.fixture(scope="module")
def project(repro_project, tmp_path_factory):
    """This module's copy of conftest's demo project after its first `dvc repro` (dvc.lock is the one record both
    entry points read and write), and a Prefect server for the flow runs below."""
    with prefect_in_process(tmp_path_factory.mktemp("prefect") / "home") as api_url:
        root = repro_project
        (root / "prompts-copy.json").write_bytes((root / "user_prompt_library.json").read_bytes())
        yield Project(root), api_url


@pytest.mark.parametrize("key", sorted(set(TABLE) - set(NOT_CHANGED_HERE)))
def test_changing_a_key_reruns_exactly_the_stages_the_table_names(project, key):
    project, _ = project
    kind = TABLE[key]
    expected = list(kind.stages) if isinstance(kind, Computes) else ["publish"] if kind == PUBLISHES else []
    raw = read_raw_params(project.params_file)
    before = parse_params(raw)
    hash_before = nightly.params_hash(project.params_file)
    try:
        updates = {key: changed_value(key, _value(raw, before, key)), **COMPANIONS.get(key, {})}
        set_params(project.root, **updates)
        try:
            after = parse_params(read_raw_params(project.params_file))
        except ParamsError as e:
            raise AssertionError(f"the test's new value for {key} is invalid; fix EXAMPLES: {e}") from None
        assert _value(raw, after, key) != _value(raw, before, key)
        changed = run_stage("params", project.params_file)["changed"]
        assert changed == expected, f"{key}: the params stage rewrote the files of {changed}, the table says {expected}"
        stale = project.stale_stages()
        assert stale == expected, f"{key}: DVC (dvc repro and the flow) sees {stale} out of date, the table says {expected}"
        nightly_changed = nightly.params_hash(project.params_file) != hash_before
        assert nightly_changed == (kind != RUNS), f"{key}: the nightly comparison disagrees with the table ({kind})"
    finally:
        project.restore()
    assert project.stale_stages() == []


def _repro(root: Path) -> list[str]:
    out = run(["dvc", "repro"], root).stdout
    return [name for name in ["params", *PIPELINE_STAGES] if re.search(rf"Running stage '{name}'", out)]


def _flow_ran(root: Path) -> list[str]:
    from flows.train import flux2_lora

    state = flux2_lora(project_dir=str(root), return_state=True)
    return [name for name, result in state.result()["stages"].items() if result["ran"]]


def _published_metadata(root: Path) -> dict:
    from safetensors import safe_open

    path = layout_for(root, "outputs").publish_dir / "pytorch_lora_weights.safetensors"
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata())


# The three end-to-end cases run in this order on the shared project; each leaves params.yaml as it found it.

@pytest.mark.slow
def test_log_every_n_steps_reruns_nothing_that_computes(project):
    project, _ = project
    try:
        set_params(project.root, **{"train.log_every_n_steps": 7})
        assert _repro(project.root) == ["params"]
        set_params(project.root, **{"train.log_every_n_steps": 3})
        assert _flow_ran(project.root) == ["params"]
    finally:
        project.restore(record=True)
    assert project.stale_stages() == []


@pytest.mark.slow
def test_trigger_phrase_reruns_publish_only_under_dvc_and_the_flow(project):
    project, _ = project
    try:
        set_params(project.root, **{"publish.trigger_phrase": "ohwx style"})
        assert _repro(project.root) == ["params", "publish"]
        assert _published_metadata(project.root)["flux2lora.trigger_phrase"] == "ohwx style"
        set_params(project.root, **{"publish.trigger_phrase": "zkz style"})
        assert _flow_ran(project.root) == ["params", "publish"]
        assert _published_metadata(project.root)["flux2lora.trigger_phrase"] == "zkz style"
    finally:
        project.restore(record=True)


@pytest.mark.slow
def test_validation_prompt_edit_reencodes_that_prompt_and_revalidates_without_training(project):
    """Train is not re-run and its inputs stay byte-identical; publish follows validate because its samples image
    is the validation grid."""
    project, _ = project
    root = project.root
    layout = layout_for(root, "outputs")
    library_file = root / "user_prompt_library.json"
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    text_embeds = {p: p.read_bytes() for p in sorted(layout.text_embeds_dir.rglob("*")) if p.is_file()}
    lora = layout.lora_file.read_bytes()
    library = json.loads(library_file.read_text())
    name = sorted(library)[0]
    library[name] = library[name] + ", at dusk"
    library_file.write_text(json.dumps(library, indent=2))
    assert _repro(root) == ["encode-text", "validate", "publish"]
    encoded = json.loads((layout.prompt_embeds_dir / "index.json").read_text())
    assert encoded["prompt_texts"][name].endswith(", at dusk")
    assert {p: p.read_bytes() for p in sorted(layout.text_embeds_dir.rglob("*")) if p.is_file()} == text_embeds
    assert layout.lora_file.read_bytes() == lora, "the LoRA must not be retrained for a prompt edit"
    after = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    assert after["train"] == lock["train"] and after["encode-latents"] == lock["encode-latents"]


def test_check_params_refuses_a_typo_inside_tread_config():
    with pytest.raises(ParamsError, match=r"unknown key 'train\.tread_config\.routes\.0\.selection_ration'; "
                                          r"did you mean 'train\.tread_config\.routes\.0\.selection_ratio'"):
        parse_params({"train": {"tread_config": {"routes": [
            {"selection_ration": 0.5, "start_layer_idx": 0, "end_layer_idx": 1}]}}})
    with pytest.raises(ParamsError, match=r"unknown key 'train\.tread_config\.routez'; did you mean "
                                          r"'train\.tread_config\.routes'"):
        parse_params({"train": {"tread_config": {"routez": []}}})
    with pytest.raises(ParamsError, match=r"selection_ratio"):
        parse_params({"train": {"tread_config": {"routes": [
            {"selection_ratio": 1.5, "start_layer_idx": 0, "end_layer_idx": 1}]}}})


@pytest.mark.parametrize("where, key", [("prepare", "maximum_image_size"), ("prepare", "metadata_backend"),
                                        ("prepare", "cache_dir_vae"), ("dataset", "cache_dir"),
                                        ("parquet", "width_column"), ("parquet", "height_column")])
def test_check_params_refuses_every_key_without_an_effect(tmp_path, where, key):
    tree = {"prepare": {key: 1}}
    if where == "dataset":
        tree = {"prepare": {"datasets": [{"id": "t", "dataset_type": "text_embeds", key: "c"}]}}
    elif where == "parquet":
        tree = {"prepare": {"caption_strategy": "parquet", "parquet": {"path": "p.parquet", key: "w"}}}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(tree))
    proc = subprocess.run(["flux2lora", "check-params", "--params", str(path)], cwd=tmp_path, env=project_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert key in proc.stdout + proc.stderr and "has no effect" in proc.stdout + proc.stderr, proc.stderr


def test_the_train_fingerprint_follows_the_table(trained_project):
    """A checkpoint is resumed across every key that does not compute train (memory, speed, logging, processes,
    publishing, another stage's) and never across one that does."""
    from flux2lora.train.recipe import fingerprint

    raw = read_raw_params(trained_project / "params.yaml")
    base = parse_params(raw)
    layout = layout_for(trained_project, "outputs")
    reference = fingerprint(base, layout)
    for key, kind in sorted(TABLE.items()):
        if key in NOT_CHANGED_HERE:
            continue
        tree = json.loads(json.dumps(raw))
        for dotted, value in {key: changed_value(key, _value(raw, base, key)), **COMPANIONS.get(key, {})}.items():
            section, _, name = dotted.partition(".")
            if name:
                tree.setdefault(section, {})[name] = value
            else:
                tree[section] = value
        changed = fingerprint(parse_params(tree), layout) != reference
        assert changed == (isinstance(kind, Computes) and "train" in kind.stages), f"{key}: {kind}"
