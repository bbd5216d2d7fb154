"""Timestep options against diffusers: `timestep_shift: auto` is the shift FLUX.2's scheduler applies at inference,
and `loss_weighting` is diffusers' compute_loss_weighting_for_sd3 applied as its training examples apply it."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from flux2lora.config import TrainParams
from flux2lora.train.step import sample_sigmas


def _u(cfg: TrainParams, n: int, seed: int) -> torch.Tensor:
    return compute_density_for_timestep_sampling(cfg.weighting_scheme, n, logit_mean=cfg.logit_mean,
                                                 logit_std=cfg.logit_std, mode_scale=cfg.mode_scale,
                                                 generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("tokens,steps", [(256, 50), (1024, 50), (4096, 28), (6400, 50), (1024, 4)])
def test_auto_shift_is_the_flux2_schedulers_dynamic_shift_at_inference(tokens, steps):
    """The sigmas trained at equal those the FLUX.2 scheduler (the published config, use_dynamic_shifting) makes
    from the same u at inference, with the pipelines' mu = compute_empirical_mu(image_seq_len, num_steps).
    Tolerance: the scheduler shifts in numpy float32, we in torch float32: 1 ulp-ish (rtol 1e-6)."""
    from flux2lora.tiny import _SCHEDULER_CONFIG

    cfg = TrainParams(timestep_shift="auto", timestep_shift_inference_steps=steps)
    ours = sample_sigmas(cfg, 64, torch.Generator().manual_seed(1), image_seq_len=tokens)
    u = _u(cfg, 64, 1)
    scheduler = FlowMatchEulerDiscreteScheduler(**_SCHEDULER_CONFIG)
    scheduler.set_timesteps(sigmas=u.tolist(), mu=compute_empirical_mu(image_seq_len=tokens, num_steps=steps))
    torch.testing.assert_close(ours, scheduler.sigmas[:-1].clamp(1e-5, 1.0), rtol=1e-6, atol=0)
    # it is the static shift with s = e^mu
    s = math.exp(compute_empirical_mu(image_seq_len=tokens, num_steps=steps))
    torch.testing.assert_close(ours, (s * u / (1 + (s - 1) * u)).clamp(1e-5, 1.0), rtol=1e-6, atol=0)


def test_a_static_shift_is_todays_formula_bitwise():
    cfg = TrainParams(timestep_shift=3.0)
    u = _u(cfg, 32, 5)
    expected = (3.0 * u / (1 + 2.0 * u)).clamp(1e-5, 1.0)
    assert torch.equal(sample_sigmas(cfg, 32, torch.Generator().manual_seed(5)), expected)
    assert torch.equal(sample_sigmas(cfg, 32, torch.Generator().manual_seed(5), image_seq_len=4096), expected)


def test_auto_shift_reads_the_batchs_token_count_in_the_draws():
    """StepDraws passes (H/16)*(W/16) of the batch's bucket: a 512x256 bucket trains at 32*16 = 512 tokens."""
    from flux2lora.data.sampling import BucketBatches
    from flux2lora.train.draws import Sample, StepDraws

    cfg = TrainParams(timestep_shift="auto", train_batch_size=2, seed=3)
    samples = [Sample(f"i{k}", f"l{k}", f"t{k}", bucket=(512, 256)) for k in range(2)]
    draws = StepDraws(cfg, BucketBatches(samples, 2, cfg.seed), None, None, "empty", False, torch.device("cpu"))
    drawn = draws.draw(draws.batches.at(0), 0)
    g = torch.Generator().manual_seed(cfg.seed)  # the draw order: dropout, noise, sigmas
    torch.rand(2, generator=g)
    torch.randn((2, 128, 16, 32), generator=g)
    assert torch.equal(drawn.sigmas, sample_sigmas(cfg, 2, g, image_seq_len=512))


def test_config_refuses_a_word_other_than_auto():
    with pytest.raises(ValueError, match="timestep_shift"):
        TrainParams(timestep_shift="dynamic")
    with pytest.raises(ValueError, match="timestep_shift"):
        TrainParams(timestep_shift=0)


@pytest.fixture(scope="module")
def tiny_model():
    from diffusers import Flux2Transformer2DModel

    from flux2lora.flavours import get_flavour

    torch.manual_seed(0)
    return Flux2Transformer2DModel(**get_flavour("tiny-klein-4b").full_transformer_config).eval()


@pytest.mark.parametrize("weighting", ["sigma_sqrt", "cosmap"])
def test_loss_weighting_is_diffusers_weighted_loss(tiny_model, weighting):
    """flow_matching_loss with loss_weighting equals diffusers' examples' loss written out by hand: the per-sample
    mean of compute_loss_weighting_for_sd3(sigma) * (prediction - target)^2, then the batch mean (float32; the same
    prediction, so rtol 1e-6 for the summation order)."""
    from flux2lora.latents import pack
    from flux2lora.train.forward import predict
    from flux2lora.train.model import TrainingModel
    from flux2lora.train.step import MicroBatch, flow_matching_loss

    g = torch.Generator().manual_seed(0)
    batch = MicroBatch(torch.randn(3, 128, 4, 4, generator=g), torch.randn(3, 7, 48, generator=g),
                       torch.randn(3, 128, 4, 4, generator=g), torch.tensor([0.1, 0.5, 0.9]))
    model = TrainingModel(tiny_model)
    with torch.no_grad():
        ours = flow_matching_loss(model, batch, torch.device("cpu"), None, torch.float32, loss_weighting=weighting)
        plain = flow_matching_loss(model, batch, torch.device("cpu"), None, torch.float32)
        s = batch.sigmas.view(-1, 1, 1, 1)
        prediction = predict(model, (1 - s) * batch.x0 + s * batch.noise, batch.prompt_embeds, batch.sigmas, None,
                             None)
        target = pack(batch.noise - batch.x0)
        weights = compute_loss_weighting_for_sd3(weighting, sigmas=batch.sigmas).view(-1, 1, 1)
        by_hand = torch.mean((weights.float() * (prediction.float() - target.float()) ** 2).reshape(3, -1), 1).mean()
    torch.testing.assert_close(ours, by_hand, rtol=1e-6, atol=0)
    assert not torch.isclose(ours, plain)  # the weights change the loss
    assert torch.equal(plain, torch.nn.functional.mse_loss(prediction.float(), target.float()))  # none: as today
