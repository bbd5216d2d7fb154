"""Edit / reference training: references paired by file name, cached like targets, appended after the target
tokens with T = 10 + 10*i, and the LoRA then runs in the pipeline with `image=` references."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import Flux2KleinPipeline
from PIL import Image, ImageOps

import flux2lora.train.recipe as loop
from flux2lora.config import load_params
from flux2lora.stages import run_stage


def _edit_project(tmp_path, count=4, **params):
    from helpers import make_project

    root = make_project(tmp_path / "p", git=False, images=count,
                        **{"prepare.conditioning_data": ["data/refs"], "train.max_train_steps": 4,
                           "train.train_batch_size": 2, **params})
    refs = root / "data" / "refs"
    refs.mkdir()
    for image in sorted((root / "data" / "demo").glob("*.png")):
        # the "before" image of each edit pair: the target mirrored, saved under the same name (other extension)
        ImageOps.mirror(Image.open(image)).save(refs / f"{image.stem}.jpg")
    return root


def test_references_are_paired_by_name_cached_and_reach_the_transformer_after_the_target(tmp_path, monkeypatch):
    root = _edit_project(tmp_path)
    for stage in ("prepare", "encode-text", "encode-latents"):
        run_stage(stage, root / "params.yaml")
    rows = [json.loads(line) for line in (root / "outputs/prepare/images.jsonl").read_text().splitlines()]
    assert all(row["references"][0]["path"] == f"data/refs/{row['id'][:-4]}.jpg" for row in rows)
    index = json.loads((root / "outputs/latents/index.json").read_text())
    assert set(index["references"]) == set(index["images"])

    seen = []
    real_loader = loop.load_training_transformer

    def loader(*args, **kwargs):
        transformer = real_loader(*args, **kwargs)
        transformer.register_forward_pre_hook(
            lambda m, a, kw: seen.append((kw["hidden_states"].shape, kw["img_ids"].clone())), with_kwargs=True)
        transformer.register_forward_hook(lambda m, a, out: seen.append(("out", out[0].shape)))
        return transformer

    monkeypatch.setattr(loop, "load_training_transformer", loader)
    run_stage("train", root / "params.yaml")
    (shape, ids), (_, out_shape) = seen[0], seen[1]
    n_target = 4 * 4  # 64 px -> 4x4 tokens
    assert shape == (2, 2 * n_target, 128)  # target tokens, then the reference's
    assert ids[0, :n_target, 0].eq(0).all() and ids[0, n_target:, 0].eq(10).all()
    assert out_shape[1] == 2 * n_target  # the model predicts all tokens; the loss slices the target's


def test_edit_lora_runs_in_the_pipeline_with_image_references(tmp_path):
    root = _edit_project(tmp_path, **{"train.learning_rate": 0.02})
    for stage in ("prepare", "encode-text", "encode-latents", "train"):
        run_stage(stage, root / "params.yaml")
    params = load_params(root / "params.yaml")
    pipe = Flux2KleinPipeline.from_pretrained(params.model.model_path)
    pipe.set_progress_bar_config(disable=True)
    reference = Image.open(root / "data/refs/shape_000.jpg").convert("RGB")
    kwargs = dict(image=[reference], prompt="sks style, a red circle", height=64, width=64, num_inference_steps=2,
                  text_encoder_out_layers=params.model.flavour.stacked_layers, output_type="np")
    base = pipe(generator=torch.Generator().manual_seed(0), **kwargs).images[0]
    pipe.load_lora_weights(str(root / "outputs/lora"))
    edited = pipe(generator=torch.Generator().manual_seed(0), **kwargs).images[0]
    assert edited.shape == (64, 64, 3)
    assert np.abs(edited - base).max() > 1e-3


def test_a_missing_reference_is_an_error_naming_the_file(tmp_path):
    root = _edit_project(tmp_path)
    (root / "data/refs/shape_002.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"no reference for shape_002.png in .*data/refs"):
        run_stage("prepare", root / "params.yaml")


def test_loose_references_keep_their_aspect_ratio(tmp_path):
    root = _edit_project(tmp_path, **{"prepare.conditioning_type": "reference_loose"})
    wide = Image.new("RGB", (128, 64), (200, 30, 30))
    for ref in (root / "data/refs").glob("*.jpg"):
        wide.save(ref)
    for stage in ("prepare", "encode-latents"):
        run_stage(stage, root / "params.yaml")
    from flux2lora.cache.store import TensorStore

    index = json.loads((root / "outputs/latents/index.json").read_text())
    key = next(iter(index["references"].values()))[0]
    latents = TensorStore(root / "outputs/latents").get(key)["latents"]
    assert latents.shape == (128, 3, 6)  # 2:1 at the area of 64x64 -> 96x48 px -> 6x3 tokens


def test_without_conditioning_data_training_is_text_to_image(trained_project):
    index = json.loads((trained_project / "outputs/latents/index.json").read_text())
    assert index["references"] == {}
