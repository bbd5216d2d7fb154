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


@pytest.mark.parametrize("precision,at_most", [("int8-quanto", 0.5), ("int4-quanto", 0.4), ("fp8-torchao", 0.5)])
def test_quantized_base_shrinks_the_transformers_parameter_bytes(tiny, quanto_int4_without_a_compiler, precision,
                                                                  at_most):
    def block_bytes(model):
        return parameter_bytes(model.transformer_blocks) + parameter_bytes(model.single_transformer_blocks)

    plain = load_training_transformer(tiny, torch.device("cpu"))
    quantized = load_training_transformer(tiny, torch.device("cpu"), precision, quantize_via="cpu")
    if precision.endswith("quanto"):
        from optimum.quanto import QLinear

        assert isinstance(quantized.transformer_blocks[0].attn.to_q, QLinear)
        assert not isinstance(quantized.proj_out, QLinear)  # only the blocks are quantized
    else:
        from torchao.quantization import Float8Tensor

        assert isinstance(quantized.transformer_blocks[0].attn.to_q.weight, Float8Tensor)
        assert isinstance(quantized.single_transformer_blocks[0].attn.to_out.weight, Float8Tensor)
        assert not isinstance(quantized.proj_out.weight, Float8Tensor)  # only the blocks are quantized
    # fp32 block weights -> int8 (+ scales) or int4 (+ scales and shifts); the whole model shrinks with them
    assert block_bytes(quantized) < at_most * block_bytes(plain)
    assert parameter_bytes(quantized) < parameter_bytes(plain)


@pytest.mark.parametrize("precision", ["int8-quanto", "int4-quanto", "fp8-torchao"])
def test_training_steps_run_on_a_quantized_base(tmp_path, quanto_int4_without_a_compiler, precision):
    from helpers import make_project

    root = make_project(tmp_path / "p", git=False, images=4,
                        **{"train.base_model_precision": precision, "train.quantize_via": "cpu",
                           "train.max_train_steps": 3, "train.train_batch_size": 2})
    for stage in ("prepare", "encode-text", "encode-latents"):
        run_stage(stage, root / "params.yaml")
    summary = run_stage("train", root / "params.yaml")
    assert summary["steps"] == 3 and torch.isfinite(torch.tensor(summary["final_loss"]))


def _train_lora(folder, **overrides):
    from helpers import make_project
    from safetensors.torch import load_file

    root = make_project(folder, git=False, images=4,
                        **{"train.max_train_steps": 3, "train.train_batch_size": 2, **overrides})
    for stage in ("prepare", "encode-text", "encode-latents", "train"):
        run_stage(stage, root / "params.yaml")
    return load_file(str(root / "outputs/lora/pytorch_lora_weights.safetensors"))


def test_checkpointing_all_some_or_no_blocks_and_group_offload_give_the_same_lora(tmp_path):
    """Checkpointing (of every block, of the first only) and group offload trade memory for time; the computed
    LoRA must not change."""
    reference = _train_lora(tmp_path / "none", **{"train.gradient_checkpointing": False})
    variants = {"all": {"train.gradient_checkpointing": True},
                "first-block": {"train.gradient_checkpointing_blocks": 1},  # of the tiny model's two
                "group-offload": {"train.enable_group_offload": True, "train.group_offload_blocks_per_group": 2,
                                  "train.gradient_checkpointing": False}}
    for name, overrides in variants.items():
        lora = _train_lora(tmp_path / name, **overrides)
        assert lora.keys() == reference.keys()
        assert max((lora[k] - reference[k]).abs().max().item() for k in lora) <= 1e-6, name


def test_only_the_configured_blocks_are_recomputed_in_the_backward(tiny):
    """gradient_checkpointing_blocks=1 (of the tiny model's double + single block): block 0 runs its forward twice
    per step (the recompute), the single block once; the transformer's own all-blocks flag stays off. Full
    checkpointing recomputes every block but the last (whose recompute would free no memory)."""
    from flux2lora.config import Params
    from flux2lora.train.lora import add_lora, target_modules
    from flux2lora.train.model import build_training_model
    from flux2lora.train.step import MicroBatch, TrainingStep

    params = Params(model=tiny, train={"gradient_checkpointing_blocks": 1, "mixed_precision": "no"})
    transformer = load_training_transformer(tiny, torch.device("cpu"))
    lora = add_lora(transformer, 2, None, 0.0, target_modules(transformer, "all"))
    model = build_training_model(params, transformer)
    assert not transformer.gradient_checkpointing
    blocks = list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)
    calls = [0] * len(blocks)
    for i, block in enumerate(blocks):
        block.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    optimizer = torch.optim.AdamW(lora)
    step = TrainingStep(model, lora, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0))
    g = torch.Generator().manual_seed(0)
    step([MicroBatch(torch.randn(1, 128, 4, 4, generator=g), torch.randn(1, 7, 48, generator=g),
                     torch.randn(1, 128, 4, 4, generator=g), torch.tensor([0.5]))])
    assert calls == [2] + [1] * (len(blocks) - 1)


