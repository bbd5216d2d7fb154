"""One optimisation step of LoRA training, shared by the train stage and `bench/train_step.py`.

Flow matching: x_t = (1 - sigma) * x0 + sigma * noise; the transformer predicts noise - x0 (target tokens only);
MSE loss; gradients accumulated over `gradient_accumulation_steps` micro-batches, clipped (by total norm, or by
value: each element clamped), then AdamW and the LR schedule step once.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ..config import TrainParams
from ..errors import UserError
from ..latents import pack
from .forward import predict
from .timesteps import shift_sigmas, weighted_flow_loss


def sample_sigmas(cfg: TrainParams, batch: int, generator: torch.Generator,
                  image_seq_len: int | None = None) -> torch.Tensor:
    """sigma in (0, 1) per sample: diffusers' density sampling, then train.timestep_shift (static, or FLUX.2's
    resolution-dependent shift for `image_seq_len` image tokens: `timesteps.shift_sigmas`)."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    u = compute_density_for_timestep_sampling(cfg.weighting_scheme, batch, logit_mean=cfg.logit_mean,
                                              logit_std=cfg.logit_std, mode_scale=cfg.mode_scale,
                                              generator=generator)
    return shift_sigmas(cfg, u, image_seq_len).clamp(1e-5, 1.0)


