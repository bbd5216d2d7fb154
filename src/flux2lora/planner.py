"""`flux2lora plan`: predicted GPU memory, host memory and speed of every GPU stage of a configuration (encode-text,
encode-latents, train), and for a memory budget the fastest settings of each stage that fit it.

An analytic model, calibrated on the measured anchors (`../shared/reference/anchors.md`: H100, batch 1, 512 text
tokens, LoRA rank 16, bf16 base, fp32 LoRA + AdamW).

train (peak allocated memory):

    peak = base weights + LoRA (weights, grads, AdamW: 16 bytes/param) + activations + fixed overhead
    activations, no checkpointing:  C_BLOCK bytes per (token x hidden) element, for every block
    activations, checkpointing:     each block's bf16 input is kept (2 bytes/element/block) + one block's working set

With C_BLOCK = 44.8 and 0.45 GiB overhead the model reproduces the five anchor peaks within 3%
(`tests/test_planner.py` checks it). Speed is relative to the plain recipe (checkpointing on, bf16): compute
scales with tokens (TREAD removes the skipped share from the routed blocks), checkpointing re-runs the forward
(anchor: 0.372 s vs 0.264 s), int8 weights cost 15% (anchor: 0.427 s).

Group offload (train.enable_group_offload) is costed from the bytes it moves, not a constant: each step copies the
transformer's weights host -> device twice (the forward, and again for the backward: the hooks offload a block
after its forward and the recompute / backward needs it back), OFFLOAD_PASSES x weight bytes at
`host_bandwidth_gbps`. With `group_offload_use_stream` the copy overlaps compute (step = max(compute, copy)), else it
adds to it. Compute seconds come from the anchors' measured H100 step times, scaled by tokens (a fixed share
FIXED_STEP_SHARE, fitted on klein-4b's 512 and 1024 px anchors, does not scale). Moving dev's 60 GiB twice over
PCIe 4.0 (25 GB/s) takes ~5 s against its 2.2 s step: offload is a last resort, and it is never proposed while a
configuration without it fits.

Headroom: the anchors are `torch.cuda.max_memory_allocated()`; what a GPU must also hold is the CUDA context
(+ cuBLAS/cuDNN handles and kernels outside the caching allocator) and the allocator's reserve above its peak
(fragmentation). Neither is in the anchors (they record allocated memory only), so both are stated, not fitted:
CUDA_CONTEXT_GIB = 0.75 GiB and ALLOCATOR_RESERVE = 10% of the peak (PyTorch's caching allocator typically reserves
5-15% above the peak allocated in training loops). A configuration fits a budget when
peak + headroom(peak) <= budget. `bench/gpu.sh` records reserved memory and the context beside each measured peak
so these two numbers can be calibrated on the first GPU run.

encode-text: the text encoder cut after its deepest stacked layer (no LM head, no vision tower), its weights at
text_encoder_1_precision, plus per token C_TEXT_WORK bytes per (hidden + intermediate) element (working set, fitted
on the Qwen3-4B anchor: 8.2 GiB at batch 16 x 512 tokens, all 28 hidden states kept) and the hidden states
we keep (the stacked layers, captured by hooks, and their stacked copy). Group offload keeps the embeddings and two
decoder layers on the GPU. encode-latents: the VAE (84M parameters) plus activations per pixel, fitted on its
anchor (6.2 GiB at 4 x 1024 px, bf16).

Host RAM (peak resident): HOST_PROCESS_GIB for Python, torch and the CUDA libraries, plus the model being loaded
(every loader builds it in CPU memory first, at its load dtype), plus a pinned copy of everything group offload
keeps in host memory.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, replace
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
LORA_BYTES_PER_PARAM = 16  # fp32 weight + grad + two AdamW moments
# What the planner proposes: settings the trainer implements. Compile is not proposed: its speed-up is measured,
# its memory only without checkpointing. int8 comes before fp8 at equal predicted cost: it is measured (anchor)
# and runs on every GPU (fp8 needs compute capability 8.9+).
PROPOSED_PRECISIONS = ("bf16", "int8-quanto", "fp8-torchao", "int4-quanto")
# Settings no GPU measurement of ours has confirmed yet (bench/gpu.sh measures them): said beside a proposal.
UNMEASURED = {"fp8-torchao": "fp8-torchao", "int4-quanto": "int4-quanto (the recipe's int4 crashed in backward)"}

# Speed of the recipe (bf16, checkpointing, 1024 px, 512 text tokens, batch 1) on an H100: anchors.md
ANCHOR_STEP_S = {"klein-4b": 0.372, "klein-9b": 0.690, "dev": 2.159}
ANCHOR_TOKENS = (1024 // 16) ** 2 + 512
# klein-4b: 0.214 s at 512 px (1536 tokens) against 0.372 s at 1024 px (4608): t = T * (f + (1 - f) * tokens / 4608)
FIXED_STEP_SHARE = (0.214 / 0.372 - 1536 / ANCHOR_TOKENS) / (1 - 1536 / ANCHOR_TOKENS)

# Offload: host -> device copies per training step (forward + backward/recompute), and the stated bandwidth
OFFLOAD_PASSES = 2
HOST_BANDWIDTH_GBPS = 25.0  # pinned host -> device over PCIe 4.0 x16 in practice; PCIe 5.0 hosts reach ~50

# Headroom on top of the predicted peak allocated memory (see the module docstring: stated, not fitted)
CUDA_CONTEXT_GIB = 0.75
ALLOCATOR_RESERVE = 0.10
HOST_PROCESS_GIB = 3.0

# Text encoders of the real repos (real-repo-layouts.md), as far as memory goes: the decoder stack only
TEXT_ENCODERS = {
    "klein-4b": dict(name="Qwen3-4B", vocab=151936, hidden=2560, intermediate=9728, heads=32, kv_heads=8,
                     head_dim=128, layers=36, qk_norm=True),
    "klein-9b": dict(name="Qwen3-8B", vocab=151936, hidden=4096, intermediate=12288, heads=32, kv_heads=8,
                     head_dim=128, layers=36, qk_norm=True),
    "dev": dict(name="Mistral-Small-3.x-24B", vocab=131072, hidden=5120, intermediate=32768, heads=32, kv_heads=8,
                head_dim=128, layers=40, qk_norm=False),
}
VAE_PARAMS = 84.0e6  # AutoencoderKLFlux2 (real-repo-layouts.md)
CACHE_BYTES = {"bf16": 2, "fp32": 4}


def _text_encoder_params(flavour: str, layers: int, lm_head: bool = False) -> float:
    """Parameters of the decoder stack cut to `layers` layers (embeddings included; lm_head when untied)."""
    t = TEXT_ENCODERS[flavour]
    h, q, kv = t["hidden"], t["heads"] * t["head_dim"], t["kv_heads"] * t["head_dim"]
    per_layer = 2 * h * q + 2 * h * kv + 3 * h * t["intermediate"] + 2 * h + (2 * t["head_dim"] if t["qk_norm"] else 0)
    return t["vocab"] * h * (2 if lm_head else 1) + layers * per_layer + h


# Text anchor: Qwen3-4B cut at 27 layers run through its base model (an untied LM head in memory, unused),
# batch 16 x 512 tokens, bf16, output_hidden_states=True (28 hidden states kept): 8.2 GiB.
_ANCHOR_TEXT_TOKENS = 16 * 512
_ANCHOR_TEXT_WORK = (8.2 * GIB - 2 * _text_encoder_params("klein-4b", 27, lm_head=True)
                     - 28 * 2 * _ANCHOR_TEXT_TOKENS * 2560)
C_TEXT_WORK = _ANCHOR_TEXT_WORK / (_ANCHOR_TEXT_TOKENS * (2560 + 9728))  # bytes per token x (hidden + intermediate)
# VAE anchor: 4 images at 1024 x 1024, bf16: 6.2 GiB
C_VAE_PIXEL = (6.2 * GIB - 2 * VAE_PARAMS) / (4 * 1024 * 1024)  # bf16 bytes per input pixel


def headroom_gib(peak_gib: float) -> float:
    """GPU memory needed beyond the predicted peak allocated: CUDA context + the caching allocator's reserve."""
    return CUDA_CONTEXT_GIB + ALLOCATOR_RESERVE * peak_gib


