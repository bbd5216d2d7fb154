"""Scheduled sampling (rollout), SimpleTuner's experimental feature under its key names (its
documentation/experimental/SCHEDULED_SAMPLING.md; behaviour learnt from that text, no code taken).

Off unless `scheduled_sampling_max_step_offset` > 0 and a probability can be above 0. Then, for each sample of a
micro-batch, with probability p(step) its noisy input is not the forward process's x_t = (1 - sigma) x0 +
sigma noise but what the model itself makes of a noisier point: k steps (k uniform in 0..max_step_offset) further
up the training schedule's grid of `ROLLOUT_GRID` timesteps (FLUX.2's num_train_timesteps: one step is 1/1000 of
sigma), sigma_src = min(1, sigma + k / 1000), the forward process gives x_src with the same noise, and k Euler
steps of the current model (no gradients: x <- x + (sigma_next - sigma_cur) * v, the FLUX.2 scheduler's own update)
bring it down to sigma in k equal steps. The target stays noise - x0 and the loss is the step's usual loss.

p(step): `scheduled_sampling_probability`, or with `scheduled_sampling_ramp_steps` > 0 the linear ramp from
`scheduled_sampling_prob_start` to `scheduled_sampling_prob_end` over that many optimizer steps (SimpleTuner's
defaults 0.0 and 0.5). The solver is Euler's (SimpleTuner's `scheduled_sampling_sampler: euler`; its default unipc
and its dpm / rk4 are not implemented: the importer refuses them and says Euler is used).

The per-sample decisions (rollout or not, k) are drawn by `StepDraws.draw` from the run's checkpointed generator,
after every other draw of the micro-batch and only while the feature is on: with it off the draws, and so the run,
are exactly today's, and a resumed run rolls out exactly what the uninterrupted one did. The rollout's forwards run
the bare transformer (no TREAD routing, no checkpointing wrappers), in the training's mixed precision.
"""

from __future__ import annotations

import torch

from .forward import predict

ROLLOUT_GRID = 1000  # FlowMatchEulerDiscreteScheduler's num_train_timesteps in FLUX.2's scheduler config


def enabled(cfg) -> bool:
    """Whether scheduled sampling can roll anything out (and so draws its decisions)."""
    if cfg.scheduled_sampling_max_step_offset <= 0:
        return False
    if cfg.scheduled_sampling_ramp_steps > 0:
        return max(cfg.scheduled_sampling_prob_start, cfg.scheduled_sampling_prob_end) > 0
    return cfg.scheduled_sampling_probability > 0


def probability(cfg, step: int) -> float:
    """p at optimizer step `step` (0-based)."""
    if cfg.scheduled_sampling_ramp_steps > 0:
        progress = min(1.0, step / cfg.scheduled_sampling_ramp_steps)
        start, end = cfg.scheduled_sampling_prob_start, cfg.scheduled_sampling_prob_end
        return start + (end - start) * progress
    return cfg.scheduled_sampling_probability


def draw_offsets(cfg, batch: int, step: int, generator: torch.Generator) -> torch.Tensor:
    """Per sample the rollout length k (B,) int64, 0 for a sample trained on the forward process."""
    rolled = torch.rand(batch, generator=generator) < probability(cfg, step)
    k = torch.randint(0, cfg.scheduled_sampling_max_step_offset + 1, (batch,), generator=generator)
    return torch.where(rolled, k, torch.zeros_like(k))


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Tokens (B, h*w, C) -> latents (B, C, h, w): the inverse of `latents.pack`."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], height, width)


def source_sigmas(sigmas: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    return (sigmas + offsets.to(sigmas.dtype) / ROLLOUT_GRID).clamp(max=1.0)


@torch.no_grad()
def rollout_inputs(model, batch, offsets: torch.Tensor, autocast_dtype: torch.dtype | None,
                   dtype: torch.dtype) -> torch.Tensor:
    """The noisy input (B, 128, h, w) of a micro-batch with rollout lengths `offsets` (B,): the forward process for
    k = 0, the model's own k Euler steps from sigma_src down to sigma otherwise (see the module docstring).

    model: a `TrainingModel` without routing; batch: a `step.MicroBatch` (x0, noise, sigmas, prompt embeddings,
    guidance, references on the device)."""
    x0, noise, sigmas = batch.x0, batch.noise, batch.sigmas
    s = sigmas.view(-1, 1, 1, 1)
    noisy = (1.0 - s) * x0 + s * noise
    offsets = offsets.to(sigmas.device)
    rolled = torch.nonzero(offsets > 0).flatten()
    if rolled.numel() == 0:
        return noisy
    device, (height, width) = x0.device, x0.shape[-2:]
    k = offsets[rolled]
    start = source_sigmas(sigmas[rolled], k)
    step_size = (start - sigmas[rolled]) / k.to(start.dtype)  # k equal steps down to sigma
    s_src = start.view(-1, 1, 1, 1)
    x = (1.0 - s_src) * x0[rolled] + s_src * noise[rolled]
    for i in range(int(k.max())):
        active = torch.nonzero(k > i).flatten()
        current = start[active] - i * step_size[active]
        following = torch.where(k[active] == i + 1, sigmas[rolled][active], current - step_size[active])
        index = rolled[active]
        references = None if batch.references is None else [batch.references[j] for j in index.tolist()]
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            velocity = predict(model, x[active], batch.prompt_embeds[index], current,
                               None if batch.guidance is None else batch.guidance[index], references, dtype=dtype)
        x[active] = x[active] + (following - current).view(-1, 1, 1, 1) * unpack(velocity.float(), height, width)
    noisy[rolled] = x
    return noisy


def rollout_model(transformer, cfg, accelerator=None):
    """The model the rollouts run (the bare transformer's forward), or None when scheduled sampling is off."""
    from ..errors import UserError
    from .model import TrainingModel

    if not enabled(cfg):
        return None
    if accelerator is not None and accelerator.distributed_type.value == "FSDP":
        # each process rolls out its own samples a different number of steps; FSDP's forwards are collectives
        raise UserError("train.scheduled_sampling_max_step_offset with FSDP (runtime.accelerate_config) is not "
                        "supported: train on one process or with DDP, or set it to 0")
    return TrainingModel(transformer)


def apply_rollouts(micro_batches, model, autocast_dtype: torch.dtype | None, dtype: torch.dtype) -> None:
    """Set each micro-batch's noisy input from its drawn rollout lengths (micro-batches without draws: untouched)."""
    for batch in micro_batches:
        if batch.rollout_offsets is not None:
            batch.noisy = rollout_inputs(model, batch, batch.rollout_offsets, autocast_dtype, dtype)
