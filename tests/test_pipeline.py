"""The six stages end to end on the tiny klein-4b: what a user gets from one pipeline run."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pytest
import torch
from diffusers import Flux2KleinPipeline
from safetensors import safe_open

from flux2lora.cache.store import TensorStore
from flux2lora.config import load_params
from flux2lora.latents import pack, target_ids, text_ids
from flux2lora.layout import layout_for
from flux2lora.models import load_transformer
from flux2lora.tracking import GRID_IMAGE_KEY, LOSS_METRIC


def _layout(root):
    return layout_for(root, load_params(root / "params.yaml").output_dir)


def _client(root):
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    return mlflow.tracking.MlflowClient()


def _run_id(root):
    return json.loads(_layout(root).run_file.read_text())["run_id"]


def test_lora_file_is_in_the_diffusers_format(trained_project):
    path = _layout(trained_project).lora_file
    with safe_open(str(path), framework="pt") as f:
        keys, metadata = list(f.keys()), f.metadata()
    assert keys and all(k.startswith("transformer.") for k in keys)
    assert any(k.endswith(".lora_A.weight") for k in keys) and any(k.endswith(".lora_B.weight") for k in keys)
    assert json.loads(metadata["lora_adapter_metadata"])["transformer.r"] == 8
    assert metadata["flux2lora.flavour"] == "tiny-klein-4b"
    assert metadata["flux2lora.steps"] == "30"


def test_lora_loads_in_diffusers_klein_pipeline_and_changes_the_image(trained_project):
    params = load_params(trained_project / "params.yaml")
    pipe = Flux2KleinPipeline.from_pretrained(params.model.model_path)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(prompt="sks style, a red circle", height=64, width=64, num_inference_steps=3,
                  text_encoder_out_layers=params.model.flavour.stacked_layers, output_type="np")
    base = pipe(generator=torch.Generator().manual_seed(0), **kwargs).images[0]
    again = pipe(generator=torch.Generator().manual_seed(0), **kwargs).images[0]
    np.testing.assert_array_equal(base, again)  # fixed seed: any difference below comes from the LoRA
    pipe.load_lora_weights(str(_layout(trained_project).lora_dir))
    with_lora = pipe(generator=torch.Generator().manual_seed(0), **kwargs).images[0]
    assert np.abs(with_lora - base).max() > 1e-3


def test_mlflow_run_has_params_tags_losses_images_and_the_lora(trained_project):
    client = _client(trained_project)
    run = client.get_run(_run_id(trained_project))
    assert run.data.params["train.learning_rate"] == "0.01"
    assert run.data.params["model.model_flavour"] == "tiny-klein-4b"
    assert run.data.tags["flavour"] == "tiny-klein-4b"
    assert run.data.tags["git_commit"] not in ("", None)
    assert "dataset_dvc_hash" in run.data.tags
    losses = client.get_metric_history(run.info.run_id, LOSS_METRIC)
    assert len(losses) >= 20
    for name in ("learning_rate", "grad_norm", "step_time_s"):
        assert len(client.get_metric_history(run.info.run_id, name)) == len(losses)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "lora")}
    assert "lora/pytorch_lora_weights.safetensors" in artifacts
    images = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    assert any(f"{GRID_IMAGE_KEY.replace('/', '~')}+step+30" in p for p in images), images
    assert "publish" in {a.path for a in client.list_artifacts(run.info.run_id)}


def test_logged_training_loss_falls(trained_project):
    history = _client(trained_project).get_metric_history(_run_id(trained_project), LOSS_METRIC)
    losses = [m.value for m in sorted(history, key=lambda m: m.step)]
    assert np.mean(losses[-10:]) < np.mean(losses[:10])


def test_trained_lora_lowers_the_loss_on_fixed_noise(trained_project):
    """The same noise, sigmas and data through the base transformer and with the trained LoRA: the LoRA fits
    the data better. Unlike the logged curve, this comparison has no sampling noise."""
    layout = _layout(trained_project)
    params = load_params(trained_project / "params.yaml")
    latent_index = json.loads((layout.latents_dir / "index.json").read_text())
    text_index = json.loads((layout.text_embeds_dir / "index.json").read_text())
    ids = sorted(latent_index["images"])
    x0 = torch.stack([TensorStore(layout.latents_dir).get(latent_index["images"][i])["latents"] for i in ids])
    emb = torch.stack([TensorStore(layout.text_embeds_dir).get(text_index["captions"][i])["prompt_embeds"]
                       for i in ids])
    g = torch.Generator().manual_seed(123)
    noise = torch.randn(x0.shape, generator=g)
    sigma = torch.rand(len(ids), generator=g) * 0.8 + 0.1
    noisy = (1 - sigma.view(-1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1) * noise

    def loss(model):
        with torch.no_grad():
            out = model(hidden_states=pack(noisy), encoder_hidden_states=emb, timestep=sigma, guidance=None,
                        img_ids=target_ids(noisy), txt_ids=text_ids(emb), return_dict=False)[0]
        return torch.nn.functional.mse_loss(out, pack(noise - x0)).item()

    model = load_transformer(params.model, torch.device("cpu"))
    base_loss = loss(model)
    model.load_lora_adapter(str(layout.lora_dir), weight_name=layout.lora_file.name, prefix="transformer")
    assert loss(model) < base_loss


def test_validation_renders_base_and_lora_images_and_a_grid(trained_project):
    out = _layout(trained_project).validation_dir
    index = json.loads((out / "index.json").read_text())
    assert (out / "grid.png").exists()
    assert set(index["prompts"]) == {"shape_subject", "study_subject"}
    assert index["prompts"]["shape_subject"].startswith("a photo of sks style")  # <subject> replaced
    for name in index["images"]:
        assert (out / name).exists()
    assert len(index["images"]) == 2 * 2  # 2 prompts x (base, lora)


def test_publish_folder_has_lora_model_card_and_samples(trained_project):
    out = _layout(trained_project).publish_dir
    assert {p.name for p in out.iterdir()} >= {"pytorch_lora_weights.safetensors", "README.md", "samples.png"}
    card = (out / "README.md").read_text()
    assert "base_model:" in card and "license: apache-2.0" in card and "sks style" in card
    assert "load_lora_weights" in card


def test_missing_inputs_name_the_stage_to_run(tmp_path):
    from helpers import make_project

    from flux2lora.stages import run_stage

    root = make_project(tmp_path / "p", git=False)
    with pytest.raises(FileNotFoundError, match="run the stage that writes it first"):
        run_stage("encode-latents", root / "params.yaml")
