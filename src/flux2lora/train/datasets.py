"""The training objective of masked and regularisation datasets (SimpleTuner's `conditioning_type: mask` and
`is_regularisation_data`).

- A **mask** weights each target token's squared error by its mask value m in [0, 1] (`cache.masks`: the share of
  the token's 16x16 pixels the mask keeps): loss = mean over samples, tokens and channels of m * (pred - target)^2,
  so a sample without a mask (m = 1) scores as in plain training, and a masked-out region teaches nothing.
- A **regularisation** sample's target is the base model's own prediction for the same noisy input, prompt, sigma
  and references, with the adapter disabled (peft's adapter layers switched off, as peft's `disable_adapter()`
  context does for a PeftModel; here through diffusers' `disable_adapters()` on the transformer the LoRA was
  injected into), computed without gradients: the LoRA is pulled back towards the base on such data (prior
  preservation) instead of towards the images. With TREAD the base forward routes the same tokens as the step's own
  (a copy of its routing generator).
"""

from __future__ import annotations

import contextlib

import torch

from ..latents import pack
from .forward import predict


def _transformer(model):
    """The diffusers transformer inside a TrainingModel (possibly wrapped by DDP / FSDP) or a bare one."""
    inner = getattr(model, "module", model)
    return getattr(inner, "transformer", inner)


@contextlib.contextmanager
def adapters_disabled(model):
    """The model predicts as its base: every peft adapter layer of its transformer off, back on afterwards."""
    transformer = _transformer(model)
    transformer.disable_adapters()
    try:
        yield
    finally:
        transformer.enable_adapters()


def base_prediction(model, noisy: torch.Tensor, batch, generator: torch.Generator | None,
                    dtype: torch.dtype) -> torch.Tensor:
    """The base model's prediction (B, h*w, 128) for the batch's noisy latents, adapter disabled, no gradient."""
    copy = None
    if generator is not None:
        copy = torch.Generator(device=generator.device)
        copy.set_state(generator.get_state())
    with torch.no_grad(), adapters_disabled(model):
        return predict(model, noisy, batch.prompt_embeds, batch.sigmas, batch.guidance, batch.references, copy,
                       dtype=dtype)


def masked_mse(prediction: torch.Tensor, target: torch.Tensor, loss_mask: torch.Tensor | None) -> torch.Tensor:
    """mean(m * (prediction - target)^2) over (B, h*w, C) tokens; loss_mask (B, h, w) gives m per token (None: 1)."""
    squared = (prediction.float() - target.float()) ** 2
    if loss_mask is None:
        return squared.mean()
    weights = pack(loss_mask.unsqueeze(1).float())  # (B, h*w, 1): the tokens' order of pack()
    return (squared * weights).mean()


def weighted_objective(model, batch, noisy: torch.Tensor, generator: torch.Generator | None,
                       dtype: torch.dtype) -> torch.Tensor:
    """flow_matching_loss for a micro-batch with masks and/or regularisation samples (called inside its autocast)."""
    target = pack(batch.noise - batch.x0).float()
    if batch.regularisation is not None and bool(batch.regularisation.any()):
        base = base_prediction(model, noisy, batch, generator, dtype).float()
        target = torch.where(batch.regularisation.view(-1, 1, 1).to(target.device), base, target)
    prediction = predict(model, noisy, batch.prompt_embeds, batch.sigmas, batch.guidance, batch.references,
                         generator, dtype=dtype)
    return masked_mse(prediction, target, batch.loss_mask)
