"""LoKr and LoHa (`train.lora_type`, peft's LoKrConfig / LoHaConfig) end to end on tiny FLUX.2 models.

References and tolerances:
- The trained weight change of every module is peft's own `get_delta_weight` on the trained transformer's layers;
  the diffusers-layout file loaded by the consumer's loader (diffusers' `load_lora_weights` for LoKr, peft for LoHa,
  which diffusers 0.42.1 refuses) must give the same, within MAX_DELTA_DIFF (fp32 weights, compared in fp64).
- The ComfyUI file is read here by our own reimplementation of the merge LyCORIS documents and ComfyUI applies
  (no code of ComfyUI's): LoKr dW = kron(w1, w2) with w1 = w1_a @ w1_b / w2 = w2_a @ w2_b where low-rank, scaled by
  alpha / (the low-rank factor's rank) when a factor is low-rank and `.alpha` is present, else 1; LoHa
  dW = (w1_a @ w1_b) * (w2_a @ w2_b) * alpha / rows(w1_b). Keys with diffusers module names (`lycoris_...`) are
  applied to their rows of BFL's fused qkv / linear1, as ComfyUI's FLUX key map does. The rebuilt fused BFL deltas
  must equal the trained ones fused the same way within MAX_RELATIVE_DIFF of each module's largest delta (the
  scale is multiplied into one fp32 factor: one rounding per element).
"""

from __future__ import annotations


import numpy as np
import pytest
import torch
from diffusers import Flux2KleinPipeline, Flux2Pipeline
from helpers import copy_project, make_project
from peft.tuners.lycoris_utils import LycorisLayer
from safetensors.torch import load_file

from flux2lora.adapter_files import inspect_adapter
from flux2lora.config import ParamsError, load_params, parse_params
from flux2lora.export import DOUBLE_BLOCK_MODULES, DOUBLE_BLOCK_QKV, SINGLE_BLOCK_MODULES, export_bfl
from flux2lora.stages import STAGES, run_stage
from flux2lora.train.lora import load_adapter_weights

MAX_DELTA_DIFF = 1e-6
MAX_RELATIVE_DIFF = 1e-6
KINDS = ("lokr", "loha")
BASE = {"train.lora_rank": 4, "train.lora_alpha": 8, "train.learning_rate": 1e-2, "train.max_train_steps": 2,
        "train.checkpointing_steps": 100, "train.train_batch_size": 2}


def adapter_deltas(transformer, adapter: str) -> dict[str, torch.Tensor]:
    """{module: dW} (out, in) in fp64 of every LoKr / LoHa layer, by peft's own get_delta_weight."""
    return {name: module.get_delta_weight(adapter).double() for name, module in transformer.named_modules()
            if isinstance(module, LycorisLayer) and adapter in module._available_adapters}


@pytest.fixture(scope="module", params=["klein-4b", "klein-9b", "dev"])
def encoded(request, tmp_path_factory):
    """A tiny project of each flavour with its caches, shared by the kinds."""
    root = make_project(tmp_path_factory.mktemp(request.param) / "project", flavour=request.param, git=False,
                        images=4, **BASE)
    for stage in ("prepare", "encode-text", "encode-latents"):
        run_stage(stage, root / "params.yaml")
    return request.param, root


def _train_in_process(root):
    """The train stage's own recipe, in process, keeping the trained transformer."""
    from flux2lora.train.recipe import LoRATrainingRecipe, RunLog

    params = load_params(root / "params.yaml")
    recipe = LoRATrainingRecipe(params, root)
    recipe.setup()
    recipe.resume()
    run_log = RunLog(params, root, True)
    run_log.start(recipe.run_id, recipe.layout, len(recipe.targets), recipe.start_step)
    recipe.train(run_log)
    recipe.save(run_log)
    run_log.close(False)
    return params, recipe


# -- ComfyUI's documented merge, reimplemented

def _linears(transformer) -> dict[str, torch.nn.Linear]:
    """{module path: its Linear} of a transformer, adapted or not (an adapter layer counts as its base Linear)."""
    out = {}
    for name, module in transformer.named_modules():
        base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
        if isinstance(base, torch.nn.Linear) and ".base_layer" not in name:
            out[name] = base
    return out


