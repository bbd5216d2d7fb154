"""The optimizer of the LoRA parameters (`train.optimizer`), each from a maintained package, never hand-written.

- `adamw` (default): torch's AdamW, fused kernels on CUDA and CPU (foreach elsewhere).
- `adamw8bit`: bitsandbytes' AdamW8bit (8-bit optimizer states for tensors of 4096+ elements; smaller ones keep
  32-bit states, bitsandbytes' min_8bit_size). `train.use_8bit_adam: true` is the older name of this choice.
- `adamw_bf16`: torch-optimi's AdamW on bfloat16 adapter weights with Kahan summation (optimi's low-precision
  recipe: the compensation buffer keeps the updates that bf16 rounding would lose). The adapter's weights, their
  gradients and the optimizer states are bf16, so the checkpoints and the LoRA file hold bf16 weights. SimpleTuner's
  `adamw_bf16` trains bf16 weights too, with stochastic rounding instead of Kahan summation.
- `lion`, `stableadamw`: torch-optimi's Lion and StableAdamW (fp32 adapter weights). Lion has no epsilon and wants a
  learning rate 3-10x below AdamW's.
- `prodigy`: prodigyopt's Prodigy, which estimates the step size itself: learning_rate is a multiplier (1.0 is
  Prodigy's recommended value).

Every one takes learning_rate, (adam_beta1, adam_beta2) and adam_weight_decay (decoupled); AdamW-style ones also
adam_epsilon. Their state (torch's state_dict, Prodigy's d estimate in the param groups, optimi's Kahan buffers,
bitsandbytes' quantisation state) is checkpointed with the rest of the training state, so a resumed run continues
exactly.
"""

from __future__ import annotations

import torch

OPTIMIZERS = ("adamw", "adamw8bit", "adamw_bf16", "lion", "stableadamw", "prodigy")
PACKAGES = {"adamw8bit": ("bitsandbytes", "bitsandbytes"), "adamw_bf16": ("optimi", "torch-optimi"),
            "lion": ("optimi", "torch-optimi"), "stableadamw": ("optimi", "torch-optimi"),
            "prodigy": ("prodigyopt", "prodigyopt")}


def optimizer_name(cfg) -> str:
    """train.optimizer, with the older `use_8bit_adam: true` meaning adamw8bit."""
    return "adamw8bit" if getattr(cfg, "use_8bit_adam", False) else cfg.optimizer


def _package(name: str):
    import importlib

    module, distribution = PACKAGES[name]
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ValueError(f"train.optimizer {name} needs the {distribution} package: pip install {distribution} "
                         "(or pip install 'flux2lora[optimizers]')") from None


def build_optimizer(lora_params: list[torch.nn.Parameter], cfg, device: torch.device) -> torch.optim.Optimizer:
    """The optimizer of `optimizer_name(cfg)` over the LoRA parameters (fp32 master weights; adamw_bf16 turns them
    into bf16 here, before the optimizer sees them)."""
    name = optimizer_name(cfg)
    lr, betas, decay, eps = cfg.learning_rate, (cfg.adam_beta1, cfg.adam_beta2), cfg.adam_weight_decay, \
        cfg.adam_epsilon
    if name == "adamw":
        # fused kernels exist for CUDA and CPU; elsewhere (mps, xpu builds without them) the foreach implementation
        return torch.optim.AdamW(lora_params, lr=lr, betas=betas, weight_decay=decay, eps=eps,
                                 fused=device.type in ("cuda", "cpu"))
    package = _package(name)
    if name == "adamw8bit":
        return package.optim.AdamW8bit(lora_params, lr=lr, betas=betas, weight_decay=decay, eps=eps)
    if name == "prodigy":
        return package.Prodigy(lora_params, lr=lr, betas=betas, weight_decay=decay, eps=eps, decouple=True)
    if name == "adamw_bf16":
        for p in lora_params:
            p.data = p.data.to(torch.bfloat16)
        return package.AdamW(lora_params, lr=lr, betas=betas, weight_decay=decay, eps=eps, kahan_sum=True)
    if name == "lion":
        return package.Lion(lora_params, lr=lr, betas=betas, weight_decay=decay)
    if name == "stableadamw":
        return package.StableAdamW(lora_params, lr=lr, betas=betas, weight_decay=decay, eps=eps)
    raise ValueError(f"train.optimizer: unknown optimizer {name!r} (one of {', '.join(OPTIMIZERS)})")
