"""Our LoRA training step (flux2lora.train.step.TrainingStep) beside the plain diffusers + peft recipe
(`../shared/bench/anchor_gpu.py`, imported and run in the same process), on the same random-weight transformer.

    python bench/train_step.py            # CPU: a small random FLUX.2 config, 256 px, 128 text tokens
    python bench/train_step.py --gpu      # GPU: klein-4b at 1024 px, 512 text tokens (the anchors' setting)

Both sides: bf16 base weights, fp32 LoRA rank 16 on the recipe's targets (equal work), batch 1, AdamW. Ours adds
what a real run does (sigma sampling and the flow-matching target, gradient clipping, LR schedule). Further rows
show our options (all-module preset, no checkpointing, int8 / int4 base, TREAD). Prints JSON lines, then ratios:
recipe step time / ours (>= 1.0: ours is at least as fast).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# the shared copy when it is beside the repo; else the verbatim copy in bench/ (what travels to a GPU machine)
ANCHOR = next((p for p in (ROOT.parent / "shared" / "bench" / "anchor_gpu.py", ROOT / "bench" / "anchor_gpu.py")
               if p.exists()), ROOT / "bench" / "anchor_gpu.py")
CPU_SMALL = dict(num_layers=2, num_single_layers=4, num_attention_heads=4, attention_head_dim=64,
                 joint_attention_dim=3 * 128, axes_dims_rope=(16, 16, 16, 16), guidance_embeds=False)


def load_anchor(path: Path):
    if not path.exists():
        raise SystemExit(f"{path} not found: the plain recipe lives in ../shared/bench/anchor_gpu.py "
                         "(copy it beside the repo on the GPU machine, or pass --anchor)")
    spec = importlib.util.spec_from_file_location("anchor_gpu", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def row_params(flavour: str | None, res: int, text_len: int, device_type: str, *, checkpointing=True,
               preset="recipe", precision="bf16", tread=None, **train):
    """The Params of one row (what the train stage would be given for it)."""
    from flux2lora.config import Params

    return Params(model={"model_flavour": flavour or "klein-4b", "base_model_default_dtype": "bf16"},
                  prepare={"resolution": res}, encode_text={"max_sequence_length": text_len},
                  train={"lora_rank": 16, "learning_rate": 1e-4, "max_train_steps": 1000,
                         "mixed_precision": "bf16" if device_type == "cuda" else "no",
                         "gradient_checkpointing": checkpointing, "tread_config": tread,
                         "base_model_precision": "no_change" if precision == "bf16" else precision,
                         "flux_lora_target": "all" if preset == "recipe" else preset, **train})


def planned(flavour: str, res: int, text_len: int, *, preset="recipe", **options):
    """The planner's prediction for a row (real flavour, real size), with the recipe's targets when it uses them."""
    from dataclasses import replace

    from flux2lora.planner import plan_from_params, predict

    plan = plan_from_params(row_params(flavour, res, text_len, "cuda", preset=preset, **options))
    if preset == "recipe":  # the planner knows the recipe's targets (its calibration runs)
        plan = replace(plan, lora_target="recipe")
    if options.get("enable_group_offload"):  # ours() offloads with a side stream on CUDA
        plan = replace(plan, group_offload_use_stream=True)
    return predict(plan)


def ours(config: dict, res: int, text_len: int, device: torch.device, steps: int, *, checkpointing=True,
         preset="recipe", precision="bf16", tread=None, label="flux2lora", flavour=None, anchor=None,
         warmup=2, echo=True, **train) -> dict:
    """One row: our TrainingStep on `config`; `train` holds further TrainParams (compile_transformer,
    gradient_checkpointing_blocks, vram_budget_gib, enable_group_offload, ...) applied through the same
    build_training_model the train stage uses. On CUDA the row has the peak allocated and reserved memory.
    warmup: untimed steps first (the recipe's 2); echo: print the row as a JSON line."""
    from diffusers import Flux2Transformer2DModel
    from diffusers.optimization import get_scheduler
    from optimum import quanto

    from flux2lora.models import QUANTIZED_MODULES, _quantize_fp8, apply_group_offload, parameter_bytes
    from flux2lora.train.lora import add_lora, target_modules
    from flux2lora.train.model import build_training_model
    from flux2lora.train.step import MicroBatch, TrainingStep, make_optimizer

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    torch._dynamo.reset()
    torch.manual_seed(0)
    offload = train.get("enable_group_offload", False)
    build_on = torch.device("cpu") if offload else device
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(build_on):
        model = Flux2Transformer2DModel(**config)
    torch.set_default_dtype(prev)
    model.requires_grad_(False)
    if precision in ("int8-quanto", "int4-quanto"):
        quanto.quantize(model, weights=quanto.qint8 if precision == "int8-quanto" else quanto.qint4,
                        include=QUANTIZED_MODULES)
        quanto.freeze(model)
    elif precision == "fp8-torchao":
        _quantize_fp8(model, device)
    if offload:
        apply_group_offload(model, device, blocks_per_group=train.get("group_offload_blocks_per_group", 1),
                            use_stream=device.type == "cuda")
    if preset == "recipe":  # the diffusers example's targets, for equal work with the recipe
        targets = [n for n, _ in model.named_modules() if n.endswith(("attn.to_q", "attn.to_k", "attn.to_v",
                   "attn.to_out.0", "attn.to_qkv_mlp_proj")) or (n.startswith("single_") and n.endswith("attn.to_out"))]
    else:
        targets = target_modules(model, preset)
    params = row_params(flavour, res, text_len, device.type, checkpointing=checkpointing, preset=preset,
                        precision=precision, tread=tread, **train)
    cfg = params.train
    lora_params = add_lora(model, 16, 16, 0.0, targets)
    for p in lora_params:
        p.data = p.data.to(device)
    training_model = build_training_model(params, model)
    model.train()
    optimizer = make_optimizer(lora_params, cfg, device)
    scheduler = get_scheduler("constant", optimizer)
    step = TrainingStep(training_model, lora_params, optimizer, scheduler, mixed_precision=cfg.mixed_precision,
                        max_grad_norm=1.0, device=device, dtype=torch.bfloat16)
    side = res // 16
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 128, side, side, generator=g).to(device, torch.bfloat16)
    embeds = torch.randn(1, text_len, config["joint_attention_dim"], generator=g).to(device, torch.bfloat16)
    guidance = torch.ones(1, device=device) if config.get("guidance_embeds") else None

    def one():
        from flux2lora.train.step import sample_sigmas

        sigmas = sample_sigmas(cfg, 1, g).to(device)
        batch = MicroBatch(x0, embeds, torch.randn(x0.shape, generator=g).to(device, x0.dtype), sigmas, guidance)
        step([batch], g)

    median_s, _, _ = anchor.timed(one, device, warmup, steps)  # the recipe's own timing and sync
    prediction = planned(flavour, res, text_len, checkpointing=checkpointing, preset=preset, precision=precision,
                         tread=tread, **train) if flavour else None
    cuda = device.type == "cuda"
    rec = {"what": label, "res": res, "checkpointing": checkpointing, "preset": preset, "precision": precision,
           "tread": bool(tread), "options": train, "step_s_median": median_s,
           "planned_peak_gib": prediction.peak_gib if prediction else None,
           "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
           "reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if cuda else None,
           "transformer_gib": parameter_bytes(model) / 2**30}
    if echo:
        print(json.dumps(rec), flush=True)
    del model, optimizer, step, training_model
    return rec


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--anchor", type=Path, default=ANCHOR)
    args = ap.parse_args()
    anchor = load_anchor(args.anchor)
    device = torch.device("cuda" if args.gpu else "cpu")
    if args.gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
        config, res, text_len, steps = anchor.TRANSFORMER["klein-4b"], 1024, 512, args.steps or 6
        print("device", torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
    else:
        anchor.TRANSFORMER["cpu-small"] = CPU_SMALL
        config, res, text_len, steps = CPU_SMALL, 256, 128, args.steps or 5
    import diffusers
    import peft

    print("diffusers", diffusers.__version__, "peft", peft.__version__, flush=True)
    recipe = anchor.lora_step_bench("klein-4b" if args.gpu else "cpu-small", res, True, device, steps=steps,
                                    text_len=text_len)
    flavour = "klein-4b" if args.gpu else None  # the planner predicts real-size peaks only
    kw = dict(flavour=flavour, anchor=anchor)
    rows = [ours(config, res, text_len, device, steps, **kw)]  # equal work with the recipe
    variants = [
        dict(label="speed mode: compile, no ckpt", checkpointing=False, compile_transformer=True),
        dict(label="memory mode: compile + ckpt", compile_transformer=True),
        dict(label="budget 14 GiB: compile", compile_transformer=True, vram_budget_gib=14.0),
        dict(label="no checkpointing", checkpointing=False),
        dict(label="all modules", preset="all"),
        dict(label="int8 base", precision="int8-quanto"),
        dict(label="int4 base", precision="int4-quanto"),
        dict(label="fp8 base (torchao)", precision="fp8-torchao"),
        dict(label="group offload", enable_group_offload=True),
        dict(label="TREAD 0.5", tread={"routes": [{"selection_ratio": 0.5, "start_layer_idx": 1,
                                                   "end_layer_idx": -2}]}),
    ]
    if not args.gpu:  # compile on 2 CPU cores takes minutes per variant and says nothing about GPU speed
        variants = [v for v in variants if not v.get("compile_transformer")]
    for variant in variants:
        variant = dict(variant)
        label = "flux2lora " + variant.pop("label")
        try:
            rows.append(ours(config, res, text_len, device, steps, label=label, **kw, **variant))
        except Exception as e:  # one failing option must not cost the other numbers
            print(json.dumps({"what": label, "error": repr(e)[:400]}), flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print("\nRATIOS (recipe step time / ours; >= 1.0 means ours is at least as fast)")
    for row in rows:
        peak = f" peak {row['peak_gib']:.1f} GiB" if row["peak_gib"] is not None else ""
        if row.get("planned_peak_gib") and row["peak_gib"]:
            peak += f" (planned {row['planned_peak_gib']:.1f}, {row['planned_peak_gib'] / row['peak_gib'] - 1:+.0%})"
        print(f"{row['what']:40s} {row['step_s_median']:.3f} s  x{recipe['step_s_median'] / row['step_s_median']:.2f}"
              f"{peak}  weights {row['transformer_gib']:.2f} GiB")
    print(f"{'recipe (diffusers+peft)':40s} {recipe['step_s_median']:.3f} s")


if __name__ == "__main__":
    sys.exit(main())
