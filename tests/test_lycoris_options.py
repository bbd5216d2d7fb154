"""LoKr and LoHa (train.lora_type) with the training engine's speed and memory options, one loss and backward each
on tiny klein-4b (fp32, CPU), against the same step with the option off.

- regional torch.compile (compile_transformer, backend aot_eager: dynamo capture and compiled autograd without
  code generation, as tests/test_memory_options.py does for LoRA): loss within rtol 1e-5 / atol 1e-6 and gradients
  within rtol 1e-4 / atol 1e-6 of eager's (the same tolerances as LoRA's test);
- group offload of the frozen base (diffusers hooks; on CPU the onload device is the CPU): loss and gradients
  bitwise equal to without it;
- TREAD routing (tread_config): the adapter's layers inside the routed span still get gradients (every LoKr / LoHa
  factor), and the loss differs from the unrouted step's (the routing took effect). With routing there is no
  equality to expect: routed tokens skip blocks by design.
Kill-and-resume, DDP, quantized bases and the pipeline for these kinds: tests/test_lycoris*.py.
"""

from __future__ import annotations

import pytest
import torch

from flux2lora.config import ModelParams

KINDS = ("lokr", "loha")
TREAD = {"routes": [{"selection_ratio": 0.5, "start_layer_idx": 1, "end_layer_idx": -1}]}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> ModelParams:
    from flux2lora.tiny import make_tiny_model

    folder = make_tiny_model(tmp_path_factory.mktemp("m") / "model", "klein-4b")
    return ModelParams(model_flavour="tiny-klein-4b", pretrained_model_name_or_path=str(folder),
                       base_model_default_dtype="fp32")


def loss_and_grads(tiny: ModelParams, kind: str, group_offload: dict | None = None, preset: str = "all", **train):
    """One flow-matching loss and its gradients for the adapter's factors (fixed random values, none zero) on the
    modules of `preset`."""
    from flux2lora.config import Params
    from flux2lora.models import load_training_transformer
    from flux2lora.train.lora import add_lora, target_modules
    from flux2lora.train.model import build_training_model
    from flux2lora.train.step import MicroBatch, TrainingStep

    torch._dynamo.reset()
    torch.manual_seed(0)
    transformer = load_training_transformer(tiny, torch.device("cpu"), group_offload=group_offload)
    factors = add_lora(transformer, 2, 4, 0.0, target_modules(transformer, preset), kind=kind)
    for p in factors:
        p.data.normal_(0, 0.05, generator=torch.Generator().manual_seed(p.numel()))
    params = Params(model=tiny, train={"lora_type": kind, "gradient_checkpointing": False, "mixed_precision": "no",
                                       **train})
    model = build_training_model(params, transformer)
    optimizer = torch.optim.SGD(factors, lr=0.0)
    step = TrainingStep(model, factors, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0),
                        max_grad_norm=0)
    g = torch.Generator().manual_seed(0)
    batch = MicroBatch(torch.randn(1, 128, 4, 4, generator=g), torch.randn(1, 7, 48, generator=g),
                       torch.randn(1, 128, 4, 4, generator=g), torch.tensor([0.5]))
    loss = step.loss(batch, torch.Generator().manual_seed(1))
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in factors]


@pytest.fixture(scope="module")
def eager(tiny):
    return {kind: loss_and_grads(tiny, kind) for kind in KINDS}


@pytest.mark.parametrize("kind", KINDS)
def test_regional_compile_trains_like_eager(tiny, kind):
    """On the `tiny` preset's modules (q/k/v and the single blocks' fused projection: LoKr / LoHa layers in both
    block types, with less to trace than `all`)."""
    reference = loss_and_grads(tiny, kind, preset="tiny")
    loss, grads = loss_and_grads(tiny, kind, preset="tiny", compile_transformer=True, compile_backend="aot_eager")
    torch.testing.assert_close(loss, reference[0], rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, reference[1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_group_offload_gives_the_same_step(tiny, eager, kind):
    loss, grads = loss_and_grads(tiny, kind, group_offload={"blocks_per_group": 1}, enable_group_offload=True)
    assert torch.equal(loss, eager[kind][0])
    assert all(torch.equal(a, b) for a, b in zip(grads, eager[kind][1]))


@pytest.mark.parametrize("kind", KINDS)
def test_tread_routing_trains_every_factor(tiny, eager, kind):
    loss, grads = loss_and_grads(tiny, kind, tread_config=TREAD)
    assert torch.isfinite(loss) and not torch.equal(loss, eager[kind][0])
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
