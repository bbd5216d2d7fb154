"""`flux2lora plan`: predicted peak GPU memory and relative speed of a training configuration, and the fastest
configuration that fits a memory budget.

An analytic model, calibrated on the measured anchors (`../shared/reference/anchors.md`: H100, batch 1, 512 text
tokens, LoRA rank 16, bf16 base, fp32 LoRA + AdamW):

    peak = base weights + LoRA (weights, grads, AdamW: 16 bytes/param) + activations + fixed overhead
    activations, no checkpointing:  C_BLOCK bytes per (token x hidden) element, for every block
    activations, checkpointing:     each block's bf16 input is kept (2 bytes/element/block) + one block's working set

With C_BLOCK = 44.8 and 0.45 GiB overhead the model reproduces the five anchor peaks within 3%
(`tests/test_planner.py` checks it). Speed is relative to the plain recipe (checkpointing on, bf16): compute
scales with tokens (TREAD removes the skipped share from the routed blocks), checkpointing re-runs the forward
(anchor: 0.372 s vs 0.264 s), int8 weights cost 15% (anchor: 0.427 s), offload is assumed to cost 30%.
The memory of group offload keeps only the blocks being computed on the GPU.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace
from functools import lru_cache

GIB = 2**30
C_BLOCK = 44.8  # activation bytes per (token x hidden) element per block without checkpointing (fitted)
OVERHEAD_GIB = 0.45
WEIGHT_BYTES = {"bf16": 2.0, "fp16": 2.0, "fp32": 4.0, "int8-quanto": 1.02, "fp8-torchao": 1.02, "int4-quanto": 0.53}
# fp8-torchao is weight-only (dequantized to bf16 before each matmul): assumed to cost like int8, not measured
SPEED_COST = {"bf16": 1.0, "fp16": 1.0, "fp32": 2.5, "int8-quanto": 1.15, "fp8-torchao": 1.15, "int4-quanto": 1.35}
CHECKPOINTING_COST = 0.372 / 0.264  # measured: recompute of the forward
COMPILE_SPEEDUP = 0.169 / 0.264  # measured: regional compile without checkpointing against eager
# measured: compile's fused kernels keep fewer activations, 19.6 GiB against 22.7 GiB with ~7.9 GiB of weights
COMPILE_ACTIVATIONS = (19.6 - 7.9) / (22.7 - 7.9)
OFFLOAD_COST = 1.3
LORA_BYTES_PER_PARAM = 16  # fp32 weight + grad + two AdamW moments
# What the planner proposes: settings the trainer implements. Compile is not proposed: its speed-up is measured,
# its memory only without checkpointing.
PROPOSED_PRECISIONS = ("bf16", "fp8-torchao", "int8-quanto", "int4-quanto")


@dataclass(frozen=True)
class Plan:
    flavour: str
    resolution: int
    batch: int
    base_model_precision: str = "bf16"
    gradient_checkpointing: bool = True
    checkpointed_share: float = 1.0  # with gradient_checkpointing: the share of blocks checkpointed (memory budget)
    compile: bool = False  # regional torch.compile
    group_offload: bool = False
    tread_selection_ratio: float = 0.0  # share of image tokens skipping the routed span
    tread_span_share: float = 0.0  # share of blocks inside the routed span
    lora_rank: int = 16
    lora_target: str = "all"  # a flux_lora_target preset, or "recipe": the diffusers example's targets (anchors)
    text_tokens: int = 512


@dataclass(frozen=True)
class Prediction:
    plan: Plan
    peak_gib: float
    relative_step_time: float  # 1.0 = the plain recipe (bf16, checkpointing) at this flavour/resolution/batch
    parts_gib: dict


@lru_cache(maxsize=None)
def _architecture(flavour: str) -> dict:
    """Parameter counts and shapes from the real config, built on the meta device (no memory, no download)."""
    import torch
    from diffusers import Flux2Transformer2DModel

    from .flavours import get_flavour
    from .train.lora import target_modules

    with torch.device("meta"):
        model = Flux2Transformer2DModel(**get_flavour(flavour).full_transformer_config)
    linears = dict(model.named_modules())
    # The diffusers example's default targets, on which the anchors were measured.
    recipe = [n for n in linears if n.endswith(("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                                                 "attn.to_qkv_mlp_proj"))
              or (n.startswith("single_transformer_blocks.") and n.endswith("attn.to_out"))]
    presets = {name: target_modules(model, name) for name in ("all", "attention", "mlp", "tiny")}
    presets["recipe"] = recipe
    return {"params": sum(p.numel() for p in model.parameters()),
            "blocks": len(model.transformer_blocks) + len(model.single_transformer_blocks),
            "hidden": model.config.num_attention_heads * model.config.attention_head_dim,
            "lora_shapes": {name: [(linears[n].in_features, linears[n].out_features) for n in names]
                            for name, names in presets.items()}}


def predict(plan: Plan) -> Prediction:
    """Peak memory (GiB) and step time relative to the plain recipe, for one configuration."""
    arch = _architecture(plan.flavour)
    image_tokens = (plan.resolution // 16) ** 2
    kept = 1.0 - plan.tread_selection_ratio * plan.tread_span_share  # average share of image tokens per block
    tokens = plan.batch * (plan.text_tokens + image_tokens * kept)
    element = tokens * arch["hidden"]
    weights = arch["params"] * WEIGHT_BYTES[plan.base_model_precision] / GIB
    if plan.group_offload:
        weights *= 2 / arch["blocks"]  # the blocks being computed (and prefetched) stay on the GPU
    lora = sum(plan.lora_rank * (i + o) for i, o in arch["lora_shapes"][plan.lora_target]) * LORA_BYTES_PER_PARAM / GIB
    share = plan.checkpointed_share if plan.gradient_checkpointing else 0.0
    checkpointed = round(share * arch["blocks"])
    # a checkpointed block keeps its bf16 input; the others keep everything; one block's working set on top
    per_element = 2 * checkpointed + C_BLOCK * (arch["blocks"] - checkpointed) + (C_BLOCK if checkpointed else 0)
    activations = per_element * element / GIB * (COMPILE_ACTIVATIONS if plan.compile else 1.0)
    parts = {"weights": weights, "lora_and_optimizer": lora, "activations": activations, "overhead": OVERHEAD_GIB}
    full_tokens = plan.batch * (plan.text_tokens + image_tokens)
    time = (tokens / full_tokens) * SPEED_COST[plan.base_model_precision]
    time *= (1 + (CHECKPOINTING_COST - 1) * checkpointed / arch["blocks"]) / CHECKPOINTING_COST
    time *= COMPILE_SPEEDUP if plan.compile else 1.0
    time *= OFFLOAD_COST if plan.group_offload else 1.0
    return Prediction(plan, sum(parts.values()), time, parts)


def candidates(base: Plan) -> list[Plan]:
    """Every memory/speed setting the planner may propose (TREAD stays as configured: it changes training)."""
    out = []
    blocks = _architecture(base.flavour)["blocks"]
    for precision in PROPOSED_PRECISIONS:
        for offload in (False, True):
            out.append(replace(base, base_model_precision=precision, gradient_checkpointing=False,
                               group_offload=offload, checkpointed_share=1.0))
            for checkpointed in range(1, blocks + 1):  # memory-budget mode: the first N blocks
                out.append(replace(base, base_model_precision=precision, gradient_checkpointing=True,
                                   checkpointed_share=checkpointed / blocks, group_offload=offload))
    return out


def checkpointed_share_for_budget(base: Plan, vram_gib: float) -> float | None:
    """Memory-budget mode: the smallest share of blocks to checkpoint (0.0 to 1.0) for `base` (its precision,
    offload and the rest unchanged) to fit `vram_gib`; None when even full checkpointing does not fit."""
    blocks = _architecture(base.flavour)["blocks"]
    for checkpointed in range(blocks + 1):
        plan = replace(base, gradient_checkpointing=checkpointed > 0, checkpointed_share=checkpointed / blocks)
        if predict(plan).peak_gib <= vram_gib:
            return checkpointed / blocks
    return None


def fastest_fitting(base: Plan, vram_gib: float) -> Prediction | None:
    """The fastest candidate whose predicted peak fits in `vram_gib` (None if nothing fits)."""
    fits = [p for p in map(predict, candidates(base)) if p.peak_gib <= vram_gib]
    return min(fits, key=lambda p: (p.relative_step_time, p.peak_gib)) if fits else None


def parse_size(text: str) -> float:
    """"24GiB", "24 GB", "80" -> GiB."""
    match = re.fullmatch(r"\s*([\d.]+)\s*(gib|gb|g)?\s*", text.lower())
    if not match:
        raise ValueError(f"--vram: {text!r} is not a size such as 24GiB")
    value = float(match.group(1))
    return value * 1e9 / GIB if match.group(2) == "gb" else value


def plan_from_params(params) -> Plan:
    """The configured run as a Plan (real flavour of a tiny test flavour, square training resolution)."""
    from .data.config import training_side
    from .train.tread import parse_routes

    flavour = params.model.model_flavour.removeprefix("tiny-")
    cfg = params.train
    routes = parse_routes(cfg.tread_config)
    arch = _architecture(flavour)
    ratio, span = 0.0, 0.0
    if routes:
        spans = [r.span(arch["blocks"]) for r in routes]
        span = sum(e - s + 1 for s, e in spans) / arch["blocks"]
        ratio = sum(r.selection_ratio * (e - s + 1) for r, (s, e) in zip(routes, spans)) / max(
            1, sum(e - s + 1 for s, e in spans))
    precision = cfg.base_model_precision if cfg.base_model_precision != "no_change" else \
        params.model.base_model_default_dtype
    plan = Plan(flavour=flavour, resolution=training_side(params.prepare), batch=cfg.train_batch_size,
                base_model_precision=precision,
                gradient_checkpointing=cfg.gradient_checkpointing,
                checkpointed_share=1.0 if cfg.gradient_checkpointing_blocks is None else
                min(1.0, cfg.gradient_checkpointing_blocks / arch["blocks"]),
                compile=cfg.compile_transformer, group_offload=cfg.enable_group_offload,
                tread_selection_ratio=ratio,
                tread_span_share=span, lora_rank=cfg.lora_rank, lora_target=cfg.flux_lora_target,
                text_tokens=params.encode_text.max_sequence_length)
    if cfg.vram_budget_gib is not None:  # memory-budget mode: what the trainer will checkpoint
        share = checkpointed_share_for_budget(plan, cfg.vram_budget_gib)
        plan = replace(plan, gradient_checkpointing=bool(share), checkpointed_share=1.0 if share is None else share)
    return plan


def as_params(prediction: Prediction) -> dict:
    """The params.yaml settings that make the trainer run `prediction`'s configuration."""
    plan = prediction.plan
    blocks = _architecture(plan.flavour)["blocks"]
    out = {"train.base_model_precision": "no_change" if plan.base_model_precision in ("bf16", "fp16", "fp32")
           else plan.base_model_precision,
           "train.gradient_checkpointing": plan.gradient_checkpointing,
           "train.enable_group_offload": plan.group_offload}
    if plan.gradient_checkpointing and plan.checkpointed_share < 1.0:
        out["train.gradient_checkpointing_blocks"] = round(plan.checkpointed_share * blocks)
    return out


def as_dict(prediction: Prediction) -> dict:
    return {**asdict(prediction.plan), "peak_gib": round(prediction.peak_gib, 2),
            "relative_step_time": round(prediction.relative_step_time, 3),
            "parts_gib": {k: round(v, 2) for k, v in prediction.parts_gib.items()}}
