"""train.optimizer: every optimizer trains the tiny LoRA a few steps, and a run continued from its checkpointed state
(optimizer, scheduler, scaler, through torch.save / torch.load like a checkpoint) ends bitwise where an uninterrupted
run does; one end-to-end kill-and-resume of the train stage with a non-default optimizer (bf16 weights)."""

from __future__ import annotations

import io
import json

import pytest
import torch
from helpers import make_project, straight_and_faulted
from safetensors.torch import load_file

from flux2lora.config import TrainParams
from flux2lora.train.optimizers import OPTIMIZERS

STEPS, SPLIT = 4, 2


def _batches():
    from flux2lora.train.step import MicroBatch

    g = torch.Generator().manual_seed(0)
    return [MicroBatch(torch.randn(1, 128, 4, 4, generator=g), torch.randn(1, 7, 48, generator=g),
                       torch.randn(1, 128, 4, 4, generator=g), torch.rand(1, generator=g) * 0.9 + 0.05)
            for _ in range(STEPS)]


@pytest.fixture(scope="module")
def base_model():
    from diffusers import Flux2Transformer2DModel

    from flux2lora.flavours import get_flavour

    torch.manual_seed(0)
    return Flux2Transformer2DModel(**get_flavour("tiny-klein-4b").full_transformer_config).requires_grad_(False)


def _training(base_model, cfg):
    """A fresh LoRA (seeded) on a copy of the base, with the recipe's optimizer and schedule."""
    import copy

    from flux2lora.train.lora import add_lora, target_modules
    from flux2lora.train.schedules import build_lr_scheduler
    from flux2lora.train.step import TrainingStep, make_optimizer

    model = copy.deepcopy(base_model)
    torch.manual_seed(1)
    params = add_lora(model, 4, None, 0.0, target_modules(model, "all"), "gaussian")
    optimizer = make_optimizer(params, cfg, torch.device("cpu"))
    scheduler = build_lr_scheduler(optimizer, cfg, STEPS)
    return model, params, TrainingStep(model, params, optimizer, scheduler, mixed_precision="no",
                                       device=torch.device("cpu"))


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_each_optimizer_trains_and_resumes_bitwise(base_model, name):
    cfg = TrainParams(optimizer=name, learning_rate=1.0 if name == "prodigy" else 1e-3, lr_scheduler="cosine",
                      max_train_steps=STEPS)
    batches = _batches()
    _, params, step = _training(base_model, cfg)
    before = [p.detach().clone() for p in params]
    for k in range(STEPS):
        step([batches[k]], step_number=k + 1)
    straight = [p.detach().clone() for p in params]
    assert all(torch.isfinite(p).all() for p in straight)
    assert sum(not torch.equal(a, b) for a, b in zip(straight, before)) > len(before) // 2  # it trained
    if name == "adamw_bf16":
        assert {p.dtype for p in params} == {torch.bfloat16}
    else:
        assert {p.dtype for p in params} == {torch.float32}

    # the first SPLIT steps, the state saved as a checkpoint saves it, then a new process's objects continue
    _, first_params, first = _training(base_model, cfg)
    for k in range(SPLIT):
        first([batches[k]], step_number=k + 1)
    buffer = io.BytesIO()
    torch.save({"lora": [p.detach().clone() for p in first_params], "state": first.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    _, resumed_params, resumed = _training(base_model, cfg)
    for p, value in zip(resumed_params, saved["lora"]):
        p.data.copy_(value)
    resumed.load_state_dict(saved["state"])
    for k in range(SPLIT, STEPS):
        resumed([batches[k]], step_number=k + 1)
    assert all(torch.equal(a, b.detach()) for a, b in zip(straight, resumed_params))


def test_adamw_is_todays_fused_torch_adamw():
    from flux2lora.train.optimizers import build_optimizer

    p = torch.nn.Parameter(torch.zeros(3))
    optimizer = build_optimizer([p], TrainParams(), torch.device("cpu"))
    assert type(optimizer) is torch.optim.AdamW and optimizer.defaults["fused"]
    assert optimizer.defaults["weight_decay"] == 1e-2 and optimizer.defaults["eps"] == 1e-8
    assert type(build_optimizer([p], TrainParams(use_8bit_adam=True), torch.device("cpu"))).__name__ == "AdamW8bit"


def test_a_missing_package_and_two_optimizer_choices_are_clear_errors(monkeypatch):
    from flux2lora.train.optimizers import build_optimizer

    monkeypatch.setitem(__import__("sys").modules, "prodigyopt", None)  # as if not installed: import fails
    with pytest.raises(ValueError, match="train.optimizer prodigy needs the prodigyopt package: pip install"):
        build_optimizer([torch.nn.Parameter(torch.zeros(3))], TrainParams(optimizer="prodigy"), torch.device("cpu"))
    with pytest.raises(ValueError, match="use_8bit_adam"):
        TrainParams(use_8bit_adam=True, optimizer="lion")


def test_8bit_states_of_a_large_tensor_resume_bitwise():
    """The LoRA tensors of the tiny model are below bitsandbytes' min_8bit_size (32-bit states); a 4096-element
    tensor gets the 8-bit (blockwise-quantised) states, and those resume exactly too."""
    from flux2lora.train.optimizers import build_optimizer

    cfg = TrainParams(optimizer="adamw8bit", learning_rate=1e-2)
    grads = [torch.randn(64, 64, generator=torch.Generator().manual_seed(k)) for k in range(4)]

    def run(steps, state=None, start=None):
        p = torch.nn.Parameter(torch.ones(64, 64) if start is None else start.clone())
        optimizer = build_optimizer([p], cfg, torch.device("cpu"))
        if state is not None:
            optimizer.load_state_dict(state)
        for g in steps:
            p.grad = g.clone()
            optimizer.step()
        return p.detach(), optimizer

    straight, _ = run(grads)
    half, optimizer = run(grads[:2])
    assert next(iter(optimizer.state.values()))["state1"].dtype == torch.uint8  # 8-bit states
    state = optimizer.state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    resumed, _ = run(grads[2:], torch.load(buffer, weights_only=False), start=half)
    assert torch.equal(straight, resumed)


RUN = {"train.max_train_steps": 6, "train.checkpointing_steps": 3, "train.train_batch_size": 2,
       "train.optimizer": "adamw_bf16", "train.learning_rate": 1e-3, "validate.eval_every_n_steps": 0}


@pytest.mark.slow
def test_a_bf16_optimizer_run_killed_and_resumed_ends_bitwise_equal(tmp_path, monkeypatch):
    """The train stage with adamw_bf16: a fault after step 4 (checkpoint at 3) and a resume end with the LoRA of the
    uninterrupted run, bf16 weights in the file."""
    from flux2lora.layout import layout_for
    from flux2lora.stages import run_stage

    encoded = make_project(tmp_path / "encoded", git=False, images=4, **RUN)
    for stage in ("prepare", "encode-text", "encode-latents"):
        run_stage(stage, encoded / "params.yaml")
    straight, killed = straight_and_faulted(encoded, tmp_path, monkeypatch)
    assert json.loads(layout_for(killed, "outputs").train_metrics.read_text())["resumed_from_step"] == 3
    a = load_file(str(layout_for(straight, "outputs").lora_file))
    b = load_file(str(layout_for(killed, "outputs").lora_file))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert {t.dtype for t in a.values()} == {torch.bfloat16}
