"""Optimisation options of the train stage do what they say: LR schedules with warmup (read back from the MLflow
run), fp16 with its gradient scaler, gradient clipping, LoRA alpha, and 8-bit AdamW's clear error without
bitsandbytes."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
import yaml
from helpers import make_project
from mlflow import MlflowClient

from flux2lora.config import TrainParams
from flux2lora.stages import run_stage

STEPS, WARMUP, LR = 6, 2, 1e-3


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    root = make_project(tmp_path_factory.mktemp("opt") / "template", git=False, images=4,
                        **{"train.max_train_steps": STEPS, "train.train_batch_size": 2,
                           "train.learning_rate": LR, "train.lr_warmup_steps": WARMUP})
    for stage in ("prepare", "encode-text", "encode-latents"):
        run_stage(stage, root / "params.yaml")
    return root


def _train(encoded, tmp_path, **train):
    root = tmp_path / "p"
    shutil.copytree(encoded, root, symlinks=True)
    raw = yaml.safe_load((root / "params.yaml").read_text())
    raw["train"].update(train)
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    summary = run_stage("train", root / "params.yaml")
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    history = sorted(client.get_metric_history(summary["mlflow_run_id"], "learning_rate"), key=lambda m: m.step)
    return summary, [m.value for m in history]


@pytest.mark.parametrize("scheduler", ["constant", "constant_with_warmup", "linear", "cosine", "polynomial"])
def test_lr_schedules_with_warmup(encoded, tmp_path, scheduler):
    """The learning rate logged after each step (step k: the rate the next step uses)."""
    summary, lrs = _train(encoded, tmp_path, lr_scheduler=scheduler)
    assert len(lrs) == STEPS and math.isfinite(summary["final_loss"])
    if scheduler == "constant":  # diffusers' constant schedule ignores warmup
        assert lrs == [pytest.approx(LR)] * STEPS
        return
    # warmup: the rate rises linearly to LR over WARMUP steps
    assert lrs[0] == pytest.approx(LR / WARMUP) and lrs[WARMUP - 1] == pytest.approx(LR)
    after = lrs[WARMUP - 1:]
    if scheduler == "constant_with_warmup":
        assert after == [pytest.approx(LR)] * len(after)
    else:  # decays to 0 at max_train_steps (polynomial: to diffusers' lr_end, 1e-7)
        assert all(a > b for a, b in zip(after, after[1:])) and lrs[-1] == pytest.approx(0.0, abs=1e-6)
        progress = 0.5  # halfway through the decay (step 4 of 2..6)
        middle = lrs[WARMUP + 1]
        expected = {"linear": LR * (1 - progress), "cosine": LR * 0.5 * (1 + math.cos(math.pi * progress)),
                    "polynomial": (LR - 1e-7) * (1 - progress) + 1e-7}[scheduler]  # power 1.0
        assert middle == pytest.approx(expected, rel=1e-6)


def test_fp16_trains_with_its_gradient_scaler(encoded, tmp_path):
    summary, _ = _train(encoded, tmp_path, mixed_precision="fp16", checkpointing_steps=3)
    assert math.isfinite(summary["final_loss"])
    checkpoint = tmp_path / "p/outputs/checkpoints/step-000003"
    from flux2lora.train.checkpoint import list_checkpoints

    state = next(c for c in list_checkpoints(checkpoint.parent) if c.step == 3).training_state()
    assert state["scaler"]["scale"] > 1  # the scaler is live and checkpointed (a resume continues its scale)


def _tiny_lora_model(rank=4, alpha=None):
    from diffusers import Flux2Transformer2DModel

    from flux2lora.flavours import get_flavour
    from flux2lora.train.lora import add_lora, target_modules

    torch.manual_seed(0)
    model = Flux2Transformer2DModel(**get_flavour("tiny-klein-4b").full_transformer_config).requires_grad_(False)
    params = add_lora(model, rank, alpha, 0.0, target_modules(model, "all"))
    return model, params


def test_lora_alpha_sets_the_adapter_scale():
    model, _ = _tiny_lora_model(rank=4, alpha=8)
    assert model.transformer_blocks[0].attn.to_q.scaling["default"] == 2.0  # alpha / rank
    model, _ = _tiny_lora_model(rank=4)
    assert model.transformer_blocks[0].attn.to_q.scaling["default"] == 1.0  # alpha defaults to the rank


def test_max_grad_norm_clips_the_update():
    """With SGD (lr 1) the update is the clipped gradient: its norm is max_grad_norm, while the returned norm is
    the one before clipping."""
    from flux2lora.train.step import MicroBatch, TrainingStep

    model, params = _tiny_lora_model()
    for p in params:  # non-zero B so that every LoRA matrix gets a gradient
        p.data.normal_(0, 0.05, generator=torch.Generator().manual_seed(p.numel()))
    before = [p.detach().clone() for p in params]
    sgd = torch.optim.SGD(params, lr=1.0)
    step = TrainingStep(model, params, sgd, torch.optim.lr_scheduler.LambdaLR(sgd, lambda _: 1.0), max_grad_norm=1e-3)
    g = torch.Generator().manual_seed(0)
    _, norm = step([MicroBatch(torch.randn(1, 128, 4, 4, generator=g), torch.randn(1, 7, 48, generator=g),
                               torch.randn(1, 128, 4, 4, generator=g), torch.tensor([0.5]))])
    update = torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(params, before)))
    assert norm > 1e-3 and update.item() == pytest.approx(1e-3, rel=1e-3)


def test_8bit_adam_without_bitsandbytes_is_a_clear_error():
    try:
        import bitsandbytes  # noqa: F401
        pytest.skip("bitsandbytes is installed here")
    except ImportError:
        pass
    from flux2lora.train.step import make_optimizer

    with pytest.raises(ValueError, match="use_8bit_adam needs bitsandbytes"):
        make_optimizer([torch.nn.Parameter(torch.zeros(2))], TrainParams(use_8bit_adam=True), torch.device("cpu"))
