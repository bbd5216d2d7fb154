"""`flux2lora generate`: one image from a prompt with a LoRA, on any flavour, the base model read from the LoRA."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from flux2lora.cli import app
from flux2lora.config import load_params
from flux2lora.generate import generate
from flux2lora.layout import layout_for
from flux2lora.tiny import make_tiny_model

SMALL = dict(width=64, height=64, num_inference_steps=2, seed=0)
PROMPT = "sks style, a red circle on a blue background"


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float64)


@pytest.fixture(scope="module")
def dev_lora(tmp_path_factory) -> Path:
    """A tiny dev model and a LoRA for it written by our own writer (random, non-zero B: no training needed to
    show that generate loads it); its metadata names the base model, as the train stage's does."""
    from diffusers import Flux2Pipeline, Flux2Transformer2DModel

    from flux2lora.train.lora import add_lora, save_diffusers_lora, target_modules

    folder = tmp_path_factory.mktemp("dev-generate")
    model = make_tiny_model(folder / "tiny-dev", flavour="dev")
    transformer = Flux2Transformer2DModel.from_pretrained(model, subfolder="transformer")
    add_lora(transformer, rank=4, alpha=4, dropout=0.0, targets=target_modules(transformer, "attention"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.5)
    return save_diffusers_lora(transformer, Flux2Pipeline, folder / "lora",
                               {"base_model": str(model), "revision": "main", "flavour": "tiny-dev"})


@pytest.fixture(params=["klein-4b", "dev"])
def lora_file(request) -> Path:
    if request.param == "dev":
        return request.getfixturevalue("dev_lora")
    return _layout(request.getfixturevalue("trained_project")).lora_file


def test_image_with_the_lora_differs_from_the_base_models(lora_file):
    """Only the LoRA file and a prompt: base model and flavour come from the file's metadata."""
    with_lora = generate(PROMPT, lora_file, **SMALL)
    base = generate(PROMPT, None, model_path=_base_model(lora_file), flavour=_flavour(lora_file), **SMALL)
    assert with_lora.size == base.size == (64, 64)
    assert np.abs(pixels(with_lora) - pixels(base)).max() > 2


def test_scale_zero_gives_the_base_models_image_and_seeds_are_reproducible(trained_project):
    lora = _layout(trained_project).lora_file
    base = generate(PROMPT, None, model_path=_base_model(lora), flavour=_flavour(lora), **SMALL)
    off = generate(PROMPT, lora, scale=0.0, **SMALL)
    assert np.abs(pixels(off) - pixels(base)).max() <= 1
    again = generate(PROMPT, lora, scale=0.8, **SMALL)
    assert np.array_equal(pixels(again), pixels(generate(PROMPT, lora, scale=0.8, **SMALL)))
    assert not np.array_equal(pixels(again), pixels(generate(PROMPT, lora, scale=0.8, **{**SMALL, "seed": 1})))


def test_the_bfl_file_generates_the_same_image(trained_project):
    publish_dir = _layout(trained_project).publish_dir
    diffusers_image = generate(PROMPT, publish_dir / "pytorch_lora_weights.safetensors", **SMALL)
    bfl_image = generate(PROMPT, next(publish_dir.glob("*_bfl.safetensors")), **SMALL)
    assert np.abs(pixels(bfl_image) - pixels(diffusers_image)).max() <= 1


def test_command_writes_the_image(trained_project, tmp_path):
    lora = _layout(trained_project).lora_file
    out = tmp_path / "out" / "try.png"
    result = CliRunner().invoke(app, ["generate", "--lora", str(lora), "--prompt", PROMPT, "--scale", "0.8",
                                      "--seed", "3", "--out", str(out), "--width", "64", "--height", "48",
                                      "--steps", "2", "--negative-prompt", "blurry"])
    assert result.exit_code == 0, result.output
    assert Image.open(out).size == (64, 48)


def test_a_lora_without_metadata_needs_model_and_flavour(tmp_path):
    from safetensors.torch import save_file

    bare = tmp_path / "other_trainer.safetensors"
    save_file({"transformer.x.lora_A.weight": torch.zeros(1, 1)}, str(bare))
    result = CliRunner().invoke(app, ["generate", "--lora", str(bare), "--prompt", "x"])
    assert result.exit_code == 2
    assert "--model" in result.output and "--flavour" in result.output


def _layout(root: Path):
    return layout_for(root, load_params(root / "params.yaml").output_dir)


def _metadata(lora: Path) -> dict:
    from flux2lora.train.lora import read_lora_metadata

    return read_lora_metadata(lora)


def _base_model(lora: Path) -> str:
    """The metadata's base model (a project-relative folder for local ones) as generate resolves it."""
    from flux2lora.generate import base_model_of

    return base_model_of(lora).path


def _flavour(lora: Path) -> str:
    return _metadata(lora)["flux2lora.flavour"]