def _bfl_rows(flavour_transformer) -> dict[str, tuple[str, int, int]]:
    """{diffusers module: (BFL module, first row, rows)}: where each diffusers Linear lives in BFL's weights."""
    out = {}
    for name, module in _linears(flavour_transformer).items():
        head, _, rest = name.partition(".")
        n, _, inner = rest.partition(".")
        if head == "transformer_blocks" and inner in DOUBLE_BLOCK_MODULES:
            out[name] = (f"double_blocks.{n}.{DOUBLE_BLOCK_MODULES[inner]}", 0, module.out_features)
        elif head == "single_transformer_blocks" and inner in SINGLE_BLOCK_MODULES:
            out[name] = (f"single_blocks.{n}.{SINGLE_BLOCK_MODULES[inner]}", 0, module.out_features)
        elif head == "transformer_blocks":
            for bfl, projections in DOUBLE_BLOCK_QKV.items():
                if inner in projections:
                    i = projections.index(inner)
                    out[name] = (f"double_blocks.{n}.{bfl}", i * module.out_features, module.out_features)
    return out


def comfyui_deltas(file, transformer) -> dict[str, torch.Tensor]:
    """{BFL module: dW} (fp64) the file applies, by LyCORIS's formulas, each key applied to its rows."""
    state = load_file(str(file))
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        module, _, part = key.rpartition(".")
        modules.setdefault(module, {})[part] = value.double()
    rows = _bfl_rows(transformer)
    underscored = {name.replace(".", "_"): name for name in rows}
    shapes = {n: m.weight.shape for n, m in _linears(transformer).items()}
    out: dict[str, torch.Tensor] = {}
    for module, p in modules.items():
        if "hada_w1_a" in p:
            delta = (p["hada_w1_a"] @ p["hada_w1_b"]) * (p["hada_w2_a"] @ p["hada_w2_b"])
            delta = delta * (p["alpha"].item() / p["hada_w1_b"].shape[0] if "alpha" in p else 1.0)
        else:
            w1 = p["lokr_w1"] if "lokr_w1" in p else p["lokr_w1_a"] @ p["lokr_w1_b"]
            w2 = p["lokr_w2"] if "lokr_w2" in p else p["lokr_w2_a"] @ p["lokr_w2_b"]
            dim = p["lokr_w2_b"].shape[0] if "lokr_w2_b" in p else p["lokr_w1_b"].shape[0] if "lokr_w1_b" in p \
                else None
            delta = torch.kron(w1, w2) * (p["alpha"].item() / dim if "alpha" in p and dim is not None else 1.0)
        if module.startswith("diffusion_model."):
            out[module.removeprefix("diffusion_model.")] = delta
            continue
        name = underscored[module.removeprefix("lycoris_")]
        bfl, first, count = rows[name]
        fused_rows = sum(c for n, (b, _, c) in rows.items() if b == bfl)
        target = out.setdefault(bfl, torch.zeros(fused_rows, shapes[name][1], dtype=torch.float64))
        target[first:first + count] += delta.reshape(shapes[name])
    return out