def test_memory_budget_mode_checkpoints_fewer_blocks_as_the_budget_grows(tiny):
    """vram_budget_gib: the planner's fewest checkpointed blocks that fit (klein-4b at 1024 px: full checkpointing
    fits 9.5 GiB, nothing checkpointed needs ~23 GiB); the tiny model checkpoints the same share of its blocks."""
    from flux2lora.config import Params
    from flux2lora.planner import Plan, checkpointed_share_for_budget, predict
    from flux2lora.train.model import blocks_to_checkpoint

    base = Plan("klein-4b", 1024, 1)
    shares = [checkpointed_share_for_budget(base, budget) for budget in (9.5, 12, 16, 20, 30)]
    assert shares[0] is not None and shares[-1] == 0.0
    assert shares == sorted(shares, reverse=True) and len(set(shares)) >= 4
    for budget, share in zip((9.5, 12, 16, 20), shares):
        from dataclasses import replace

        assert predict(replace(base, checkpointed_share=share)).peak_gib <= budget
    assert checkpointed_share_for_budget(base, 5.0) is None  # bf16 weights alone need ~7.3 GiB

    transformer = load_training_transformer(tiny, torch.device("cpu"))
    total = len(transformer.transformer_blocks) + len(transformer.single_transformer_blocks)
    bf16 = tiny.model_copy(update={"base_model_default_dtype": "bf16"})  # as planned: bf16 weights
    params = lambda budget: Params(model=bf16, prepare={"resolution": 1024},  # noqa: E731
                                   train={"vram_budget_gib": budget})
    counts = [blocks_to_checkpoint(params(b), transformer) for b in (9.5, 20, 30)]
    assert counts[0] == total and counts[2] == 0 and 0 < counts[1] < total
    with pytest.raises(ValueError, match="vram_budget_gib=5.0.*flux2lora plan"):
        blocks_to_checkpoint(params(5.0), transformer)


@pytest.mark.parametrize("checkpointing,backend", [
    (False, "aot_eager"), (True, "aot_eager"),
    # inductor generates and builds C++ kernels: ~40 s on 2 cores, the real compiler of the speed mode
    pytest.param(True, "inductor", marks=pytest.mark.slow)])
def test_regional_compile_trains_like_eager(tiny, checkpointing, backend):
    """compile_transformer: each block compiled (aot_eager: the same dynamo capture and compiled autograd as
    inductor without code generation), checkpointing inside the compiled region, peft LoRA in the blocks; the loss
    and LoRA gradients equal eager's."""
    from flux2lora.config import Params
    from flux2lora.train.lora import add_lora, target_modules
    from flux2lora.train.model import BlockCall, build_training_model
    from flux2lora.train.step import MicroBatch

    g = torch.Generator().manual_seed(0)
    batch = MicroBatch(torch.randn(1, 128, 4, 4, generator=g), torch.randn(1, 7, 48, generator=g),
                       torch.randn(1, 128, 4, 4, generator=g), torch.tensor([0.5]))
    results = []
    for compiled in (False, True):
        torch._dynamo.reset()
        torch.manual_seed(0)
        transformer = load_training_transformer(tiny, torch.device("cpu"))
        lora = add_lora(transformer, 2, None, 0.0, target_modules(transformer, "all"))
        for p in lora:
            p.data.normal_(0, 0.05, generator=torch.Generator().manual_seed(p.numel()))
        params = Params(model=tiny, train={"compile_transformer": compiled, "compile_backend": backend,
                                           "gradient_checkpointing": checkpointing, "mixed_precision": "no"})
        model = build_training_model(params, transformer)
        if compiled:
            # every block checkpointed but the last (its recompute would save nothing)
            assert [c.checkpoint for c in model.block_calls] == [checkpointing] * (len(model.block_calls) - 1) + [False]
            assert all(isinstance(c, BlockCall) for c in model.block_calls)
            assert all(c._compiled_call_impl is not None for c in model.block_calls)
        from flux2lora.train.step import TrainingStep

        step = TrainingStep(model, lora, torch.optim.SGD(lora, lr=0.0), torch.optim.lr_scheduler.LambdaLR(
            torch.optim.SGD(lora, lr=0.0), lambda _: 1.0), max_grad_norm=0)
        loss = step.loss(batch)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in lora]))
    (eager_loss, eager_grads), (compiled_loss, compiled_grads) = results
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-6)
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_compile_and_group_offload_together_is_a_clear_error(tiny):
    from flux2lora.config import Params
    from flux2lora.train.model import build_training_model

    transformer = load_training_transformer(tiny, torch.device("cpu"))
    params = Params(model=tiny, train={"compile_transformer": True, "enable_group_offload": True})
    with pytest.raises(ValueError, match="compile_transformer and train.enable_group_offload"):
        build_training_model(params, transformer)


