"""The transformer as the training step calls it: the plain diffusers forward, or our block loop when TREAD routes
tokens, when only some blocks are checkpointed (memory-budget mode) or when blocks are compiled (regional compile).

`TrainingModel` is an `nn.Module` whose only registered child is the transformer, so accelerate can wrap it in DDP
or FSDP and their hooks see every forward, whichever path runs inside. Checkpointing and compilation are applied
by `BlockCall` wrappers kept outside the module tree: parameter names, LoRA state dicts and checkpoints are those
of the bare transformer.

Regional compile compiles one `BlockCall` per block; with checkpointing on, `torch.utils.checkpoint` runs *inside*
the compiled region (dynamo captures it as a higher-order op and AOTAutograd recomputes the block in the compiled
backward). The anchors' crash came from the other arrangement, diffusers' checkpoint function calling compiled
blocks from eager code with peft LoRA layers inside.
"""

from __future__ import annotations

import logging
import math

import torch

from .tread import BlockLoop, parse_routes

log = logging.getLogger(__name__)


class BlockCall(torch.nn.Module):
    """Runs one transformer block with positional arguments, checkpointed (non-reentrant) when `checkpoint` is set
    and gradients are on."""

    def __init__(self, block: torch.nn.Module, checkpoint: bool):
        super().__init__()
        self.block, self.checkpoint = block, checkpoint

    def forward(self, *args):
        if self.checkpoint and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self.block, *args, use_reentrant=False)
        return self.block(*args)


class TrainingModel(torch.nn.Module):
    """forward(generator=..., **transformer inputs) -> (B, N_img, C) prediction."""

    def __init__(self, transformer, router: BlockLoop | None = None, block_calls: list[BlockCall] | None = None):
        super().__init__()
        self.transformer = transformer
        self.router = router
        # a plain list: the wrappers must not become submodules (their parameters are the transformer's)
        self.__dict__["block_calls"] = block_calls

    def forward(self, generator: torch.Generator | None = None, **inputs) -> torch.Tensor:
        if self.router is None:
            return self.transformer(**inputs, return_dict=False)[0]
        return self.router.forward(self.transformer, generator=generator, block_calls=self.block_calls, **inputs)


def num_blocks(transformer) -> int:
    return len(transformer.transformer_blocks) + len(transformer.single_transformer_blocks)


def blocks_to_checkpoint(params, transformer) -> int:
    """How many blocks (from the first) to checkpoint: all or none (gradient_checkpointing), the configured
    gradient_checkpointing_blocks, or in memory-budget mode the planner's fewest blocks that fit vram_budget_gib."""
    cfg, total = params.train, num_blocks(transformer)
    if cfg.vram_budget_gib is not None:
        from ..planner import checkpointed_share_for_budget, plan_from_params

        share = checkpointed_share_for_budget(plan_from_params(params), cfg.vram_budget_gib)
        if share is None:
            raise ValueError(f"train.vram_budget_gib={cfg.vram_budget_gib}: even with every block checkpointed the "
                             "run is predicted not to fit; lower the resolution or batch, or quantize the base "
                             "(train.base_model_precision) — `flux2lora plan --vram` proposes a configuration")
        count = math.ceil(share * total - 1e-9)
        log.info("memory-budget mode: checkpointing %d of %d blocks to fit %.1f GiB", count, total,
                 cfg.vram_budget_gib)
        return count
    if not cfg.gradient_checkpointing:
        return 0
    return total if cfg.gradient_checkpointing_blocks is None else min(cfg.gradient_checkpointing_blocks, total)


def build_training_model(params, transformer) -> TrainingModel:
    """The transformer wrapped for training with the configured TREAD routes, checkpointing and compilation."""
    cfg = params.train
    total = num_blocks(transformer)
    checkpointed = blocks_to_checkpoint(params, transformer)
    routes = parse_routes(cfg.tread_config)
    if cfg.compile_transformer and cfg.enable_group_offload:
        raise ValueError("train.compile_transformer and train.enable_group_offload cannot be combined: the offload "
                         "hooks move weights from inside the compiled blocks; choose one")
    # The last block is never checkpointed: its recompute would run first thing in the backward, while its
    # activations would be rebuilt anyway, so checkpointing it costs a block's forward and saves no peak memory.
    checkpointed = min(checkpointed, total - 1)
    if not cfg.compile_transformer and checkpointed == 0:
        return TrainingModel(transformer, BlockLoop(routes, total) if routes else None)  # diffusers' forward
    blocks = list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)
    calls = [BlockCall(block, index < checkpointed) for index, block in enumerate(blocks)]
    if cfg.compile_transformer:
        # One graph per block type (and checkpointing choice), shared by all blocks of that type: dynamo treats
        # the blocks' parameters as inputs. TREAD changes token counts inside routed spans: dynamic shapes there.
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        for call in calls:
            call.compile(backend=cfg.compile_backend)
    return TrainingModel(transformer, BlockLoop(routes, total), calls)
