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
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
ANCHOR = ROOT.parent / "shared" / "bench" / "anchor_gpu.py"
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


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def ours(config: dict, res: int, text_len: int, device: torch.device, steps: int, *, checkpointing=True,
         preset="recipe", precision="bf16", tread=None, label="flux2lora") -> dict:
    from diffusers import Flux2Transformer2DModel
    from diffusers.optimization import get_scheduler
    from optimum import quanto

    from flux2lora.config import TrainParams
    from flux2lora.models import QUANTIZED_MODULES, parameter_bytes
    from flux2lora.train.lora import add_lora, target_modules
    from flux2lora.train.step import MicroBatch, TrainingStep, make_optimizer
    from flux2lora.train.tread import TreadRouter, parse_routes

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        model = Flux2Transformer2DModel(**config)
    torch.set_default_dtype(prev)
    model.requires_grad_(False)
    if precision in ("int8-quanto", "int4-quanto"):
        quanto.quantize(model, weights=quanto.qint8 if precision == "int8-quanto" else quanto.qint4,
                        include=QUANTIZED_MODULES)
        quanto.freeze(model)
    if preset == "recipe":  # the diffusers example's targets, for equal work with the recipe
        targets = [n for n, _ in model.named_modules() if n.endswith(("attn.to_q", "attn.to_k", "attn.to_v",
                   "attn.to_out.0", "attn.to_qkv_mlp_proj")) or (n.startswith("single_") and n.endswith("attn.to_out"))]
    else:
        targets = target_modules(model, preset)
    cfg = TrainParams(lora_rank=16, learning_rate=1e-4, mixed_precision="bf16" if device.type == "cuda" else "no",
                      max_train_steps=1000)
    lora_params = add_lora(model, 16, 16, 0.0, targets)
    if checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    optimizer = make_optimizer(lora_params, cfg, device)
    scheduler = get_scheduler("constant", optimizer)
    router = None
    if tread:
        n_blocks = len(model.transformer_blocks) + len(model.single_transformer_blocks)
        router = TreadRouter(parse_routes(tread), n_blocks)
    step = TrainingStep(model, lora_params, optimizer, scheduler, mixed_precision=cfg.mixed_precision,
                        max_grad_norm=1.0, router=router, device=device)
    side = res // 16
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 128, side, side, generator=g).to(device, torch.bfloat16)
    embeds = torch.randn(1, text_len, config["joint_attention_dim"], generator=g).to(device, torch.bfloat16)
    guidance = torch.ones(1, device=device) if config.get("guidance_embeds") else None

    def one():
        from flux2lora.train.loop import sample_sigmas

        sigmas = sample_sigmas(cfg, 1, g).to(device)
        batch = MicroBatch(x0, embeds, torch.randn(x0.shape, generator=g).to(device, x0.dtype), sigmas, guidance)
        step([batch], g)

    for _ in range(2):
        one()
    sync(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        one()
        sync(device)
        times.append(time.perf_counter() - t0)
    rec = {"what": label, "res": res, "checkpointing": checkpointing, "preset": preset, "precision": precision,
           "tread": bool(tread), "step_s_median": statistics.median(times),
           "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
           "transformer_gib": parameter_bytes(model) / 2**30}
    print(json.dumps(rec), flush=True)
    del model, optimizer, step
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
    base = ours(config, res, text_len, device, steps)
    rows = [base,
            ours(config, res, text_len, device, steps, preset="all", label="flux2lora all modules"),
            ours(config, res, text_len, device, steps, checkpointing=False, label="flux2lora no checkpointing"),
            ours(config, res, text_len, device, steps, precision="int8-quanto", label="flux2lora int8 base"),
            ours(config, res, text_len, device, steps, precision="int4-quanto", label="flux2lora int4 base"),
            ours(config, res, text_len, device, steps, label="flux2lora TREAD 0.5",
                 tread={"routes": [{"selection_ratio": 0.5, "start_layer_idx": 1, "end_layer_idx": -2}]})]
    print("\nRATIOS (recipe step time / ours; >= 1.0 means ours is at least as fast)")
    for row in rows:
        peak = f" peak {row['peak_gib']:.1f} GiB" if row["peak_gib"] is not None else ""
        print(f"{row['what']:28s} {row['step_s_median']:.3f} s  x{recipe['step_s_median'] / row['step_s_median']:.2f}"
              f"{peak}  weights {row['transformer_gib']:.2f} GiB")
    print(f"{'recipe (diffusers+peft)':28s} {recipe['step_s_median']:.3f} s")


if __name__ == "__main__":
    sys.exit(main())
