"""EMA of the adapter weights (`train.use_ema`, SimpleTuner's names): diffusers' `EMAModel` over the LoRA parameters
only (the frozen base has nothing to average).

Every `ema_update_interval` optimizer steps the shadow weights move towards the trained ones with diffusers' decay
schedule: the n-th update uses decay min(ema_decay, n / (n + 9)) (0 for the first, which copies the weights), i.e.
shadow <- shadow - (1 - decay) * (shadow - weights). The shadow and its update count are checkpointed, so a resumed
run continues the same average. With `ema_export: ema` (the default) the evaluation loss, validation images during
training and the LoRA file all use the EMA weights (swapped in and the trained weights copied back bit for bit);
`ema_export: raw` keeps the EMA in the checkpoints only and writes the trained weights.
"""

from __future__ import annotations

import contextlib

import torch


class AdapterEMA:
    """The EMA of `lora_params` (see the module docstring); `for_training` builds it when train.use_ema is on."""

    def __init__(self, lora_params: list[torch.nn.Parameter], cfg):
        from diffusers.training_utils import EMAModel

        self.params = list(lora_params)
        self.interval = cfg.ema_update_interval
        self.exported = cfg.ema_export == "ema"
        self.model = EMAModel(self.params, decay=cfg.ema_decay, foreach=True)

    @classmethod
    def for_training(cls, lora_params, cfg) -> AdapterEMA | None:
        return cls(lora_params, cfg) if cfg.use_ema else None

    def after_step(self, step: int) -> None:
        """Update the shadow after optimizer step `step` (1-based) when it is an update step."""
        if step % self.interval == 0:
            self.model.step(self.params)

    @contextlib.contextmanager
    def exported_weights(self):
        """The weights the stage exports in the LoRA parameters for the duration (EMA with ema_export: ema),
        the trained weights restored exactly afterwards."""
        if not self.exported:
            yield
            return
        self.model.store(self.params)
        self.model.copy_to(self.params)
        try:
            yield
        finally:
            self.model.restore(self.params)

    def export(self) -> None:
        """Put the exported weights into the LoRA parameters for good (before the LoRA file is written)."""
        if self.exported:
            self.model.copy_to(self.params)

    def state_dict(self) -> dict:
        return {"ema": self.model.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if "ema" in state:
            self.model.load_state_dict(state["ema"])
            self.model.to(self.params[0].device)  # checkpoints load on the CPU