def test_group_offload_keeps_weights_in_cpu_memory_behind_hooks_and_the_lora_on_the_device(tiny):
    from diffusers.hooks import HookRegistry

    transformer = load_training_transformer(tiny, torch.device("cpu"), group_offload=dict(blocks_per_group=1))
    registry = HookRegistry.check_if_exists_or_initialize(transformer.transformer_blocks[0])
    assert registry.get_hook("group_offloading") is not None


def test_text_encoder_and_vae_group_offload_encode_the_same(tiny):
    from flux2lora.latents import encode_pixels
    from flux2lora.models import load_vae
    from flux2lora.text_encoding import PromptEncoder

    prompts = ["a red cube on a table", ""]
    plain = PromptEncoder.from_pretrained(tiny, max_sequence_length=32).encode(prompts)
    offloaded = PromptEncoder.from_pretrained(tiny, max_sequence_length=32, group_offload=True)
    from diffusers.hooks import HookRegistry

    layer = offloaded.model.layers[0] if hasattr(offloaded.model, "layers") else None
    assert layer is None or HookRegistry.check_if_exists_or_initialize(layer).get_hook("group_offloading")
    assert torch.equal(offloaded.encode(prompts), plain)

    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    device = torch.device("cpu")
    assert torch.equal(encode_pixels(load_vae(tiny, device, group_offload=True), pixels),
                       encode_pixels(load_vae(tiny, device), pixels))


def test_training_by_epochs(tmp_path):
    """num_train_epochs (with max_train_steps: 0): 4 images x 1 repeat in batches of 2 = 2 steps per epoch."""
    from flux2lora.config import ParamsError, parse_params

    lora = _train_lora(tmp_path / "epochs", **{"train.max_train_steps": 0, "train.num_train_epochs": 3})
    import json

    metrics = json.loads((tmp_path / "epochs/outputs/train/metrics.json").read_text())
    assert metrics["steps"] == 6 and lora
    with pytest.raises(ParamsError, match="either max_train_steps or num_train_epochs"):
        parse_params({"train": {"max_train_steps": 10, "num_train_epochs": 2}})
    with pytest.raises(ParamsError, match="set num_train_epochs"):
        parse_params({"train": {"max_train_steps": 0}})


@pytest.mark.parametrize("options,staged_on", [
    ({}, "meta"),  # quantize_via accelerator: straight to the device
    ({"offload_during_startup": True}, "cpu"),
    ({"quantize_via": "cpu", "base_model_precision": "int8-quanto"}, "cpu"),
    ({"group_offload": {"blocks_per_group": 1}}, "cpu")])
def test_startup_offload_loads_and_quantizes_on_the_cpu_first(tiny, monkeypatch, options, staged_on):
    """Where the weights are first loaded: the target device (here `meta`, standing in for a GPU: it holds no
    data), or the CPU when offload_during_startup, quantize_via=cpu or group offload ask for it."""
    from flux2lora import models

    staged = []
    real = models.load_transformer
    monkeypatch.setattr(models, "load_transformer", lambda model, device: staged.append(device.type) or
                        real(model, device))
    options = dict(options)
    precision = options.pop("base_model_precision", None)
    if "group_offload" in options:
        transformer = models.load_training_transformer(tiny, torch.device("cpu"), precision, **options)
    else:
        transformer = models.load_training_transformer(tiny, torch.device("meta"), precision, **options)
        assert next(transformer.parameters()).device.type == "meta"  # and it ends on the device
    assert staged == [staged_on]


def test_fp8_on_a_gpu_without_float8_support_is_a_clear_error(tiny, monkeypatch):
    """CUDA cannot run here: the capability query is stood in for, to check the message an A100 user gets."""
    from flux2lora import models

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    transformer = models.load_transformer(tiny, torch.device("cpu"))
    with pytest.raises(ValueError, match="fp8-torchao needs a GPU with compute capability 8.9.*A100.*8.0.*int8-quanto"):
        models._quantize_fp8(transformer, torch.device("cuda"))
