"""Our prompt encoder equals the FLUX.2 pipelines' `encode_prompt`, with the encoder cut after its deepest layer."""

from __future__ import annotations

import pytest
import torch

from flux2lora.config import ModelParams
from flux2lora.models import load_text_pipeline
from flux2lora.text_encoding import PromptEncoder
from flux2lora.tiny import make_tiny_model

PROMPTS = ["sks style, a red circle on a blue background", "a photo [IMG] of a dog, on the beach", ""]


@pytest.fixture(scope="module", params=["klein-4b", "klein-9b", "dev"])
def tiny(request, tmp_path_factory) -> ModelParams:
    folder = make_tiny_model(tmp_path_factory.mktemp(request.param) / "model", request.param)
    return ModelParams(model_flavour=f"tiny-{request.param}", pretrained_model_name_or_path=str(folder),
                       base_model_default_dtype="fp32")


@pytest.fixture(scope="module")
def reference(tiny) -> torch.Tensor:
    """What diffusers' Flux2KleinPipeline / Flux2Pipeline.encode_prompt computes (fp32)."""
    pipe = load_text_pipeline(tiny, torch.device("cpu"))
    embeds, _ = pipe.encode_prompt(PROMPTS, device=torch.device("cpu"), max_sequence_length=512,
                                   text_encoder_out_layers=tiny.flavour.stacked_layers)
    return embeds


@pytest.mark.parametrize("truncate", [True, False], ids=["truncated", "full"])
def test_prompt_embeddings_equal_the_pipelines_encode_prompt(tiny, reference, truncate):
    encoder = PromptEncoder.from_pretrained(tiny, max_sequence_length=512, truncate=truncate)
    embeds = encoder.encode(PROMPTS)
    assert embeds.shape == reference.shape == (3, 512, 3 * 16)
    assert (embeds - reference).abs().max().item() <= 1e-6


def test_truncated_encoder_loads_only_the_layers_up_to_the_deepest_stacked_one(tiny):
    full = PromptEncoder.from_pretrained(tiny, truncate=False)
    cut = PromptEncoder.from_pretrained(tiny, truncate=True)
    assert max(tiny.flavour.stacked_layers) == 3
    assert (full.num_loaded_layers, cut.num_loaded_layers) == (4, 3)
    assert cut.parameter_bytes() < full.parameter_bytes()


def test_custom_layers_and_length_are_honoured(tiny, reference):
    encoder = PromptEncoder.from_pretrained(tiny, layers=(2,), max_sequence_length=64)
    embeds = encoder.encode(PROMPTS[:1])
    assert embeds.shape == (1, 64, 16)
    assert encoder.num_loaded_layers == 2


def test_int8_quanto_text_encoder_stays_close_to_full_precision(tmp_path):
    folder = make_tiny_model(tmp_path / "model", "klein-4b")
    model = ModelParams(model_flavour="tiny-klein-4b", pretrained_model_name_or_path=str(folder),
                        base_model_default_dtype="fp32")
    reference = PromptEncoder.from_pretrained(model).encode(PROMPTS)
    int8 = PromptEncoder.from_pretrained(model, precision="int8-quanto")
    from optimum.quanto import QLinear

    assert any(isinstance(m, QLinear) for m in int8.model.modules())
    embeds = int8.encode(PROMPTS)
    assert embeds.shape == reference.shape
    rel = ((embeds - reference).norm() / reference.norm()).item()
    assert 0 < rel < 0.1, rel


def test_too_deep_layers_are_a_clear_error(tiny):
    with pytest.raises(ValueError, match="has only 4 layers"):
        PromptEncoder.from_pretrained(tiny, layers=(9, 18, 27))