def fused_trained(trained: dict[str, torch.Tensor], transformer) -> dict[str, torch.Tensor]:
    """The trained per-module deltas placed in BFL's (fused) weights."""
    rows = _bfl_rows(transformer)
    out: dict[str, torch.Tensor] = {}
    for name, delta in trained.items():
        bfl, first, count = rows[name]
        fused_rows = sum(c for n, (b, _, c) in rows.items() if b == bfl)
        target = out.setdefault(bfl, torch.zeros(fused_rows, delta.shape[1], dtype=torch.float64))
        target[first:first + count] += delta
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_trained_adapter_loads_to_the_trained_weights_in_diffusers_peft_and_comfyui(encoded, kind, tmp_path):
    flavour, source = encoded
    root = copy_project(source, tmp_path, **{"train.lora_type": kind})
    params, recipe = _train_in_process(root)
    trained = adapter_deltas(recipe.transformer, "default")
    assert len(trained) == len(recipe.targets)
    assert max(d.abs().max().item() for d in trained.values()) > 1e-5  # training moved it off its zero start

    lora_file = recipe.layout.lora_file
    report = inspect_adapter(lora_file)
    assert (report.kind, report.layout, len(report.modules)) == (kind, "diffusers", len(recipe.targets))
    assert not report.unmatched_keys and not report.shape_mismatches
    assert all(m.alpha is not None for m in report.modules)  # from the peft config's alpha / alpha_pattern

    # the consumer's loader: diffusers' load_lora_weights (LoKr) / peft (LoHa)
    pipe_cls = Flux2KleinPipeline if params.model.flavour.is_klein else Flux2Pipeline
    pipe = pipe_cls.from_pretrained(params.model.model_path, torch_dtype=recipe.transformer.dtype)
    if kind == "lokr":
        pipe.load_lora_weights(str(lora_file.parent), weight_name=lora_file.name, adapter_name="trained")
    else:
        with pytest.raises(ValueError, match="support LoRA and LoKr"):  # why LoHa goes through peft
            pipe_cls.from_pretrained(params.model.model_path).load_lora_weights(str(lora_file))
        load_adapter_weights(pipe, lora_file, "trained")
    loaded = adapter_deltas(pipe.transformer, "trained")
    assert loaded.keys() == trained.keys()
    worst = max((loaded[k] - trained[k]).abs().max().item() for k in trained)
    assert worst <= MAX_DELTA_DIFF, worst

    # the ComfyUI file, rebuilt from the file alone by LyCORIS's formulas
    comfy_file = export_bfl(lora_file, tmp_path / "comfy.safetensors")
    comfy_report = inspect_adapter(comfy_file)
    assert comfy_report.kind == kind and not comfy_report.unmatched_keys and not comfy_report.shape_mismatches
    assert comfy_report.layout == ("lycoris" if kind == "lokr" else "bfl")
    keys = load_file(str(comfy_file))
    if kind == "loha":  # q/k/v fused: one module per qkv, rank 3r
        assert any(k.endswith("img_attn.qkv.hada_w1_a") for k in keys)
        assert all(k.startswith("diffusion_model.double_blocks.") or k.startswith("diffusion_model.single_blocks.")
                   for k in keys)
    else:
        assert any(k.endswith("attn_to_q.lokr_w1") for k in keys) and all(k.startswith("lycoris_") for k in keys)
    rebuilt = comfyui_deltas(comfy_file, pipe.transformer)
    expected = fused_trained(trained, pipe.transformer)
    assert rebuilt.keys() == expected.keys()
    for module, delta in expected.items():
        assert (rebuilt[module] - delta).abs().max().item() <= MAX_RELATIVE_DIFF * delta.abs().max().item(), module


@pytest.fixture(scope="module")
def lycoris_pipeline(tmp_path_factory):
    """A tiny klein-9b LoKr project through all six stages (validation during training at step 2 too), and a
    LoHa copy of it trained, validated and published."""
    root = make_project(tmp_path_factory.mktemp("lycoris") / "project", flavour="klein-9b", git=False, images=4,
                        **{**BASE, "train.max_train_steps": 3, "train.lora_type": "lokr",
                           "validate.validation_num_inference_steps": 2, "validate.validation_step_interval": 2})
    for name in STAGES:
        run_stage(name, root / "params.yaml")
    loha = copy_project(root, tmp_path_factory.mktemp("loha"), **{"train.lora_type": "loha"})
    for name in ("train", "validate", "publish"):
        run_stage(name, loha / "params.yaml")
    return {"lokr": root, "loha": loha}


@pytest.mark.parametrize("kind", KINDS)
def test_the_pipeline_validates_publishes_and_generates_with_each_kind(lycoris_pipeline, kind):
    from flux2lora.generate import generate_images

    root = lycoris_pipeline[kind]
    publish = root / "outputs/publish"
    diffusers_file = publish / "pytorch_lora_weights.safetensors"
    assert inspect_adapter(diffusers_file).kind == kind
    comfy = list(publish.glob("*_bfl.safetensors"))
    assert len(comfy) == 1 and inspect_adapter(comfy[0]).kind == kind
    card = (publish / "README.md").read_text()
    assert f"A {kind} adapter" in card and "Use it in ComfyUI" in card
    assert (root / "outputs/validation/grid.png").exists()
    small = dict(seeds=[0], width=64, height=64, num_inference_steps=2)
    with_adapter = np.asarray(generate_images("a red circle", diffusers_file, **small)[0], dtype=np.float64)
    off = np.asarray(generate_images("a red circle", diffusers_file, scale=0.0, **small)[0], dtype=np.float64)
    assert np.abs(with_adapter - off).max() > 0  # the adapter changes the image; scale 0 switches it off


