"""The training objective of masked and regularisation datasets (SimpleTuner's `conditioning_type: mask` and
`is_regularisation_data`).

- A **mask** weights each target token's squared error by its mask value m in [0, 1] (`cache.masks`: the share of
  the token's 16x16 pixels the mask keeps): loss = mean over samples, tokens and channels of m * (pred - target)^2,
  so a sample without a mask (m = 1) scores as in plain training, and a masked-out region teaches nothing
  (computed with train.loss_weighting's sigma weights in `timesteps.weighted_flow_loss`).
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


def regularisation_target(model, batch, noisy: torch.Tensor, target: torch.Tensor,
                          generator: torch.Generator | None, dtype: torch.dtype) -> torch.Tensor:
    """The micro-batch's targets (B, h*w, 128) with the regularisation samples' replaced by the base model's
    prediction (called inside the loss's autocast)."""
    if not bool(batch.regularisation.any()):
        return target
    base = base_prediction(model, noisy, batch, generator, dtype).float()
    return torch.where(batch.regularisation.view(-1, 1, 1).to(target.device), base, target)
