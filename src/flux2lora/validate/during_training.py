"""Validation during training: every `validate.validation_step_interval` steps, the validation prompts rendered with
the LoRA being trained, beside the base model's images, as a grid logged to MLflow at that step.

The pipeline is built around the transformer being trained (no second copy of the weights) with the VAE and
scheduler loaded once; the text encoder is never loaded (prompts come from the encode-text cache). The base model's
images are the same transformer with the adapter disabled, rendered once per process. Validation leaves training
exactly as it found it - train mode, requires_grad, LoRA scaling and every random number generator - so a run with
validation ends with the same LoRA as one without.

The final step is not rendered here: the `validate` stage renders the finished LoRA into `validation/` (a DVC
output) and logs it to the same run at step = max_train_steps.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from ..config import Params
from ..layout import layout_for
from ..models import load_generation_pipeline
from .images import Images, comparison_grid, load_cached_prompts, log_validation, render_all

log = logging.getLogger(__name__)


@contextmanager
def inference_state(transformer, device: torch.device):
    """Eval mode for the duration; afterwards restore train mode, requires_grad, the adapter's enabled state and
    scaling, and the CPU (and current CUDA) RNG state, whatever happened inside."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    was_training = transformer.training
    grads = [(p, p.requires_grad) for p in transformer.parameters()]
    # diffusers scales LoRA layers in place for `attention_kwargs={"scale": s}` and divides back afterwards; a
    # multiply-divide round trip is not always exact in floating point, so the exact values are restored.
    scalings = [(m, dict(m.scaling)) for m in transformer.modules() if isinstance(m, BaseTunerLayer)]
    rng_devices = [torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices):
        transformer.eval()
        try:
            yield
        finally:
            transformer.enable_adapters()
            for module, scaling in scalings:
                module.scaling.update(scaling)
            for param, requires_grad in grads:
                param.requires_grad_(requires_grad)
            transformer.train(was_training)


class TrainingValidator:
    """Renders and logs validation images from inside the training loop (see the module docstring)."""

    def __init__(self, params: Params, root: Path, transformer, device: torch.device):
        self.params, self.transformer, self.device = params, transformer, device
        self.interval = params.validate_.validation_step_interval or 0
        self.max_steps = params.train.max_train_steps
        # Read now so that a missing or stale text cache fails before hours of training, not at the first step.
        self.prompts = load_cached_prompts(layout_for(root, params.output_dir), device, transformer.dtype)
        self._pipe = None
        self._base: Images | None = None

    @classmethod
    def for_training(cls, params: Params, root: Path, transformer, device: torch.device) -> TrainingValidator | None:
        """A validator when `validation_step_interval` is set (> 0), else None."""
        if not params.validate_.validation_step_interval:
            return None
        return cls(params, root, transformer, device)

    def due(self, step: int) -> bool:
        """True after every `interval`-th step, except the last step (the validate stage renders that one)."""
        return self.interval > 0 and step % self.interval == 0 and step < self.max_steps

    def pipeline(self):
        """The flavour's pipeline around the transformer being trained; VAE and scheduler loaded on first use."""
        if self._pipe is None:
            self._pipe = load_generation_pipeline(self.params.model, self.device, transformer=self.transformer)
        return self._pipe

    def run(self, step: int, mlflow) -> None:
        """Render with the current LoRA (and, the first time, without it) and log the grid and images at `step`."""
        t0 = time.perf_counter()
        scale = self.params.validate_.validation_lora_scale
        pipe = self.pipeline()
        with inference_state(self.transformer, self.device):
            new_base = self._base is None
            if new_base:
                self.transformer.disable_adapters()
                self._base = render_all(pipe, self.params, self.prompts)
                self.transformer.enable_adapters()
            lora = render_all(pipe, self.params, self.prompts, lora_scale=scale)
        grid = comparison_grid(self._base, lora, scale, step)
        log_validation(mlflow, step, grid, lora, self._base if new_base else None)
        elapsed = time.perf_counter() - t0
        mlflow.log_metric("validation_time_s", elapsed, step=step)
        log.info("validation at step %d: %d images in %.1fs", step, len(lora) * (2 if new_base else 1), elapsed)