def fits(peak_gib: float, budget_gib: float) -> bool:
    return peak_gib + headroom_gib(peak_gib) <= budget_gib


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
    group_offload_use_stream: bool = True  # the copy of the next group overlaps compute (CUDA streams)
    tread_selection_ratio: float = 0.0  # share of image tokens skipping the routed span
    tread_span_share: float = 0.0  # share of blocks inside the routed span
    lora_rank: int = 16
    lora_target: str = "all"  # a flux_lora_target preset, or "recipe": the diffusers example's targets (anchors)
    lora_target_modules: tuple[str, ...] | str | None = None  # train.lora_target_modules: replaces lora_target
    text_tokens: int = 512
    load_precision: str = "bf16"  # model.base_model_default_dtype: what the weights are loaded in before quantizing
    host_bandwidth_gbps: float = HOST_BANDWIDTH_GBPS


@dataclass(frozen=True)
class Prediction:
    plan: Plan
    peak_gib: float  # peak allocated GPU memory
    relative_step_time: float  # 1.0 = the plain recipe (bf16, checkpointing) at this flavour/resolution/batch
    parts_gib: dict
    step_s: float = 0.0  # predicted seconds per step on an H100 (the anchors' GPU)
    copy_s: float = 0.0  # group offload: seconds of host -> device copies per step
    host_ram_gib: float = 0.0

    @property
    def headroom_gib(self) -> float:
        return headroom_gib(self.peak_gib)

    @property
    def required_gib(self) -> float:
        """GPU memory the run needs: the peak plus the headroom."""
        return self.peak_gib + self.headroom_gib


