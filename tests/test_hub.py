"""Publishing to the Hugging Face Hub: repo created or reused, LoRA files, samples and a model card uploaded.

The Hub is unreachable from the test machine (no network, HF_HUB_OFFLINE=1), so these tests stop at the client
boundary: `huggingface_hub.HfApi` is replaced by a mock that records its calls, and the files it was asked to
upload are read at the moment of the call. What crosses that boundary is exactly what a real push would send.
"""

from __future__ import annotations

import fnmatch
import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import mlflow
import pytest
import yaml
from helpers import make_project, set_params

from flux2lora.publish.hub import HUB_FILES, HUB_REPLACED, push_to_hub
from flux2lora.publish.model_card import model_card
from flux2lora.stages import run_stage

REPO_ID = "someone/flux2-klein-shapes"
TOKEN = "hf_test_secret_token_do_not_leak_0123456789"


@dataclass
class HubPush:
    root: Path
    api: mock.MagicMock
    hf_api_class: mock.MagicMock
    uploaded: dict[str, bytes] = field(default_factory=dict)  # what upload_folder would send, read at call time
    log: str = ""


@pytest.fixture(scope="module")
def pushed(tmp_path_factory) -> HubPush:
    """A tiny klein-4b project through all stages with `publish.hub_repo_id` set and a token in the environment;
    the publish stage runs against a mock HfApi."""
    root = make_project(tmp_path_factory.mktemp("hub") / "project", git=False, **{
        "train.max_train_steps": 2, "train.checkpointing_steps": 100, "validate.validation_num_inference_steps": 1})
    for name in ("prepare", "encode-text", "encode-latents", "train", "validate"):
        run_stage(name, root / "params.yaml")
    set_params(root, **{"publish.hub_repo_id": REPO_ID})

    api = mock.MagicMock(name="HfApi()")
    api.create_repo.return_value = f"https://huggingface.co/{REPO_ID}"
    push = HubPush(root=root, api=api, hf_api_class=mock.MagicMock(return_value=api))

    def upload_folder(*, folder_path, allow_patterns, **kwargs):
        for path in Path(folder_path).iterdir():
            if any(fnmatch.fnmatch(path.name, pattern) for pattern in allow_patterns):
                push.uploaded[path.name] = path.read_bytes()
        return mock.MagicMock(commit_url=f"https://huggingface.co/{REPO_ID}/commit/abc")

    api.upload_folder.side_effect = upload_folder
    logs = io.StringIO()
    handler = logging.StreamHandler(logs)
    logging.getLogger().addHandler(handler)
    previous_level = logging.getLogger().level
    logging.getLogger().setLevel(logging.DEBUG)
    try:
        with pytest.MonkeyPatch.context() as env, mock.patch("huggingface_hub.HfApi", push.hf_api_class):
            env.setenv("HF_TOKEN", TOKEN)
            run_stage("publish", root / "params.yaml")
    finally:
        logging.getLogger().removeHandler(handler)
        logging.getLogger().setLevel(previous_level)
    push.log = logs.getvalue()
    return push


def test_repo_is_created_or_reused_and_lora_files_samples_and_card_are_uploaded(pushed):
    pushed.hf_api_class.assert_called_once_with()  # no token argument: huggingface_hub finds it itself
    pushed.api.create_repo.assert_called_once_with(repo_id=REPO_ID, repo_type="model", private=True, exist_ok=True)
    assert pushed.api.upload_folder.call_count == 1
    kwargs = pushed.api.upload_folder.call_args.kwargs
    assert kwargs["repo_id"] == REPO_ID and kwargs["repo_type"] == "model"
    run_name = json.loads((pushed.root / "outputs/train/mlflow_run.json").read_text())["run_name"]
    assert set(pushed.uploaded) == {"pytorch_lora_weights.safetensors", f"{run_name}_bfl.safetensors",
                                    "samples.png", "README.md"}  # not params.json: it names local paths


