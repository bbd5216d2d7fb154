"""The tiny FLUX.2 models: real diffusers layout, loaded and run by diffusers' own pipelines, fully offline."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from diffusers import Flux2KleinPipeline, Flux2Pipeline  # noqa: E402
from transformers import AutoProcessor, AutoTokenizer  # noqa: E402

from flux2lora.flavours import get_flavour  # noqa: E402
from flux2lora.tiny import make_tiny_model  # noqa: E402

TINY_FLAVOURS = ["tiny-klein-4b", "tiny-klein-9b", "tiny-dev"]
COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")


def _pipeline_class(flavour):
    return Flux2KleinPipeline if flavour.is_klein else Flux2Pipeline


def _hashes(folder: Path) -> dict[str, str]:
    """sha256 of every weight and tokenizer file, by path relative to the folder."""
    files = [*folder.rglob("*.safetensors"), *(folder / "tokenizer").iterdir()]
    return {str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(files)}


@pytest.fixture(scope="module", params=TINY_FLAVOURS)
def tiny_model(request, tmp_path_factory) -> tuple[Path, object]:
    """(folder, flavour) for each tiny flavour, built once per module."""
    flavour = get_flavour(request.param)
    return make_tiny_model(tmp_path_factory.mktemp(request.param) / "model", flavour.name, seed=0), flavour


@pytest.fixture(scope="module")
def loaded_pipe(tiny_model):
    folder, flavour = tiny_model
    pipe = _pipeline_class(flavour).from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe, flavour


def test_folder_has_the_diffusers_layout(tiny_model):
    folder, flavour = tiny_model
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == flavour.pipeline_class
    for name in COMPONENTS:
        assert name in index and (folder / name).is_dir(), name
    assert index["text_encoder"] == ["transformers", flavour.text_encoder_class]
    assert (folder / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    assert (folder / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    assert (folder / "text_encoder" / "model.safetensors").is_file()
    assert (folder / "tokenizer" / "tokenizer.json").is_file()
    assert (folder / "scheduler" / "scheduler_config.json").is_file()
    if flavour.is_klein:
        assert index["is_distilled"] is False  # the base repos: LoRAs are trained on the undistilled model
    assert json.loads((folder / "flux2lora_tiny.json").read_text()) == {"flavour": flavour.name, "seed": 0}
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert size < 5 * 2**20


def test_components_have_the_flavour_architecture(loaded_pipe):
    pipe, flavour = loaded_pipe
    config = pipe.transformer.config
    for key, value in flavour.full_transformer_config.items():
        got = config[key]
        assert (list(got) if isinstance(got, (list, tuple)) else got) == (
            list(value) if isinstance(value, (list, tuple)) else value
        ), key
    text_config = pipe.text_encoder.config.get_text_config()
    assert (text_config.hidden_size, text_config.num_hidden_layers) == (flavour.text_hidden_size,
                                                                        flavour.text_num_layers)
    assert type(pipe.text_encoder).__name__ == flavour.text_encoder_class
    # The real VAE geometry: /8 spatially, 32 channels, 2x2 patches -> the transformer's 128 input channels.
    assert pipe.vae_scale_factor == 8
    assert pipe.vae.config.latent_channels * 4 == config.in_channels == 128
    # Non-trivial latent normalisation statistics, so a missing (de)normalisation changes results.
    assert pipe.vae.bn.running_mean.abs().min() > 0
    assert not torch.allclose(pipe.vae.bn.running_var, torch.ones_like(pipe.vae.bn.running_var))
    assert (pipe.vae.bn.running_var > 0).all()
    scheduler = pipe.scheduler.config
    assert scheduler.use_dynamic_shifting and scheduler.shift == 3.0
    assert (scheduler.base_image_seq_len, scheduler.max_image_seq_len) == (256, 4096)
    assert (scheduler.base_shift, scheduler.max_shift) == (0.5, 1.15)


def test_diffusers_pipeline_generates_an_image(loaded_pipe):
    pipe, flavour = loaded_pipe
    calls = []
    hook = pipe.transformer.register_forward_hook(lambda *_: calls.append(1))
    try:
        extra = {} if flavour.is_klein else {"guidance_scale": 4.0}
        out = pipe(prompt="a red cube", height=64, width=64, num_inference_steps=2,
                   generator=torch.Generator().manual_seed(0), text_encoder_out_layers=flavour.stacked_layers,
                   **extra)
    finally:
        hook.remove()
    image = out.images[0]
    assert image.size == (64, 64)
    # klein runs its default classifier-free guidance (a conditional and an unconditional pass per step); dev has
    # distilled guidance in the transformer (one pass).
    assert len(calls) == (4 if flavour.is_klein else 2)


def test_encode_prompt_stacks_the_flavours_layers(loaded_pipe):
    pipe, flavour = loaded_pipe
    embeds, text_ids = pipe.encode_prompt("a red cube", text_encoder_out_layers=flavour.stacked_layers)
    assert embeds.shape == (1, 512, 3 * flavour.text_hidden_size) == (1, 512, 48)
    assert text_ids.shape == (1, 512, 4)


@pytest.mark.parametrize("name", ["tiny-klein-4b", "tiny-klein-9b"])
def test_klein_chat_template_matches_qwen3(name, tmp_path):
    folder = make_tiny_model(tmp_path / "model", name, seed=0)
    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True, enable_thinking=False)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    thinking = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                             add_generation_prompt=True)
    assert thinking == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer(text, padding="max_length", truncation=True, max_length=512)["input_ids"]
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert ids[-1] == tokenizer.pad_token_id == tokenizer.convert_tokens_to_ids("<|endoftext|>")


def test_dev_processor_renders_mistral_prompts_padded(tmp_path):
    folder = make_tiny_model(tmp_path / "model", "tiny-dev", seed=0)
    from diffusers.pipelines.flux2.pipeline_flux2 import format_input

    processor = AutoProcessor.from_pretrained(folder / "tokenizer")
    messages = format_input(prompts=["a red cube", "a [IMG] dog"], system_message="Be brief.")
    texts = processor.apply_chat_template(messages, tokenize=False)
    assert texts == ["<s>[SYSTEM_PROMPT]Be brief.[/SYSTEM_PROMPT][INST]a red cube[/INST]",
                     "<s>[SYSTEM_PROMPT]Be brief.[/SYSTEM_PROMPT][INST]a  dog[/INST]"]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=False, tokenize=True, return_dict=True,
                                           return_tensors="pt", padding="max_length", truncation=True,
                                           max_length=512)
    assert inputs["input_ids"].shape == inputs["attention_mask"].shape == (2, 512)
    tokens = processor.convert_ids_to_tokens(inputs["input_ids"][0, :2].tolist())
    assert tokens == ["<s>", "[SYSTEM_PROMPT]"]  # BOS once: written by the template, not added again
    assert inputs["input_ids"][0, -1] == processor.pad_token_id == processor.convert_tokens_to_ids("<pad>")


def test_same_seed_gives_identical_files_and_another_seed_different_weights(tiny_model, tmp_path):
    folder, flavour = tiny_model
    again = make_tiny_model(tmp_path / "again", flavour.name, seed=0)
    assert _hashes(again) == _hashes(folder)
    other = _hashes(make_tiny_model(tmp_path / "other", flavour.name, seed=1))
    weights = "transformer/diffusion_pytorch_model.safetensors"
    assert other[weights] != _hashes(folder)[weights]


def test_same_seed_is_identical_across_processes(tmp_path):
    # Another interpreter with another hash seed: catches anything that depends on set/dict order or process state.
    code = "import sys; from flux2lora.tiny import make_tiny_model; make_tiny_model(sys.argv[1], 'klein-4b', 3)"
    env = {**os.environ, "PYTHONHASHSEED": "12345", "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "child")], check=True, env=env, capture_output=True)
    here = make_tiny_model(tmp_path / "here", "klein-4b", 3)
    assert _hashes(tmp_path / "child") == _hashes(here)


def test_real_flavour_names_map_to_tiny_ones_and_leave_global_state_alone(tmp_path):
    torch.manual_seed(1234)
    rng_before = torch.get_rng_state()
    folder = make_tiny_model(tmp_path / "m", "klein-9b")
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert torch.get_default_dtype() == torch.float32
    assert json.loads((folder / "flux2lora_tiny.json").read_text())["flavour"] == "tiny-klein-9b"
    with pytest.raises(ValueError, match="unknown model flavour"):
        make_tiny_model(tmp_path / "bad", "klein-7b")