@lru_cache(maxsize=None)
def _architecture(flavour: str) -> dict:
    """Parameter counts and shapes from the real config, built on the meta device (no memory, no download)."""
    import torch
    from diffusers import Flux2Transformer2DModel

    from .flavours import get_flavour
    from .train.lora import PRESETS, target_modules

    with torch.device("meta"):
        model = Flux2Transformer2DModel(**get_flavour(flavour).full_transformer_config)
    linears = dict(model.named_modules())
    # The diffusers example's default targets, on which the anchors were measured.
    recipe = [n for n in linears if n.endswith(("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                                                 "attn.to_qkv_mlp_proj"))
              or (n.startswith("single_transformer_blocks.") and n.endswith("attn.to_out"))]
    presets = {name: target_modules(model, name) for name in PRESETS}
    presets["recipe"] = recipe
    return {"params": sum(p.numel() for p in model.parameters()),
            "blocks": len(model.transformer_blocks) + len(model.single_transformer_blocks),
            "hidden": model.config.num_attention_heads * model.config.attention_head_dim,
            "lora_shapes": {name: [(linears[n].in_features, linears[n].out_features) for n in names]
                            for name, names in presets.items()},
            "linear_shapes": {n: (m.in_features, m.out_features) for n, m in linears.items()
                              if isinstance(m, torch.nn.Linear)}}


def _lora_shapes(plan: Plan, arch: dict) -> list[tuple[int, int]]:
    """(in, out) of every module the plan's LoRA adapts: its patterns' matches, or its preset's modules."""
    if plan.lora_target_modules is None:
        return arch["lora_shapes"][plan.lora_target]
    from .train.lora import flavour_modules, resolve_target_patterns

    patterns = plan.lora_target_modules if isinstance(plan.lora_target_modules, str) else \
        list(plan.lora_target_modules)
    names = resolve_target_patterns(flavour_modules(plan.flavour), patterns, f"{plan.flavour}'s transformer")
    return [arch["linear_shapes"][n] for n in names]


def recipe_step_s(flavour: str, resolution: int, batch: int, text_tokens: int = 512) -> float:
    """Predicted H100 seconds of the plain recipe's step (bf16, checkpointing) at this size (anchors, scaled)."""
    tokens = batch * (text_tokens + (resolution // 16) ** 2)
    return ANCHOR_STEP_S[flavour] * (FIXED_STEP_SHARE + (1 - FIXED_STEP_SHARE) * tokens / ANCHOR_TOKENS)


def predict(plan: Plan) -> Prediction:
    """Peak GPU memory (GiB), step time (relative to the plain recipe, and predicted H100 seconds) and host RAM of
    one training configuration."""
    arch = _architecture(plan.flavour)
    image_tokens = (plan.resolution // 16) ** 2
    kept = 1.0 - plan.tread_selection_ratio * plan.tread_span_share  # average share of image tokens per block
    tokens = plan.batch * (plan.text_tokens + image_tokens * kept)
    element = tokens * arch["hidden"]
    all_weights = arch["params"] * WEIGHT_BYTES[plan.base_model_precision] / GIB
    weights = all_weights
    if plan.group_offload:  # the block being computed (and, with a stream, the one prefetched) stay on the GPU
        weights *= (2 if plan.group_offload_use_stream else 1) / arch["blocks"]
    lora = sum(plan.lora_rank * (i + o) for i, o in _lora_shapes(plan, arch)) * LORA_BYTES_PER_PARAM / GIB
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
    recipe_s = recipe_step_s(plan.flavour, plan.resolution, plan.batch, plan.text_tokens)
    compute_s = time * recipe_s
    copy_s = 0.0
    if plan.group_offload:
        copy_s = OFFLOAD_PASSES * all_weights * GIB / (plan.host_bandwidth_gbps * 1e9)
    step_s = max(compute_s, copy_s) if plan.group_offload_use_stream else compute_s + copy_s
    loaded = arch["params"] * WEIGHT_BYTES[plan.load_precision] / GIB  # every load builds the model on the CPU
    host = HOST_PROCESS_GIB + loaded + (all_weights if plan.group_offload else 0.0)  # + pinned offload copies
    return Prediction(plan, sum(parts.values()), step_s / recipe_s, parts, step_s, copy_s, host)


def candidates(base: Plan) -> list[Plan]:
    """Every memory/speed setting the planner may propose (TREAD stays as configured: it changes training)."""
    out = []
    blocks = _architecture(base.flavour)["blocks"]
    # unquantized: the model's own dtype (model.base_model_default_dtype), as train.base_model_precision no_change
    for precision in (base.load_precision,) + PROPOSED_PRECISIONS[1:]:
        for offload in (False, True):
            common = dict(base_model_precision=precision, group_offload=offload, compile=False,
                          group_offload_use_stream=True)
            out.append(replace(base, gradient_checkpointing=False, checkpointed_share=1.0, **common))
            for checkpointed in range(1, blocks + 1):  # memory-budget mode: the first N blocks
                out.append(replace(base, gradient_checkpointing=True, checkpointed_share=checkpointed / blocks,
                                   **common))
    return out


def checkpointed_share_for_budget(base: Plan, vram_gib: float) -> float | None:
    """Memory-budget mode (train.vram_budget_gib): the smallest share of blocks to checkpoint (0.0 to 1.0) for
    `base` (its precision, offload and the rest unchanged) to keep its predicted peak allocated memory within
    `vram_gib`; None when even full checkpointing does not fit. The budget is for the allocator's peak: the
    headroom (CUDA context, allocator reserve) is the user's to leave, as `flux2lora plan` does."""
    blocks = _architecture(base.flavour)["blocks"]
    for checkpointed in range(blocks + 1):
        plan = replace(base, gradient_checkpointing=checkpointed > 0, checkpointed_share=checkpointed / blocks)
        if predict(plan).peak_gib <= vram_gib:
            return checkpointed / blocks
    return None


def fastest_fitting(base: Plan, vram_gib: float) -> Prediction | None:
    """The fastest candidate that fits `vram_gib` with its headroom (None if nothing fits), in tiers: the base at
    its own dtype first; a quantized base only when no unquantized configuration fits (quantizing changes the
    model the LoRA is trained against, whatever it saves in time); group offload only when nothing else fits."""
    predictions = [p for p in map(predict, candidates(base)) if fits(p.peak_gib, vram_gib)]
    tiers = ([p for p in predictions if not p.plan.group_offload and p.plan.base_model_precision == base.load_precision],
             [p for p in predictions if not p.plan.group_offload],
             predictions)
    pool = next((tier for tier in tiers if tier), [])
    return min(pool, key=lambda p: (p.relative_step_time, p.peak_gib)) if pool else None


def unquantized_base_fits(plan: Plan, vram_gib: float) -> bool:
    """Whether the transformer at its load dtype (before quantization) fits the budget with its headroom: if not,
    a quantized base must be quantized on the CPU (train.quantize_via: cpu)."""
    weights = _architecture(plan.flavour)["params"] * WEIGHT_BYTES[plan.load_precision] / GIB
    return fits(weights, vram_gib)


def parse_size(text: str, option: str = "--vram") -> float:
    """"24GiB", "24 GB", "80" -> GiB."""
    match = re.fullmatch(r"\s*([\d.]+)\s*(gib|gb|g)?\s*", text.lower())
    if not match:
        raise ValueError(f"{option}: {text!r} is not a size such as 24GiB")
    value = float(match.group(1))
    return value * 1e9 / GIB if match.group(2) == "gb" else value


def plan_from_params(params, host_bandwidth_gbps: float = HOST_BANDWIDTH_GBPS) -> Plan:
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
                group_offload_use_stream=cfg.group_offload_use_stream,
                tread_selection_ratio=ratio,
                tread_span_share=span, lora_rank=cfg.lora_rank, lora_target=cfg.flux_lora_target,
                lora_target_modules=cfg.lora_target_modules if isinstance(cfg.lora_target_modules, (str, type(None)))
                else tuple(cfg.lora_target_modules),
                text_tokens=params.encode_text.max_sequence_length,
                load_precision=params.model.base_model_default_dtype, host_bandwidth_gbps=host_bandwidth_gbps)
    if cfg.vram_budget_gib is not None:  # memory-budget mode: what the trainer will checkpoint
        share = checkpointed_share_for_budget(plan, cfg.vram_budget_gib)
        plan = replace(plan, gradient_checkpointing=bool(share), checkpointed_share=1.0 if share is None else share)
    return plan


def as_params(prediction: Prediction, budget_gib: float | None = None) -> dict:
    """The params.yaml settings that make the trainer run `prediction`'s configuration. With a budget, a base that
    does not fit unquantized is loaded and quantized on the CPU (train.quantize_via: cpu)."""
    plan = prediction.plan
    blocks = _architecture(plan.flavour)["blocks"]
    quantized = plan.base_model_precision not in ("bf16", "fp16", "fp32")
    out = {"train.base_model_precision": plan.base_model_precision if quantized else "no_change",
           "train.gradient_checkpointing": plan.gradient_checkpointing,
           "train.gradient_checkpointing_blocks": round(plan.checkpointed_share * blocks)
           if plan.gradient_checkpointing and plan.checkpointed_share < 1.0 else None,
           "train.vram_budget_gib": None,  # the proposal is explicit: budget mode would override it
           "train.compile_transformer": plan.compile,
           "train.enable_group_offload": plan.group_offload}
    if plan.group_offload:
        out["train.group_offload_use_stream"] = plan.group_offload_use_stream
    if budget_gib is not None and not unquantized_base_fits(plan, budget_gib):
        out["train.quantize_via"] = "cpu"
    return out


def as_dict(prediction: Prediction) -> dict:
    return {**asdict(prediction.plan), "peak_gib": round(prediction.peak_gib, 2),
            "headroom_gib": round(prediction.headroom_gib, 2), "required_gib": round(prediction.required_gib, 2),
            "relative_step_time": round(prediction.relative_step_time, 3), "step_s_h100": round(prediction.step_s, 3),
            "offload_copy_s": round(prediction.copy_s, 3), "host_ram_gib": round(prediction.host_ram_gib, 1),
            "parts_gib": {k: round(v, 2) for k, v in prediction.parts_gib.items()}}


# ---- the encode stages ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TextPlan:
    flavour: str
    batch: int = 8  # encode_text.text_encoder_batch_size
    tokens: int = 512  # max_sequence_length
    layers: tuple = (9, 18, 27)  # stacked hidden states
    precision: str = "bf16"  # text_encoder_1_precision (or the model's dtype)
    load_precision: str = "bf16"
    truncate: bool = True
    group_offload: bool = False
    cache_dtype: str = "bf16"


@dataclass(frozen=True)
class LatentPlan:
    resolution: int
    batch: int = 4  # encode_latents.vae_batch_size
    precision: str = "bf16"
    group_offload: bool = False


@dataclass(frozen=True)
class StagePrediction:
    plan: TextPlan | LatentPlan
    peak_gib: float
    host_ram_gib: float
    parts_gib: dict = field(default_factory=dict)

    @property
    def required_gib(self) -> float:
        return self.peak_gib + headroom_gib(self.peak_gib)


def predict_text(plan: TextPlan) -> StagePrediction:
    """encode-text: the cut text encoder's weights (or, offloaded, its embeddings and two decoder layers) plus
    the working set of one batch and the hidden states kept."""
    t = TEXT_ENCODERS[plan.flavour]
    run_layers = max(plan.layers) if plan.truncate else t["layers"]
    params = _text_encoder_params(plan.flavour, run_layers)
    weight_bytes = WEIGHT_BYTES[plan.precision]
    weights = params * weight_bytes / GIB
    if plan.group_offload:
        per_layer = (params - t["vocab"] * t["hidden"]) / run_layers
        resident = t["vocab"] * t["hidden"] + 2 * per_layer
        weights = resident * weight_bytes / GIB
    tokens = plan.batch * plan.tokens
    act_bytes = 2 if plan.load_precision in ("bf16", "fp16") else 4
    kept = len(plan.layers) * t["hidden"] * (act_bytes + CACHE_BYTES.get(plan.cache_dtype, 2))
    activations = tokens * (C_TEXT_WORK * (t["hidden"] + t["intermediate"]) * act_bytes / 2 + kept) / GIB
    loaded = params * WEIGHT_BYTES[plan.load_precision] / GIB
    host = HOST_PROCESS_GIB + loaded + (params * weight_bytes / GIB if plan.group_offload else 0.0)
    return StagePrediction(plan, weights + activations + OVERHEAD_GIB, host,
                           {"weights": weights, "activations": activations, "overhead": OVERHEAD_GIB})


def predict_latents(plan: LatentPlan) -> StagePrediction:
    """encode-latents: the VAE's weights plus its encoder's activations for one batch (per pixel, fitted)."""
    act_bytes = 2 if plan.precision in ("bf16", "fp16") else 4
    weights = 0.0 if plan.group_offload else VAE_PARAMS * act_bytes / GIB
    activations = plan.batch * plan.resolution ** 2 * C_VAE_PIXEL * act_bytes / 2 / GIB
    host = HOST_PROCESS_GIB + VAE_PARAMS * act_bytes / GIB * (2 if plan.group_offload else 1)
    return StagePrediction(plan, weights + activations, host, {"weights": weights, "activations": activations})


def text_plan_from_params(params) -> TextPlan:
    cfg = params.encode_text
    flavour = params.model.model_flavour.removeprefix("tiny-")
    from .flavours import get_flavour

    return TextPlan(flavour=flavour, batch=cfg.text_encoder_batch_size, tokens=cfg.max_sequence_length,
                    layers=tuple(cfg.text_encoder_out_layers or get_flavour(flavour).stacked_layers),
                    precision=cfg.text_encoder_1_precision or params.model.base_model_default_dtype,
                    load_precision=params.model.base_model_default_dtype, truncate=cfg.truncate_text_encoder,
                    group_offload=cfg.group_offload_text_encoder, cache_dtype=cfg.cache_dtype)


def latent_plan_from_params(params) -> LatentPlan:
    from .data.config import training_side

    return LatentPlan(resolution=training_side(params.prepare), batch=params.encode_latents.vae_batch_size,
                      precision=params.model.base_model_default_dtype,
                      group_offload=params.encode_latents.group_offload_vae)


def _halvings(batch: int) -> list[int]:
    out = [batch]
    while out[-1] > 1:
        out.append(max(1, out[-1] // 2))
    return out


def fitting_text_plan(plan: TextPlan, vram_gib: float) -> StagePrediction | None:
    """The configured setting when it fits, else the first that does, in this order (outputs stay equal, so the
    precision is never changed): truncated encoder, then smaller batches, then group offload of its decoder
    layers."""
    configured = predict_text(plan)
    if fits(configured.peak_gib, vram_gib):
        return configured
    for offload in (False, True):
        for batch in _halvings(plan.batch):
            p = predict_text(replace(plan, truncate=True, batch=batch, group_offload=offload or plan.group_offload))
            if fits(p.peak_gib, vram_gib):
                return p
    return None


def fitting_latent_plan(plan: LatentPlan, vram_gib: float) -> StagePrediction | None:
    """The configured setting when it fits, else the largest VAE batch that fits (then group offload of the VAE's
    layers)."""
    configured = predict_latents(plan)
    if fits(configured.peak_gib, vram_gib):
        return configured
    for offload in (False, True):
        for batch in _halvings(plan.batch):
            p = predict_latents(replace(plan, batch=batch, group_offload=offload or plan.group_offload))
            if fits(p.peak_gib, vram_gib):
                return p
    return None


def text_params(prediction: StagePrediction) -> dict:
    plan = prediction.plan
    return {"encode_text.truncate_text_encoder": plan.truncate, "encode_text.text_encoder_batch_size": plan.batch,
            "encode_text.group_offload_text_encoder": plan.group_offload}


def latent_params(prediction: StagePrediction) -> dict:
    plan = prediction.plan
    return {"encode_latents.vae_batch_size": plan.batch, "encode_latents.group_offload_vae": plan.group_offload}


# ---- the whole report -----------------------------------------------------------------------------------------


def plan_report(params, budget_gib: float | None = None, host_ram_gib: float | None = None,
                host_bandwidth_gbps: float = HOST_BANDWIDTH_GBPS) -> dict:
    """Every GPU stage of `params`: its configured prediction and, with a budget, the proposal that fits, as a
    JSON-able dict with `proposed_params` (params.yaml keys) and a one-line `verdict`."""
    train_plan = plan_from_params(params, host_bandwidth_gbps)
    text_plan, latent_plan = text_plan_from_params(params), latent_plan_from_params(params)
    configured = {"train": predict(train_plan), "encode-text": predict_text(text_plan),
                  "encode-latents": predict_latents(latent_plan)}
    stages = {}
    for name, pred in configured.items():
        stages[name] = {"configured": _stage_dict(pred), "proposed": None, "proposed_params": {}}
    report = {"flavour": train_plan.flavour, "budget_gib": None if budget_gib is None else round(budget_gib, 2),
              "host_bandwidth_gbps": host_bandwidth_gbps, "stages": stages,
              "headroom": {"cuda_context_gib": CUDA_CONTEXT_GIB, "allocator_reserve_share": ALLOCATOR_RESERVE},
              "proposed_params": {}, "notes": []}
    chosen = dict(configured)
    if budget_gib is not None:
        proposals = {"train": fastest_fitting(train_plan, budget_gib),
                     "encode-text": fitting_text_plan(text_plan, budget_gib),
                     "encode-latents": fitting_latent_plan(latent_plan, budget_gib)}
        to_params = {"train": lambda p: as_params(p, budget_gib), "encode-text": text_params,
                     "encode-latents": latent_params}
        for name, best in proposals.items():
            stage = stages[name]
            stage["configured"]["fits"] = fits(configured[name].peak_gib, budget_gib)
            if best is None:
                report["notes"].append(f"{name}: nothing fits {budget_gib:.1f} GiB")
                continue
            chosen[name] = best
            stage["proposed"] = _stage_dict(best)
            stage["proposed_params"] = to_params[name](best)
            report["proposed_params"].update(stage["proposed_params"])
        best_train = proposals["train"]
        if best_train is not None:
            p = best_train.plan
            for setting in {p.base_model_precision} & set(UNMEASURED):
                report["notes"].append(f"train: {UNMEASURED[setting]} is not yet measured on a GPU by bench/gpu.sh")
            if p.group_offload:
                report["notes"].append("train: group offload of the transformer is not yet measured on a GPU; "
                                       f"it moves {best_train.copy_s:.1f} s of copies per step at "
                                       f"{host_bandwidth_gbps:g} GB/s")
            if p.base_model_precision == "fp8-torchao":
                report["notes"].append("train: fp8-torchao needs a GPU with compute capability 8.9+ (Ada, Hopper, "
                                       "Blackwell); use int8-quanto elsewhere")
    host_need = max(p.host_ram_gib for p in chosen.values())
    report["host_ram_gib"] = round(host_need, 1)
    report["verdict"] = _verdict(report, chosen, budget_gib, host_ram_gib, host_need)
    return report


def _stage_dict(pred) -> dict:
    if isinstance(pred, Prediction):
        return as_dict(pred)
    return {**asdict(pred.plan), "peak_gib": round(pred.peak_gib, 2),
            "headroom_gib": round(headroom_gib(pred.peak_gib), 2), "required_gib": round(pred.required_gib, 2),
            "host_ram_gib": round(pred.host_ram_gib, 1), "parts_gib": {k: round(v, 2) for k, v in pred.parts_gib.items()}}


def _verdict(report: dict, chosen: dict, budget_gib, host_ram_gib, host_need) -> str:
    stages = report["stages"]
    if budget_gib is None:
        need = max(p.required_gib for p in chosen.values())
        return (f"{report['flavour']}: the configured run needs {need:.1f} GiB of GPU memory (largest stage, headroom "
                f"included) and {host_need:.0f} GiB of host RAM; pass --vram to fit a GPU")
    missing = [name for name, s in stages.items() if s["proposed"] is None]
    if missing:
        return (f"{report['flavour']} does not fit {budget_gib:.1f} GiB: {', '.join(missing)} cannot be made to fit "
                "(lower train.train_batch_size or prepare.resolution)")
    changed = [name for name, s in stages.items() if not s["configured"].get("fits")]
    ram = ""
    if host_ram_gib is not None and host_need > host_ram_gib:
        ram = f"; but it needs {host_need:.0f} GiB of host RAM, more than the {host_ram_gib:.0f} GiB given"
    train = stages["train"]["proposed"]
    speed = f"train step x{train['relative_step_time']:.2f} of the plain recipe (~{train['step_s_h100']:.2f} s on an H100)"
    if not changed:
        return f"{report['flavour']} fits {budget_gib:.1f} GiB as configured; fastest fit: {speed}{ram}"
    return (f"{report['flavour']} fits {budget_gib:.1f} GiB with the proposed settings for {', '.join(changed)}: "
            f"{speed}{ram}")


def render_table(report: dict, console=None) -> None:
    """The report as a rich table plus the verdict line."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    budget = report["budget_gib"]
    title = f"flux2lora plan: {report['flavour']}" + (f", budget {budget:g} GiB" if budget is not None else "")
    table = Table(title=title, show_lines=True)
    for column in ("stage", "", "GPU peak", "+ headroom", "needs", "fits", "step (H100)", "host RAM", "settings"):
        table.add_column(column, justify="right" if column in ("GPU peak", "+ headroom", "needs", "host RAM",
                                                               "step (H100)") else "left")
    for name, stage in report["stages"].items():
        rows = [("configured", stage["configured"], {})]
        same = stage["proposed"] == {k: v for k, v in stage["configured"].items() if k != "fits"}
        if stage["proposed"] is not None and not same:
            rows.append(("proposed", stage["proposed"], stage["proposed_params"]))
        for label, pred, settings in rows:
            fit = "" if budget is None else ("yes" if pred["required_gib"] <= budget else "no")
            step = f"{pred['step_s_h100']:.2f} s" if "step_s_h100" in pred else ""
            shown = ", ".join(f"{k.split('.', 1)[1]}={v}" for k, v in settings.items() if v is not None)
            table.add_row(name, label, f"{pred['peak_gib']:.1f}", f"{pred['headroom_gib']:.1f}",
                          f"{pred['required_gib']:.1f}", fit, step, f"{pred['host_ram_gib']:.0f}", shown)
    console.print(table)
    console.print(f"headroom = {CUDA_CONTEXT_GIB:g} GiB CUDA context + {ALLOCATOR_RESERVE:.0%} allocator reserve of the "
                  f"peak; offload copies at {report['host_bandwidth_gbps']:g} GB/s host -> device")
    for note in report["notes"]:
        console.print(f"note: {note}")
    console.print(report["verdict"], soft_wrap=True)  # one line, whatever the terminal's width
