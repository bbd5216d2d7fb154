"""Which sigmas a step trains at and how their losses are weighted: `train.timestep_shift` and `train.loss_weighting`.

Sampling: u from diffusers' `compute_density_for_timestep_sampling` (train.weighting_scheme: logit_normal /
uniform / mode), then a shift towards high noise:

- a number s: sigma = s*u / (1 + (s-1)*u), the static shift (SimpleTuner's flow_schedule_shift);
- `auto`: the resolution-dependent shift FLUX.2's pipelines apply at inference (diffusers' Flux2Pipeline and
  Flux2KleinPipeline with the scheduler's use_dynamic_shifting): mu = `compute_empirical_mu(image_seq_len,
  num_steps)` of the batch's image token count (H/16 * W/16) and `train.timestep_shift_inference_steps` (the
  pipelines' default, 50), then the scheduler's exponential `time_shift(mu, 1, u)` = e^mu / (e^mu + 1/u - 1), which
  is the static shift with s = e^mu. Both are diffusers' own functions, called here, not copies. At 512x512
  (1024 tokens) and 50 steps s is ~5.5; at 1024x1024 (4096 tokens) ~7.6; above 4300 tokens mu no longer depends
  on the step count (diffusers' formula).

Weighting (`train.loss_weighting`): `none` keeps the plain MSE over every element; `sigma_sqrt` (sigma^-2) and
`cosmap` (2 / (pi * (1 - 2 sigma + 2 sigma^2))) are diffusers' `compute_loss_weighting_for_sd3`, applied as
diffusers' training examples apply it: the per-sample mean of weight * squared error, then the batch mean.
"""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=1)
def _dynamic_scheduler():
    # FLUX.2's scheduler shifts exponentially when use_dynamic_shifting is on (the published scheduler configs)
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="exponential")


def empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """FLUX.2's mu for an image of `image_seq_len` tokens sampled in `num_steps` steps (diffusers' function)."""
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

    return compute_empirical_mu(image_seq_len=int(image_seq_len), num_steps=int(num_steps))


def auto_shift(image_seq_len: int, num_steps: int) -> float:
    """The static shift s equal to FLUX.2's dynamic shift at this token count: e^mu."""
    import math

    return math.exp(empirical_mu(image_seq_len, num_steps))


def shift_sigmas(cfg, u: torch.Tensor, image_seq_len: int | None) -> torch.Tensor:
    """Shifted sigmas (B,) from the sampled u (B,) in (0, 1); `image_seq_len` is needed for `auto`."""
    if cfg.timestep_shift == "auto":
        if not image_seq_len:
            raise ValueError("train.timestep_shift auto needs the batch's image token count")
        mu = empirical_mu(image_seq_len, cfg.timestep_shift_inference_steps)
        return _dynamic_scheduler().time_shift(mu, 1.0, u)
    s = cfg.timestep_shift
    return s * u / (1 + (s - 1) * u)


def weighted_flow_loss(prediction: torch.Tensor, target: torch.Tensor, sigmas: torch.Tensor, weighting: str,
                       loss_mask: torch.Tensor | None = None) -> torch.Tensor:
    """diffusers' weighted flow-matching loss: mean over samples of mean(w(sigma) * m * (prediction - target)^2).

    prediction, target: (B, tokens, channels) float32; sigmas: (B,); weighting: train.loss_weighting ("none": w = 1);
    loss_mask: (B, h, w) per-token weights m in [0, 1] of mask datasets (`train.datasets`; None: m = 1). Every sample
    of a micro-batch has the same token count (one bucket), so the mean of per-sample means is the mean over all."""
    from ..latents import pack

    squared = (prediction - target) ** 2
    if loss_mask is not None:
        squared = squared * pack(loss_mask.unsqueeze(1).float())  # (B, h*w, 1): the tokens' order of pack()
    if weighting != "none":
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        squared = compute_loss_weighting_for_sd3(weighting, sigmas=sigmas.float()).view(-1, 1, 1) * squared
    return squared.reshape(target.shape[0], -1).mean(1).mean()
