"""What a Ray Train run of the train stage costs over `accelerate launch`, on the tiny klein-4b.

    python bench/ray_overhead.py                  # 10 steps, 3 pairs
    python bench/ray_overhead.py --steps 30 --pairs 5

Both variants train 2 processes on CPU (gloo), from fresh copies of one encoded project (8 generated images):

    accelerate  runtime.engine: local, num_processes 2: `accelerate launch` of `flux2lora stage train`
    ray         runtime.engine: ray on a cluster of a head and two worker nodes (separate `ray start` processes on
                loopback, one CPU each, started once before timing, as a standing cluster is): the driver connects,
                Ray Train starts its controller and 2 workers, each runs the recipe

Timed: the stage's wall clock as the Prefect task sees it (launch_train: heal check, launch, training, reading the
metrics). Pairs alternate which variant runs first; the result is the median over pairs of ray / accelerate.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the tests' project builder and local Ray cluster


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--pairs", type=int, default=3)
    args = parser.parse_args()

    from helpers import make_project, set_params
    from ray_cluster import NODE_IP, LocalRayCluster

    from flux2lora.config import load_params
    from flux2lora.launch import launch_train
    from flux2lora.stages import run_stage

    os.environ["ACCELERATE_USE_CPU"] = "true"
    logger = logging.getLogger("bench.ray")
    work = Path(tempfile.mkdtemp(prefix="ray-bench-"))
    template = make_project(work / "template", git=False, images=8,
                            **{"train.max_train_steps": args.steps, "train.checkpointing_steps": 10 ** 6,
                               "train.mixed_precision": "no", "train.train_batch_size": 1,
                               "runtime.num_processes": 2})
    shutil.copytree(REPO / "infra", template / "infra")
    for stage in ("prepare", "encode-text", "encode-latents"):
        run_stage(stage, template / "params.yaml")
    cluster = LocalRayCluster(workers=2)
    variants = {"accelerate": {},
                "ray": {"runtime.engine": "ray", "runtime.ray_address": cluster.address,
                        "runtime.ray_master_addr": NODE_IP}}
    ratios, seconds = [], {name: [] for name in variants}
    try:
        for pair in range(args.pairs):
            order = list(variants) if pair % 2 == 0 else list(reversed(variants))
            took = {}
            for name in order:
                root = work / f"{name}-{pair}"
                shutil.copytree(template, root, symlinks=True)
                set_params(root, **variants[name])
                started = time.perf_counter()
                summary = launch_train(root, load_params(root / "params.yaml"), logger)
                took[name] = time.perf_counter() - started
                assert summary["steps"] == args.steps
                shutil.rmtree(root)
                print(json.dumps({"pair": pair, "variant": name, "seconds": round(took[name], 2)}), flush=True)
            for name, value in took.items():
                seconds[name].append(value)
            ratios.append(took["ray"] / took["accelerate"])
    finally:
        cluster.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({"steps": args.steps, "pairs": args.pairs,
                      "median_seconds": {k: round(statistics.median(v), 2) for k, v in seconds.items()},
                      "median_ratio_ray_over_accelerate": round(statistics.median(ratios), 3),
                      "ratios": [round(r, 3) for r in ratios]}))


if __name__ == "__main__":
    main()
