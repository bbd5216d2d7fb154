"""DoRA (`train.use_dora`, peft's use_dora) end to end on tiny FLUX.2 models.

A DoRA module's weight is W' = m * (W + s B A) / ||W + s B A|| (norm per output row, m one magnitude per output
feature). The reference is peft's own layer: the effective weight change W' - W is read from the trained model's
peft layers and from the layers diffusers' `load_lora_weights` builds from the file, in fp64, and compared with
MAX_DELTA_DIFF. Resume after SIGKILL, bitwise: tests/test_lycoris_resume.py.
"""

from __future__ import annotations


import pytest
import torch
from diffusers import Flux2KleinPipeline, Flux2Pipeline
from helpers import make_project
from peft.tuners.lora import LoraLayer

from flux2lora.adapter_files import inspect_adapter
from flux2lora.config import ParamsError, load_params, parse_params
from flux2lora.stages import STAGES, run_stage

MAX_DELTA_DIFF = 1e-6
DORA = {"train.use_dora": True, "train.lora_rank": 4, "train.lora_alpha": 8, "train.learning_rate": 1e-2}


def dora_deltas(transformer) -> dict[str, torch.Tensor]:
    """{module: W' - W} (out, in) in fp64 for every DoRA layer of a peft-adapted transformer."""
    out = {}
    for name, module in transformer.named_modules():
        if isinstance(module, LoraLayer) and module.lora_magnitude_vector:
            adapter = next(iter(module.lora_A))
            weight = module.get_base_layer().weight.double()
            combined = weight + module.scaling[adapter] * (module.lora_B[adapter].weight.double()
                                                           @ module.lora_A[adapter].weight.double())
            magnitude = module.lora_magnitude_vector[adapter].weight.double()
            out[name] = (magnitude / torch.linalg.norm(combined, dim=1))[:, None] * combined - weight
    return out


def _encoded(tmp_path, name, flavour="klein-4b", **params):
    root = make_project(tmp_path / name, flavour=flavour, git=False, images=4, **{
        "train.max_train_steps": 6, "train.checkpointing_steps": 3, "train.train_batch_size": 2, **DORA, **params})
    for stage in ("prepare", "encode-text", "encode-latents"):
        run_stage(stage, root / "params.yaml")
    return root


@pytest.mark.parametrize("flavour", ["klein-4b", "dev"])
def test_the_diffusers_file_gives_the_trained_dora_weights(tmp_path, flavour):
    """Train in process (the train stage's own recipe), keep the trained transformer, then load the written file
    with the flavour pipeline's load_lora_weights: every module's W' - W agrees."""
    from flux2lora.train.recipe import LoRATrainingRecipe, RunLog

    root = _encoded(tmp_path, "p", flavour)
    params = load_params(root / "params.yaml")
    recipe = LoRATrainingRecipe(params, root)
    recipe.setup()
    recipe.resume()
    run_log = RunLog(params, root, True)
    run_log.start(recipe.run_id, recipe.layout, len(recipe.targets), recipe.start_step)
    recipe.train(run_log)
    recipe.save(run_log)
    run_log.close(False)
    trained = dora_deltas(recipe.transformer)
    assert len(trained) == len(recipe.targets) and max(d.abs().max().item() for d in trained.values()) > 1e-4

    lora_file = recipe.layout.lora_file
    report = inspect_adapter(lora_file)
    assert (report.kind, report.layout, len(report.modules)) == ("dora", "diffusers", len(recipe.targets))
    pipe_cls = Flux2KleinPipeline if params.model.flavour.is_klein else Flux2Pipeline
    pipe = pipe_cls.from_pretrained(params.model.model_path, torch_dtype=recipe.transformer.dtype)
    pipe.load_lora_weights(str(lora_file.parent), weight_name=lora_file.name)
    loaded = dora_deltas(pipe.transformer)
    assert loaded.keys() == trained.keys()
    worst = max((loaded[k] - trained[k]).abs().max().item() for k in trained)
    assert worst <= MAX_DELTA_DIFF, worst


@pytest.fixture(scope="module")
def dora_project(tmp_path_factory):
    """A tiny klein-9b DoRA project through all six stages, validated during training too (step 2)."""
    root = make_project(tmp_path_factory.mktemp("dora") / "project", flavour="klein-9b", git=False, images=4, **{
        "train.max_train_steps": 3, "train.checkpointing_steps": 100, "validate.validation_num_inference_steps": 2,
        "validate.validation_step_interval": 2, **DORA})
    for name in STAGES:
        run_stage(name, root / "params.yaml")
    return root


def test_the_pipeline_validates_and_publishes_a_dora_adapter(dora_project):
    """validate renders with it (diffusers loads it), as does validation during training (the adapter disabled for
    the base images); publish writes the diffusers file only, and the card says why there is no ComfyUI file."""
    publish = dora_project / "outputs/publish"
    assert (publish / "pytorch_lora_weights.safetensors").exists()
    assert not list(publish.glob("*_bfl.safetensors"))
    card = (publish / "README.md").read_text()
    assert "DoRA adapter" in card and "lora_magnitude_vector" in card
    assert "ComfyUI's LoRA loaders" not in card and "Use it in ComfyUI" not in card
    assert (dora_project / "outputs/validation/grid.png").exists()
    assert inspect_adapter(publish / "pytorch_lora_weights.safetensors").kind == "dora"


@pytest.mark.parametrize("train,match", [
    ({"use_dora": True, "base_model_precision": "int8-quanto"}, "use_dora with base_model_precision int8-quanto"),
    ({"use_dora": True, "enable_group_offload": True}, "use_dora with enable_group_offload"),
])
def test_unsupported_dora_combinations_are_refused(train, match):
    with pytest.raises(ParamsError, match=match):
        parse_params({"train": train})