class TrainingDiverged(UserError, RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept. Running again ends the same way: the
    message names the params to change."""


@dataclass
class MicroBatch:
    """Inputs of one forward/backward: latents (B, 128, h, w), prompt embeddings (B, L, D), noise like x0,
    sigmas (B,), optional dev guidance (B,), optional per-sample reference latents."""

    x0: torch.Tensor
    prompt_embeds: torch.Tensor
    noise: torch.Tensor
    sigmas: torch.Tensor
    guidance: torch.Tensor | None = None
    references: list[list[torch.Tensor]] | None = None
    loss_mask: torch.Tensor | None = None  # (B, h, w) weights per latent token in [0, 1] (mask datasets)
    regularisation: torch.Tensor | None = None  # (B,) bool: target = the base model's prediction (adapter off)
    rollout_offsets: torch.Tensor | None = None  # scheduled sampling: per-sample rollout length (B,), rollout.py
    noisy: torch.Tensor | None = None  # the input x_t when it is not the forward process's (scheduled sampling)


def flow_matching_loss(model, batch: MicroBatch, device: torch.device, autocast_dtype: torch.dtype | None,
                       dtype: torch.dtype, generator: torch.Generator | None = None,
                       loss_weighting: str = "none") -> torch.Tensor:
    """The training objective of one micro-batch, a scalar: x_t = (1 - sigma) * x0 + sigma * noise, the model's
    prediction for x_t against noise - x0, MSE over every element (target tokens only). Training and the
    evaluation loss both compute it here, so they score the same objective.

    autocast_dtype: mixed precision's (None: float32); dtype: the transformer's weight dtype. loss_weighting:
    train.loss_weighting (sigma_sqrt / cosmap: diffusers' per-sample weights, `timesteps.weighted_flow_loss`)."""
    s = batch.sigmas.view(-1, 1, 1, 1)
    noisy = (1.0 - s) * batch.x0 + s * batch.noise if batch.noisy is None else batch.noisy
    target = pack(batch.noise - batch.x0).float()
    with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        if batch.regularisation is not None:  # datasets.py: those samples' target is the base model's prediction
            from .datasets import regularisation_target

            target = regularisation_target(model, batch, noisy, target, generator, dtype)
        prediction = predict(model, noisy, batch.prompt_embeds, batch.sigmas, batch.guidance, batch.references,
                             generator, dtype=dtype)
    if loss_weighting != "none" or batch.loss_mask is not None:  # per-sample sigma weights, per-token mask weights
        return weighted_flow_loss(prediction.float(), target, batch.sigmas, loss_weighting, batch.loss_mask)
    return torch.nn.functional.mse_loss(prediction.float(), target)


class TrainingStep:
    """Forward, loss and backward per micro-batch; clip, optimizer, scaler and scheduler once per step.

    model: a `TrainingModel`, the same wrapped by accelerate (DDP / FSDP), or a bare transformer (wrapped here,
    with `router` for TREAD). With an accelerator of several processes, gradients are synchronised once per step
    (not per micro-batch), a non-finite loss on any process stops every process, and the returned loss is the mean
    over processes."""

    def __init__(self, model, lora_params: list[torch.nn.Parameter], optimizer, scheduler, *,
                 mixed_precision: str = "no", max_grad_norm: float = 1.0, router=None, device=None,
                 dtype: torch.dtype | None = None, accelerator=None, grad_clip_method: str = "norm",
                 loss_weighting: str = "none"):
        from .model import TrainingModel

        if hasattr(model, "transformer_blocks"):  # a bare transformer
            model = TrainingModel(model, router)
        self.model, self.lora_params = model, lora_params
        self.optimizer, self.scheduler = optimizer, scheduler
        inner = getattr(model, "module", model)
        self.transformer = inner.transformer
        self.device = device or next(self.transformer.parameters()).device
        self.dtype = dtype or self.transformer.dtype
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=mixed_precision == "fp16")
        self.max_grad_norm = max_grad_norm if max_grad_norm > 0 else float("inf")
        self.clip_by_value = grad_clip_method == "value"
        self.accelerator = accelerator
        self.distributed = accelerator is not None and accelerator.num_processes > 1
        self.loss_weighting = loss_weighting

    def loss(self, batch: MicroBatch, generator: torch.Generator | None = None) -> torch.Tensor:
        """The flow-matching loss of one micro-batch (graph kept for backward)."""
        return flow_matching_loss(self.model, batch, self.device, self.autocast_dtype, self.dtype, generator,
                                  self.loss_weighting)

    def _all_finite(self, loss: torch.Tensor) -> bool:
        finite = torch.isfinite(loss.detach()).to(torch.float32).reshape(1)
        if self.distributed:  # every process must stop together, or the others would wait in the next all-reduce
            torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
        return bool(finite.item())

    def __call__(self, micro_batches: list[MicroBatch], generator: torch.Generator | None = None,
                 step_number: int = 0) -> tuple[float, float]:
        """One optimizer step over the micro-batches; returns (mean loss, grad norm before clipping).

        Raises TrainingDiverged before touching the weights when a loss is not finite."""
        total = torch.zeros((), device=self.device)
        for index, batch in enumerate(micro_batches):
            # DDP: accumulate locally, all-reduce the gradients once, with the last micro-batch's backward
            last = index == len(micro_batches) - 1
            sync = contextlib.nullcontext() if last or not self.distributed else self.accelerator.no_sync(self.model)
            with sync:
                loss = self.loss(batch, generator)
                self.scaler.scale(loss / len(micro_batches)).backward()
            total += loss.detach()
        # One host sync per step, after every backward has been queued (a check before each backward would stall
        # the GPU's queue mid-step); nothing has touched the weights yet.
        if not self._all_finite(total):
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingDiverged(f"loss became {total.item() / len(micro_batches)} at step {step_number}")
        self.scaler.unscale_(self.optimizer)
        # by value, the norm is only measured (returned and logged), then each element is clamped
        max_norm = float("inf") if self.clip_by_value else self.max_grad_norm
        if self.distributed:
            grad_norm = self.accelerator.clip_grad_norm_(self.lora_params, max_norm)
        else:
            # foreach: one fused norm over all LoRA tensors (the default does so only on CUDA)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.lora_params, max_norm, foreach=True)
        if self.clip_by_value and self.max_grad_norm != float("inf"):
            # gradients are already synchronised here, so every process clamps the same values
            torch.nn.utils.clip_grad_value_(self.lora_params, self.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.distributed:
            total = self.accelerator.reduce(total, reduction="mean")
        return float(total) / len(micro_batches), float(grad_norm)

    def state_dict(self) -> dict:
        """Optimizer, scheduler and scaler state. Several processes: the optimizer's full state keyed by parameter
        name (torch.distributed.checkpoint gathers FSDP's shards; a collective, so every process calls this)."""
        return {"optimizer": self._optimizer_state(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if self.distributed:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(self.model, getattr(self.optimizer, "optimizer", self.optimizer),
                                     state["optimizer"], options=StateDictOptions(full_state_dict=True))
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])

    def _optimizer_state(self) -> dict:
        if not self.distributed:
            return self.optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(self.model, getattr(self.optimizer, "optimizer", self.optimizer),
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def make_optimizer(lora_params, cfg, device: torch.device):
    """The optimizer of train.optimizer over the LoRA parameters (`optimizers.build_optimizer`)."""
    from .optimizers import build_optimizer

    return build_optimizer(lora_params, cfg, device)