@pytest.mark.parametrize("train,match", [
    ({"lora_type": "lokr", "use_dora": True}, "use_dora with lora_type lokr"),
    ({"lora_type": "lokr", "lora_dropout": 0.1}, "lora_dropout with lora_type lokr"),
    ({"lora_type": "loha", "lycoris_config": {"factor": 4}}, "lycoris_config configures LoKr"),
    ({"lycoris_config": {"factor": 4}}, "lora_type is lora"),
    ({"lora_type": "lokr", "lycoris_config": {"full_matrix": True, "decompose_both": True}}, "contradict"),
    ({"lora_type": "lokr", "lycoris_config": {"factor": 0}}, "factor 0"),
    ({"lora_type": "lokr", "lora_init_type": "default"}, "lora_init_type with lora_type lokr"),
])
def test_unsupported_combinations_are_refused(train, match):
    with pytest.raises(ParamsError, match=match):
        parse_params({"train": train})


def test_lokr_factorisation_options_follow_lycoris(tmp_path):
    """factor picks w1's size, decompose_both makes w1 low-rank, full_matrix makes w2 full at scale 1 (LyCORIS's
    rule for all-full factors: peft alone would scale them alpha / r)."""
    from flux2lora.config import LycorisConfig
    from flux2lora.tiny import make_tiny_model
    from flux2lora.train.lora import add_lora, lycoris_adapter_config, target_modules

    model = make_tiny_model(tmp_path / "model", flavour="klein-4b")
    transformer = Flux2KleinPipeline.from_pretrained(model).transformer
    targets = target_modules(transformer, "all")
    config = lycoris_adapter_config("lokr", transformer, 1, 8, targets, LycorisConfig(full_matrix=True))
    assert set(config.alpha_pattern) == set(targets) and all(config.alpha_pattern[t] == config.r for t in targets)
    add_lora(transformer, 1, 8, 0.0, targets, kind="lokr", lycoris=LycorisConfig(factor=4, decompose_both=True))
    layer = transformer.get_submodule(targets[0])
    assert "default" in layer.lokr_w1_a and layer.lokr_w1_a["default"].shape[0] == 4  # w1 (4, 4) as w1_a @ w1_b


@pytest.mark.parametrize("precision", ["int8-quanto", "int4-quanto", "fp8-torchao"])
@pytest.mark.parametrize("kind", KINDS)
def test_lokr_and_loha_train_on_a_quantized_base(tmp_path_factory, quanto_int4_without_a_compiler, precision,
                                                 kind):
    """peft wraps the quantized Linear layers (quanto's QLinear and torchao's float8 weights are torch Linears): each
    adapted layer computes base(x) + x dW^T and its factors get gradients, the frozen weights none."""
    from flux2lora.config import ModelParams
    from flux2lora.models import load_training_transformer
    from flux2lora.tiny import make_tiny_model
    from flux2lora.train.lora import add_lora, target_modules

    folder = make_tiny_model(tmp_path_factory.mktemp("q") / "model", "klein-4b")
    model = ModelParams(model_flavour="tiny-klein-4b", pretrained_model_name_or_path=str(folder),
                        base_model_default_dtype="fp32")
    transformer = load_training_transformer(model, torch.device("cpu"), precision, quantize_via="cpu")
    params = add_lora(transformer, 4, 8, 0.0, target_modules(transformer, "all"), kind=kind)
    g = torch.Generator().manual_seed(0)
    for p in params:  # as after training: the factors that start at 0 moved
        p.data = torch.randn(p.shape, generator=g) * 0.1
    layer = transformer.get_submodule("single_transformer_blocks.0.attn.to_qkv_mlp_proj")
    x = torch.randn(3, layer.in_features, generator=g)
    out = layer(x)
    expected = layer.get_base_layer()(x) + x @ layer.get_delta_weight("default").T
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    out.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in layer.named_parameters()
               if p.requires_grad)
