"""Cost of scheduled sampling (train/rollout.py) per training step, against the same step with it off.

    python bench/rollout.py                 # CPU: a small random FLUX.2 config, 256 px, 64 text tokens
    python bench/rollout.py --gpu           # GPU: the same small config on CUDA (bf16 autocast)

Each round times, interleaved in a fresh order, one optimizer step per variant on the same LoRA model: off (the
forward process's input, what the train stage runs with scheduled sampling off) and a rollout of exactly k = 1 / 5
/ 10 Euler steps before the step (apply_rollouts, as the train stage calls it). Reported: per variant the median
over rounds of (its step time / the off step time of the same round). A config's expected cost follows:
1 + p * E[k] * c, with c the cost of one rollout step relative to a training step and E[k] = max_step_offset / 2
(k is uniform in 0..max_step_offset).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

SMALL = dict(num_layers=2, num_single_layers=4, num_attention_heads=4, attention_head_dim=64,
             joint_attention_dim=3 * 128, axes_dims_rope=(16, 16, 16, 16), guidance_embeds=False)
VARIANTS = {"off": 0, "k=1": 1, "k=5": 5, "k=10": 10}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--res", type=int, default=128)
    args = parser.parse_args()
    from diffusers import Flux2Transformer2DModel

    from flux2lora.config import TrainParams
    from flux2lora.train.lora import add_lora, target_modules
    from flux2lora.train.model import TrainingModel
    from flux2lora.train.rollout import apply_rollouts
    from flux2lora.train.step import MicroBatch, TrainingStep, make_optimizer, sample_sigmas

    device = torch.device("cuda" if args.gpu else "cpu")
    torch.manual_seed(0)
    model = Flux2Transformer2DModel(in_channels=128, **SMALL).to(device).requires_grad_(False)
    params = add_lora(model, 16, None, 0.0, target_modules(model, "all"), "gaussian")
    cfg = TrainParams(learning_rate=1e-4, max_train_steps=1000)
    optimizer = make_optimizer(params, cfg, device)
    step = TrainingStep(model, params, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0),
                        mixed_precision="bf16" if args.gpu else "no", device=device)
    rollout_model = TrainingModel(model)
    side = args.res // 16
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 128, side, side, generator=g).to(device)
    embeds = torch.randn(1, 64, SMALL["joint_attention_dim"], generator=g).to(device)

    def one(variant: str) -> float:
        offset = VARIANTS[variant]
        batch = MicroBatch(x0, embeds, torch.randn(x0.shape, generator=g).to(device),
                           sample_sigmas(cfg, 1, g).to(device))
        if offset:
            batch.rollout_offsets = torch.tensor([offset])
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        if offset:
            apply_rollouts([batch], rollout_model, step.autocast_dtype, model.dtype)
        step([batch], g)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    for variant in VARIANTS:  # warm-up
        one(variant)
    ratios = {v: [] for v in VARIANTS if v != "off"}
    off_times = []
    order = list(VARIANTS)
    shuffle = random.Random(0)
    for _ in range(args.rounds):
        shuffle.shuffle(order)
        times = {v: one(v) for v in order}
        off_times.append(times["off"])
        for v in ratios:
            ratios[v].append(times[v] / times["off"])
    result = {"device": torch.cuda.get_device_name() if args.gpu else platform.processor() or platform.machine(),
              "torch": torch.__version__, "res": args.res, "rounds": args.rounds,
              "off_step_s_median": statistics.median(off_times),
              "ratio_median": {v: round(statistics.median(r), 3) for v, r in ratios.items()}}
    per_step = (result["ratio_median"]["k=10"] - 1) / 10
    result["rollout_step_cost_c"] = round(per_step, 3)
    result["expected_ratio"] = {f"max_step_offset={m} p={p}": round(1 + p * m / 2 * per_step, 2)
                                for m in (5, 10) for p in (0.5, 1.0)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
