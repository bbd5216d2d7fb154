"""Scheduled sampling (rollout): off, the draws and the step are today's bitwise; on, a rolled-out input is what a
hand-run of diffusers' FLUX.2 Euler scheduler over the same steps gives with the same model; the decisions come
from the checkpointed draw order, so a killed-and-resumed run ends bitwise equal."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from helpers import copy_project, make_project, straight_and_faulted
from safetensors.torch import load_file

from flux2lora.config import TrainParams
from flux2lora.data.sampling import BucketBatches
from flux2lora.latents import pack
from flux2lora.train import rollout
from flux2lora.train.draws import Sample, StepDraws
from flux2lora.train.step import MicroBatch

ON = dict(scheduled_sampling_max_step_offset=6, scheduled_sampling_probability=1.0)


def _draws(cfg: TrainParams) -> StepDraws:
    samples = [Sample(f"i{k}", f"l{k}", f"t{k}", bucket=(64, 64)) for k in range(4)]
    return StepDraws(cfg, BucketBatches(samples, cfg.train_batch_size, cfg.seed), None, None, "empty", False,
                     torch.device("cpu"))


def test_probability_zero_draws_exactly_todays_draws():
    today, zero = _draws(TrainParams(train_batch_size=2)), _draws(TrainParams(
        train_batch_size=2, scheduled_sampling_max_step_offset=10, scheduled_sampling_probability=0.0))
    for index in range(6):
        a, b = today.draw(today.batches.at(index), index), zero.draw(zero.batches.at(index), index)
        assert torch.equal(a.noise, b.noise) and torch.equal(a.sigmas, b.sigmas) and a.dropped == b.dropped
        assert a.rollout is None and b.rollout is None
    assert rollout.rollout_model(None, zero.cfg) is None  # nothing rolls out


def test_ramp_and_offsets():
    cfg = TrainParams(scheduled_sampling_max_step_offset=3, scheduled_sampling_ramp_steps=10,
                      scheduled_sampling_prob_start=0.2, scheduled_sampling_prob_end=0.6)
    assert [round(rollout.probability(cfg, s), 9) for s in (0, 5, 10, 50)] == [0.2, 0.4, 0.6, 0.6]
    assert rollout.enabled(cfg) and not rollout.enabled(TrainParams(scheduled_sampling_probability=1.0))
    k = rollout.draw_offsets(TrainParams(**ON), 4000, 0, torch.Generator().manual_seed(0))
    assert set(k.tolist()) == set(range(7))  # uniform in 0..max_step_offset
    assert torch.equal(rollout.draw_offsets(TrainParams(**{**ON, "scheduled_sampling_probability": 0.0}), 50, 0,
                                            torch.Generator()), torch.zeros(50, dtype=torch.int64))


def test_rollout_decisions_resume_from_the_checkpointed_generator():
    cfg = TrainParams(train_batch_size=2, **ON)
    straight = _draws(cfg)
    drawn = [straight.draw(straight.batches.at(i), i).rollout for i in range(5)]
    first = _draws(cfg)
    for i in range(2):
        first.draw(first.batches.at(i), i)
    resumed = _draws(cfg)
    resumed.load_state_dict(first.state_dict())
    assert all(torch.equal(resumed.draw(resumed.batches.at(i), i).rollout, drawn[i]) for i in range(2, 5))


@pytest.fixture(scope="module")
def model():
    from diffusers import Flux2Transformer2DModel

    from flux2lora.flavours import get_flavour
    from flux2lora.train.model import TrainingModel

    torch.manual_seed(0)
    return TrainingModel(Flux2Transformer2DModel(**get_flavour("tiny-klein-4b").full_transformer_config).eval())


def _batch(n: int = 3) -> MicroBatch:
    g = torch.Generator().manual_seed(0)
    return MicroBatch(torch.randn(n, 128, 4, 6, generator=g), torch.randn(n, 7, 48, generator=g),
                      torch.randn(n, 128, 4, 6, generator=g), torch.tensor([0.3, 0.5, 0.995][:n]))


def test_unpack_inverts_pack():
    x = torch.randn(2, 128, 4, 6)
    assert torch.equal(rollout.unpack(pack(x), 4, 6), x)


def test_no_rollout_is_the_forward_process_and_the_same_step_bitwise(model):
    from flux2lora.train.step import flow_matching_loss

    batch = _batch()
    noisy = rollout.rollout_inputs(model, batch, torch.zeros(3, dtype=torch.int64), None, torch.float32)
    s = batch.sigmas.view(-1, 1, 1, 1)
    assert torch.equal(noisy, (1 - s) * batch.x0 + s * batch.noise)
    with torch.no_grad():
        plain = flow_matching_loss(model, batch, torch.device("cpu"), None, torch.float32)
        batch.noisy = noisy
        assert torch.equal(flow_matching_loss(model, batch, torch.device("cpu"), None, torch.float32), plain)


def test_a_rollout_is_a_hand_run_of_diffusers_euler_scheduler(model):
    """Per sample: diffusers' FlowMatchEulerDiscreteScheduler (no shift) over sigmas sigma_src .. sigma in k equal
    steps, stepped k times with the model's prediction, from the forward process at sigma_src. The 0.995 sample's
    source is clamped to 1. Tolerance: the scheduler keeps its sigmas in float32 via numpy (1e-5 absolute)."""
    batch = _batch()
    offsets = torch.tensor([4, 0, 6])
    ours = rollout.rollout_inputs(model, batch, offsets, None, torch.float32)
    for i, k in enumerate(offsets.tolist()):
        sigma = float(batch.sigmas[i])
        source = min(1.0, sigma + k / 1000)
        x = (1 - source) * batch.x0[i:i + 1] + source * batch.noise[i:i + 1]
        if k:
            scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
            scheduler.set_timesteps(sigmas=torch.linspace(source, sigma, k + 1).tolist())
            for t in scheduler.timesteps[:k]:
                with torch.no_grad():
                    from flux2lora.train.forward import predict

                    v = predict(model, x, batch.prompt_embeds[i:i + 1], (t / 1000).reshape(1), None, None)
                x = scheduler.step(rollout.unpack(v, 4, 6), t, x, return_dict=False)[0]
        torch.testing.assert_close(ours[i:i + 1], x, rtol=0, atol=1e-5)
        if k:
            s = batch.sigmas[i]
            assert not torch.allclose(ours[i], (1 - s) * batch.x0[i] + s * batch.noise[i], atol=1e-4)


RUN = {"train.max_train_steps": 6, "train.checkpointing_steps": 3, "train.train_batch_size": 2,
       "train.learning_rate": 1e-3, "validate.eval_every_n_steps": 0,
       "train.scheduled_sampling_max_step_offset": 3, "train.scheduled_sampling_probability": 0.7}


@pytest.mark.slow
def test_a_rollout_run_killed_and_resumed_ends_bitwise_equal(tmp_path, monkeypatch):
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
    # the rollouts reached training: the same run without them ends elsewhere
    off = copy_project(encoded, tmp_path / "off", **{"train.scheduled_sampling_max_step_offset": 0})
    run_stage("train", off / "params.yaml")
    c = load_file(str(layout_for(off, "outputs").lora_file))
    assert not all(torch.equal(a[k], c[k]) for k in a)