def test_model_card_names_base_model_flavour_trigger_loading_code_and_licence(pushed):
    card = pushed.uploaded["README.md"].decode()
    _, front, body = card.split("---\n", 2)
    meta = yaml.safe_load(front)  # the front matter the Hub reads
    assert meta["base_model"] == "models/tiny-klein-4b"  # as params.yaml names it, wherever the project lies
    assert meta["license"] == "apache-2.0" and meta["library_name"] == "diffusers"
    assert meta["instance_prompt"] == "sks style" and "lora" in meta["tags"]
    assert "tiny-klein-4b" in body and "sks style" in body
    assert "from diffusers import Flux2KleinPipeline" in body
    assert f'pipe.load_lora_weights("{REPO_ID}", weight_name="pytorch_lora_weights.safetensors"' in body
    assert "_bfl.safetensors" in body and "ComfyUI" in body
    assert "Apache-2.0" in body and "![validation samples" in body


def test_the_hub_location_is_recorded_in_mlflow_and_the_registry(pushed):
    mlflow.set_tracking_uri(f"sqlite:///{pushed.root / 'mlflow.db'}")
    client = mlflow.tracking.MlflowClient()
    result = json.loads((pushed.root / "outputs" / "publish.json").read_text())
    run_id = json.loads((pushed.root / "outputs/train/mlflow_run.json").read_text())["run_id"]
    assert result["hub"] == f"https://huggingface.co/{REPO_ID}"
    assert client.get_run(run_id).data.tags["published_hub"] == result["hub"]
    version = client.get_model_version(result["registered_model"]["name"], result["registered_model"]["version"])
    assert version.tags["hub_url"] == result["hub"]


def test_the_token_is_in_no_file_card_log_or_mlflow_record(pushed):
    for name, data in pushed.uploaded.items():
        assert TOKEN.encode() not in data, name
    for path in (pushed.root / "outputs").rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path
    assert f"hub: {REPO_ID} updated" in pushed.log and TOKEN not in pushed.log
    mlflow.set_tracking_uri(f"sqlite:///{pushed.root / 'mlflow.db'}")
    client = mlflow.tracking.MlflowClient()
    run_id = json.loads((pushed.root / "outputs/train/mlflow_run.json").read_text())["run_id"]
    run = client.get_run(run_id)
    assert TOKEN not in json.dumps({**run.data.params, **run.data.tags})
    for version in client.search_model_versions("name='flux2-lora'"):
        assert TOKEN not in json.dumps(version.tags)
    for call in pushed.api.mock_calls + pushed.hf_api_class.mock_calls:
        assert TOKEN not in repr(call)


def test_push_to_an_existing_public_repo_keeps_using_it(tmp_path):
    api = mock.MagicMock()
    api.create_repo.return_value = "https://huggingface.co/org/existing"
    (tmp_path / "README.md").write_text("card")
    result = push_to_hub(tmp_path, "org/existing", private=False, api=api)
    api.create_repo.assert_called_once_with(repo_id="org/existing", repo_type="model", private=False, exist_ok=True)
    assert api.upload_folder.call_args.kwargs["allow_patterns"] == HUB_FILES
    # a previous run's files (another `<run-name>_bfl.safetensors`) are replaced, not left beside the new LoRA
    assert api.upload_folder.call_args.kwargs["delete_patterns"] == HUB_REPLACED
    assert result["url"] == "https://huggingface.co/org/existing"


@pytest.mark.parametrize("licence, name", [("flux-non-commercial-license", "flux-non-commercial-license"),
                                           ("flux-dev-non-commercial-license", "flux-dev-non-commercial-license")])
def test_non_commercial_base_models_say_so_in_the_card(licence, name):
    card = model_card(base_model="black-forest-labs/FLUX.2-dev", flavour="dev", pipeline_class="Flux2Pipeline",
                      licence=licence, trigger_phrase="ohwx: a cat", rank=16, alpha=16, steps=100, final_loss=0.1,
                      dataset_hash="abc", run_id="r", grid_file=None,
                      base_model_url="https://huggingface.co/black-forest-labs/FLUX.2-dev")
    meta = yaml.safe_load(card.split("---\n", 2)[1])
    assert (meta["license"], meta["license_name"]) == ("other", name)
    assert meta["license_link"] == "https://huggingface.co/black-forest-labs/FLUX.2-dev"
    assert meta["instance_prompt"] == "ohwx: a cat"  # quoted where YAML needs it
    assert "non-commercial use only" in card and "from diffusers import Flux2Pipeline" in card
