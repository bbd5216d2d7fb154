"""Custom LoRA targets (`train.lora_target_modules`) and the `diffusers-example` preset.

The real-size module lists come from diffusers' Flux2Transformer2DModel built from each flavour's config on the meta
device (no weights). The reference for `diffusers-example` is peft's own target matching applied to the default
`target_modules` of diffusers' FLUX.2 LoRA examples (examples/dreambooth/train_dreambooth_lora_flux2.py: dev, 48
single blocks; train_dreambooth_lora_flux2_klein.py: klein, 24), rewritten here from their documented values.
"""

from __future__ import annotations

import pytest
import torch
import yaml
from diffusers import Flux2Transformer2DModel
from peft import LoraConfig
from peft.tuners.tuners_utils import check_target_module_exists
from safetensors.torch import load_file

from flux2lora.config import ParamsError, parse_params
from flux2lora.flavours import get_flavour
from flux2lora.train.lora import flavour_modules, resolve_target_patterns, target_modules

# The examples' default targets: q/k/v/out of attention by peft suffix, the single blocks' fused projection, and
# each single block's attn.to_out by full path, for as many single blocks as the example's model has.
EXAMPLE_SINGLE_BLOCKS = {"dev": 48, "klein-9b": 24, "klein-4b": 24}  # the klein script lists 24 for both kleins


def _example_targets(flavour: str) -> list[str]:
    return ["to_k", "to_q", "to_v", "to_out.0", "to_qkv_mlp_proj",
            *[f"single_transformer_blocks.{i}.attn.to_out" for i in range(EXAMPLE_SINGLE_BLOCKS[flavour])]]


@pytest.mark.parametrize("flavour", ["klein-4b", "klein-9b", "dev"])
def test_diffusers_example_preset_selects_exactly_the_examples_modules_at_real_size(flavour):
    with torch.device("meta"):
        model = Flux2Transformer2DModel(**get_flavour(flavour).full_transformer_config)
    config = LoraConfig(target_modules=_example_targets(flavour))
    example = {name for name, _ in model.named_modules() if name and check_target_module_exists(config, name)}
    ours = target_modules(model, "diffusers-example")
    assert len(ours) == len(set(ours))
    assert set(ours) == example
    cfg = get_flavour(flavour).transformer_config
    assert len(ours) == 4 * cfg["num_layers"] + 2 * cfg["num_single_layers"]


def test_flavour_modules_are_the_real_size_models():
    modules = flavour_modules("dev")
    assert "single_transformer_blocks.47.attn.to_out" in modules and modules["single_transformer_blocks.47.attn.to_out"]
    assert "single_transformer_blocks.48.attn.to_out" not in modules
    assert modules["transformer_blocks.7.attn.to_out"] is False  # the ModuleList around to_out.0
    assert "transformer_blocks.5.attn.to_q" not in flavour_modules("klein-4b")  # klein-4b: 5 double blocks


def _params(flavour: str, patterns):
    return parse_params({"model": {"model_flavour": flavour}, "train": {"lora_target_modules": patterns}})


@pytest.mark.parametrize("patterns,nearest", [
    (["attn.to_kk"], "'attn.to_k'"),
    (["attn.add_q_prj"], "'attn.add_q_proj'"),
    (["single_transformer_blocks.21.attn.to_out"], "single_transformer_blocks.2"),  # klein-4b has 20
    (r"single_blocks\.\d+\.linear1", "linear1 is attn.to_qkv_mlp_proj"),  # BFL names are not the model's
])
def test_a_pattern_matching_no_module_is_a_params_error_naming_the_nearest_real_one(patterns, nearest):
    with pytest.raises(ParamsError, match="train.lora_target_modules") as error:
        _params("klein-4b", patterns)
    message = str(error.value)
    assert "matches no module of klein-4b's transformer" in message and "nearest real module: " in message
    assert nearest in message.split("nearest real module: ")[1]


def test_a_pattern_matching_a_module_peft_cannot_adapt_is_refused():
    with pytest.raises(ParamsError, match=r"'to_out' matches transformer_blocks\.0\.attn\.to_out .* not a Linear"):
        _params("klein-9b", ["to_out"])


