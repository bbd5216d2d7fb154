"""The train stage's learning-rate schedule, built from TrainParams by `build_lr_scheduler`.

Steps are optimizer steps: the scheduler is stepped once after each, so optimizer step k+1 trains with the rate at
step k (step 0: before any update). With several processes each optimizer step still counts once (SimpleTuner
multiplies its periods by the number of processes and steps its scheduler that many times per update: the same
curve per update).

- `constant`, `constant_with_warmup`, `linear`, `cosine`: diffusers' schedules (`get_scheduler`). `cosine` rises
  linearly over lr_warmup_steps, then falls along half a cosine from learning_rate to 0 at the last step; `constant`
  ignores lr_warmup_steps (diffusers' meaning).
- `polynomial`: diffusers' `get_polynomial_decay_schedule_with_warmup`: warmup, then
  (learning_rate - lr_end) * (1 - progress) ** lr_power + lr_end. SimpleTuner's own polynomial is the same formula.
- `cosine_oscillating`: SimpleTuner's `cosine`. No warmup; with T = lr_warmup_steps (SimpleTuner reuses that key as
  the half-period) lr(k) = lr_end + (learning_rate - lr_end) * (1 + cos(pi * k / T)) / 2: down to lr_end at T, back up
  to learning_rate at 2T, and so on for the whole run (the run's length plays no part).
- `sine`: SimpleTuner's `sine`: lr(k) = lr_end + (learning_rate - lr_end) * (1 + sin(pi * k / T)) / 2, T as above:
  it starts half-way, peaks at T/2 and reaches lr_end at 3T/2.

Like SimpleTuner, the last two truncate each rate down to a multiple of 1e-9 (floor(rate * 1e9) / 1e9), so the rates
equal its own to float precision. They are LambdaLRs (state: the step count), so a resumed run continues the curve.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

# The schedules diffusers implements under the same name and meaning.
DIFFUSERS_SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine")
# SimpleTuner's periodic schedules (their period is lr_warmup_steps), implemented here from its documented formula.
PERIODIC_SCHEDULES = ("cosine_oscillating", "sine")


def periodic_rate(name: str, step: int, learning_rate: float, lr_end: float, half_period: int) -> float:
    """The rate of SimpleTuner's `cosine` (name cosine_oscillating) or `sine` at optimizer step `step`, floored to
    1e-9 as SimpleTuner does."""
    phase = math.pi * step / half_period
    wave = math.cos(phase) if name == "cosine_oscillating" else math.sin(phase)
    rate = lr_end + (learning_rate - lr_end) * (1 + wave) / 2
    return math.floor(rate * 1e9) / 1e9


def build_lr_scheduler(optimizer: Optimizer, cfg, total_steps: int) -> LRScheduler:
    """The scheduler of `cfg.lr_scheduler` (TrainParams) over a run of `total_steps` optimizer steps.

    The optimizer's learning rate (one parameter group, cfg.learning_rate) is the schedule's peak."""
    name = cfg.lr_scheduler
    if name in DIFFUSERS_SCHEDULES:
        from diffusers.optimization import get_scheduler

        return get_scheduler(name, optimizer, num_warmup_steps=cfg.lr_warmup_steps, num_training_steps=total_steps)
    if name == "polynomial":
        from diffusers.optimization import get_polynomial_decay_schedule_with_warmup

        return get_polynomial_decay_schedule_with_warmup(optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                                                         num_training_steps=total_steps, lr_end=cfg.lr_end,
                                                         power=cfg.lr_power)
    if name in PERIODIC_SCHEDULES:
        if cfg.lr_warmup_steps < 1:
            raise ValueError(f"train.lr_scheduler {name}: lr_warmup_steps is its half-period and must be >= 1")
        base = optimizer.param_groups[0]["lr"]
        # LambdaLR multiplies the group's base rate by the factor: the factor is the rate over that base
        return LambdaLR(optimizer, lambda step: periodic_rate(name, step, base, cfg.lr_end, cfg.lr_warmup_steps)
                        / base)
    raise ValueError(f"train.lr_scheduler: unknown schedule {name!r}")
