"""Memory options of the training engine change what they should, and a training step still runs with them."""

from __future__ import annotations

import pytest
import torch

from flux2lora.config import ModelParams
from flux2lora.models import load_training_transformer, parameter_bytes
from flux2lora.stages import run_stage
from flux2lora.tiny import make_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> ModelParams:
    folder = make_tiny_model(tmp_path_factory.mktemp("m") / "model", "klein-4b")
    return ModelParams(model_flavour="tiny-klein-4b", pretrained_model_name_or_path=str(folder),
                       base_model_default_dtype="fp32")


@pytest.mark.parametrize("precision,at_most", [("int8-quanto", 0.5), ("int4-quanto", 0.4)])
def test_quantized_base_shrinks_the_transformers_parameter_bytes(tiny, precision, at_most):
    def block_bytes(model):
        return parameter_bytes(model.transformer_blocks) + parameter_bytes(model.single_transformer_blocks)

    plain = load_training_transformer(tiny, torch.device("cpu"))
    quantized = load_training_transformer(tiny, torch.device("cpu"), precision, quantize_via="cpu")
    from optimum.quanto import QLinear

    assert isinstance(quantized.transformer_blocks[0].attn.to_q, QLinear)
    assert not isinstance(quantized.proj_out, QLinear)  # only the blocks are quantized
    # fp32 block weights -> int8 (+ scales) or int4 (+ scales and shifts); the whole model shrinks with them
    assert block_bytes(quantized) < at_most * block_bytes(plain)
    assert parameter_bytes(quantized) < parameter_bytes(plain)


@pytest.mark.parametrize("precision", ["int8-quanto", "int4-quanto"])
def test_training_steps_run_on_a_quantized_base(tmp_path, precision):
    from helpers import make_project

    root = make_project(tmp_path / "p", git=False, images=4,
                        **{"train.base_model_precision": precision, "train.quantize_via": "cpu",
                           "train.max_train_steps": 3, "train.train_batch_size": 2})
    for stage in ("prepare", "encode-text", "encode-latents"):
        run_stage(stage, root / "params.yaml")
    summary = run_stage("train", root / "params.yaml")
    assert summary["steps"] == 3 and torch.isfinite(torch.tensor(summary["final_loss"]))


def test_gradient_checkpointing_gives_the_same_lora(tmp_path):
    """Checkpointing trades memory for recompute; the computed LoRA must not change."""
    from helpers import make_project
    from safetensors.torch import load_file

    loras = []
    for checkpointing in (False, True):
        root = make_project(tmp_path / str(checkpointing), git=False, images=4,
                            **{"train.gradient_checkpointing": checkpointing, "train.max_train_steps": 3,
                               "train.train_batch_size": 2})
        for stage in ("prepare", "encode-text", "encode-latents", "train"):
            run_stage(stage, root / "params.yaml")
        loras.append(load_file(str(root / "outputs/lora/pytorch_lora_weights.safetensors")))
    assert all((loras[0][k] - loras[1][k]).abs().max() <= 1e-6 for k in loras[0])