def test_patterns_and_a_preset_together_are_refused():
    with pytest.raises(ParamsError, match="flux_lora_target 'attention' and lora_target_modules are both set"):
        parse_params({"train": {"lora_target_modules": ["attn.to_q"], "flux_lora_target": "attention"}})
    # the default preset beside patterns (the shipped params.yaml names it) is no contradiction: the patterns apply
    assert parse_params({"train": {"lora_target_modules": ["attn.to_q"], "flux_lora_target": "all"}})


def test_patterns_resolve_as_peft_matches_them_list_and_regex():
    modules = flavour_modules("klein-9b")
    suffixes = resolve_target_patterns(modules, ["attn.to_q", "single_transformer_blocks.3.attn.to_out"], "m")
    assert suffixes == [f"transformer_blocks.{i}.attn.to_q" for i in range(8)] + \
        ["single_transformer_blocks.3.attn.to_out"]
    regex = resolve_target_patterns(modules, r"single_transformer_blocks\.(1|2)\d\.attn\.to_out", "m")
    assert regex == [f"single_transformer_blocks.{i}.attn.to_out" for i in range(10, 24)]
    for patterns in (["attn.to_q", "single_transformer_blocks.3.attn.to_out"],
                     r"single_transformer_blocks\.(1|2)\d\.attn\.to_out"):
        peft_config = LoraConfig(target_modules=patterns)
        assert set(resolve_target_patterns(modules, patterns, "m")) == {
            n for n in modules if check_target_module_exists(peft_config, n)}
    assert _params("dev", ["to_qkv_mlp_proj"]).train.lora_target_modules == ["to_qkv_mlp_proj"]


def test_the_planner_counts_the_patterns_modules():
    from flux2lora.planner import plan_from_params, predict

    # klein-9b: the klein example's 24 single blocks are all there (klein-4b has 20: its last 4 names match nothing,
    # which peft passes over and lora_target_modules refuses)
    preset = parse_params({"model": {"model_flavour": "klein-9b"}, "train": {"flux_lora_target": "diffusers-example"}})
    example = _params("klein-9b", _example_targets("klein-9b"))
    one = _params("klein-9b", ["transformer_blocks.0.attn.to_q"])
    parts = [predict(plan_from_params(p)).parts_gib["lora_and_optimizer"] for p in (preset, example, one)]
    assert parts[0] == parts[1]
    assert parts[2] == pytest.approx(16 * (4096 + 4096) * 16 / 2**30)  # rank 16, one 4096x4096 Linear, 16 B/param


def test_training_adapts_exactly_the_patterns_modules(tmp_path):
    """A real (tiny) train stage with module names: the LoRA file holds those modules and no others, and the
    metadata names the patterns."""
    from helpers import make_project

    from flux2lora.stages import run_stage
    from flux2lora.train.lora import read_lora_metadata

    root = make_project(tmp_path / "p", git=False, images=2, **{"train.max_train_steps": 2})
    params_file = root / "params.yaml"
    tree = yaml.safe_load(params_file.read_text())
    assert tree["train"]["flux_lora_target"] == "all"  # stays: the patterns replace the default preset
    tree["train"]["lora_target_modules"] = ["attn.add_k_proj", "single_transformer_blocks.0.attn.to_out"]
    params_file.write_text(yaml.safe_dump(tree, sort_keys=False))
    for stage in ("prepare", "encode-text", "encode-latents"):
        run_stage(stage, params_file)
    summary = run_stage("train", params_file)
    assert summary["lora_modules"] == 2
    lora = root / "outputs/lora/pytorch_lora_weights.safetensors"
    modules = {k.removeprefix("transformer.").rsplit(".", 2)[0] for k in load_file(str(lora))}
    assert modules == {"transformer_blocks.0.attn.add_k_proj", "single_transformer_blocks.0.attn.to_out"}
    assert read_lora_metadata(lora)["flux2lora.targets"] == \
        '["attn.add_k_proj", "single_transformer_blocks.0.attn.to_out"]'
