"""FLUX.2 conditioning matches the reference pipelines: latents, position ids, guidance, timesteps."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import flux2lora.train.recipe as loop
from flux2lora.train.step import sample_sigmas
from flux2lora.cache.latents import preprocess
from flux2lora.config import ModelParams, TrainParams
from flux2lora.latents import decode_latents, encode_pixels, reference_ids, target_ids, text_ids
from flux2lora.models import load_generation_pipeline, load_vae
from flux2lora.stages import run_stage
from flux2lora.tiny import make_tiny_model


def _image(width=80, height=64) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("flavour", ["klein-4b", "dev"])
def test_cached_latents_equal_what_the_pipeline_computes_for_the_same_image(tmp_path, flavour):
    folder = make_tiny_model(tmp_path / "m", flavour)
    model = ModelParams(model_flavour=f"tiny-{flavour}", pretrained_model_name_or_path=str(folder),
                        base_model_default_dtype="fp32")
    pipe = load_generation_pipeline(model, torch.device("cpu"))
    ours = encode_pixels(load_vae(model, torch.device("cpu")), preprocess(_image(), 64, 64))
    theirs = pipe._encode_vae_image(pipe.image_processor.preprocess(_image(), height=64, width=64,
                                                                    resize_mode="crop"), generator=None)
    assert ours.shape == (1, 128, 4, 4)
    assert (ours - theirs).abs().max().item() <= 1e-6


def test_decoding_inverts_the_normalisation(tmp_path):
    folder = make_tiny_model(tmp_path / "m", "klein-4b")
    model = ModelParams(model_flavour="tiny-klein-4b", pretrained_model_name_or_path=str(folder),
                        base_model_default_dtype="fp32")
    vae = load_vae(model, torch.device("cpu"))
    latents = encode_pixels(vae, preprocess(_image(), 64, 64))
    mean, var = vae.bn.running_mean, vae.bn.running_var
    assert not torch.allclose(mean, torch.zeros_like(mean)) and not torch.allclose(var, torch.ones_like(var))
    pixels = decode_latents(vae, latents)
    assert pixels.shape == (1, 3, 64, 64)


def test_position_ids_text_target_and_references():
    emb = torch.zeros(1, 5, 8)
    lat = torch.zeros(2, 128, 2, 3)
    assert text_ids(emb)[0].tolist() == [[0, 0, 0, l] for l in range(5)]
    ids = target_ids(lat)
    assert ids.shape == (2, 6, 4) and ids[0, 4].tolist() == [0, 1, 1, 0]
    refs = reference_ids([torch.zeros(1, 128, 1, 2), torch.zeros(1, 128, 2, 1)])
    assert refs[0, :, 0].tolist() == [10, 10, 20, 20]  # T = 10 + 10*i for the i-th reference


def test_sigma_sampling_applies_the_shift():
    g = torch.Generator().manual_seed(0)
    uniform = sample_sigmas(TrainParams(weighting_scheme="uniform", timestep_shift=1.0), 4000, g)
    shifted = sample_sigmas(TrainParams(weighting_scheme="uniform", timestep_shift=3.0), 4000,
                                 torch.Generator().manual_seed(0))
    assert 0.45 < uniform.mean() < 0.55
    s = 3.0
    np.testing.assert_allclose(shifted, (s * uniform / (1 + (s - 1) * uniform)).clamp(1e-5, 1), rtol=1e-6)
    logit = sample_sigmas(TrainParams(weighting_scheme="logit_normal", timestep_shift=1.0), 4000,
                               torch.Generator().manual_seed(0))
    assert logit.std() < uniform.std()  # logit-normal concentrates mass in the middle


def _guidance_seen_by_the_embedder(monkeypatch) -> list[torch.Tensor]:
    """Record the guidance tensor that reaches the transformer's guidance embedder during training."""
    seen: list[torch.Tensor] = []
    real_loader = loop.load_training_transformer

    def loader(*args, **kwargs):
        transformer = real_loader(*args, **kwargs)

        def hook(_module, inputs):
            _timestep, guidance = inputs
            seen.append(None if guidance is None else (guidance / 1000).detach().clone())

        transformer.time_guidance_embed.register_forward_pre_hook(hook)
        return transformer

    monkeypatch.setattr(loop, "load_training_transformer", loader)
    return seen


def _encoded_project(tmp_path, flavour, **params):
    from helpers import make_project

    # the evaluation loss off: these tests record every transformer call, and its fixed-noise forwards are not training
    root = make_project(tmp_path / "p", flavour=flavour, git=False, images=4,
                        **{"train.max_train_steps": 3, "train.train_batch_size": 2,
                           "validate.eval_every_n_steps": 0, **params})
    for stage in ("prepare", "encode-text", "encode-latents"):
        run_stage(stage, root / "params.yaml")
    return root


def test_dev_trains_with_the_constant_guidance_value(tmp_path, monkeypatch):
    root = _encoded_project(tmp_path, "dev", **{"train.flux_guidance_mode": "constant",
                                                 "train.flux_guidance_value": 3.5})
    seen = _guidance_seen_by_the_embedder(monkeypatch)
    run_stage("train", root / "params.yaml")
    assert len(seen) == 3
    assert all(torch.allclose(g, torch.full((2,), 3.5)) for g in seen)


def test_dev_draws_random_range_guidance_per_sample(tmp_path, monkeypatch):
    root = _encoded_project(tmp_path, "dev", **{"train.flux_guidance_mode": "random-range",
                                                 "train.flux_guidance_min": 2.0, "train.flux_guidance_max": 6.0})
    seen = _guidance_seen_by_the_embedder(monkeypatch)
    run_stage("train", root / "params.yaml")
    values = torch.cat(seen)
    assert len(values) == 6 and values.min() >= 2.0 and values.max() <= 6.0
    assert len(set(values.tolist())) == 6  # drawn per sample, not one constant


def test_klein_warns_once_that_guidance_options_are_ignored(tmp_path, monkeypatch):
    root = _encoded_project(tmp_path, "klein-4b", **{"train.flux_guidance_mode": "random-range"})
    seen = _guidance_seen_by_the_embedder(monkeypatch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_stage("train", root / "params.yaml")
    messages = [str(w.message) for w in caught if "no guidance embedder" in str(w.message)]
    assert len(messages) == 1 and "flux_guidance_mode" in messages[0]
    assert seen and all(g is None for g in seen)


def test_caption_dropout_trains_on_the_empty_prompt(tmp_path, monkeypatch):
    import json

    root = _encoded_project(tmp_path, "klein-4b", **{"train.caption_dropout_probability": 1.0})
    text_index = json.loads((root / "outputs/text_embeds/index.json").read_text())
    from flux2lora.cache.store import TensorStore

    empty = TensorStore(root / "outputs/text_embeds").get(text_index["empty"])["prompt_embeds"]
    seen = []
    real_loader = loop.load_training_transformer

    def loader(*args, **kwargs):
        transformer = real_loader(*args, **kwargs)
        transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["encoder_hidden_states"].clone()),
                                              with_kwargs=True)
        return transformer

    monkeypatch.setattr(loop, "load_training_transformer", loader)
    run_stage("train", root / "params.yaml")
    assert seen and all(torch.equal(batch, empty.expand_as(batch)) for batch in seen)
