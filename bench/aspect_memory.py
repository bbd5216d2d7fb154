"""Peak memory of turning one image into its VAE input (encode-latents' `load_pixels`: decode, resize + crop to the
bucket, normalise), for a thin strip against an ordinary photo, at resolution 1024.

    python bench/aspect_memory.py            # 16x8000 strip and 1024x768 photo, crop_aspect square, 5 rounds
    python bench/aspect_memory.py --write    # also append the results to bench/RESULTS.md

Each measurement runs in a fresh process (peak RSS from getrusage, minus the same process's RSS before the image is
touched, so torch and diffusers' imports are not counted). "materialised" is what flux2lora did before the memory
guard: resize the whole image to cover the bucket (1024x512000 for the strip), then crop; "guarded" is
`data.buckets.apply_plan` now. Rounds interleave the variants; medians are reported.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import io, json, resource, sys
import numpy as np
from PIL import Image
from flux2lora.data.buckets import apply_plan, plan_crop, working_size
from flux2lora.data.config import DatasetOptions
from flux2lora.cache.latents import image_processor
width, height, variant = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
rng = np.random.default_rng(0)
buf = io.BytesIO()
Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(buf, format="PNG")
data = buf.getvalue()
processor = image_processor()
plan = plan_crop(width, height, DatasetOptions(crop=True, crop_aspect="square", crop_style="center",
                                               resolution=1024, resolution_type="pixel"), "x")
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
image = Image.open(io.BytesIO(data)).convert("RGB")
if variant == "materialised":
    left, top = plan.offset
    cropped = image.resize(plan.resize, resample=Image.Resampling.LANCZOS).crop(
        (left, top, left + plan.bucket[0], top + plan.bucket[1]))
else:
    cropped = apply_plan(image, plan)
pixels = processor.preprocess(cropped, height=plan.bucket[1], width=plan.bucket[0])
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"peak_mib": (after - before) / 1024, "bucket": list(plan.bucket), "resize": list(plan.resize),
                  "working": list(working_size(plan)), "shape": list(pixels.shape)}))
"""


def measure(width: int, height: int, variant: str) -> dict:
    env = {"PYTHONPATH": str(REPO / "src"), "PATH": str(Path(sys.executable).parent), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", CHILD, str(width), str(height), variant], capture_output=True,
                         text=True, env=env, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    cases = [("strip 16x8000", 16, 8000), ("photo 1024x768", 1024, 768)]
    results: dict[tuple[str, str], list[float]] = {}
    facts = {}
    for _ in range(args.rounds):
        for name, w, h in cases:
            for variant in ("materialised", "guarded"):
                row = measure(w, h, variant)
                results.setdefault((name, variant), []).append(row["peak_mib"])
                facts[name] = row
    lines = [f"### {datetime.datetime.now():%Y-%m-%d %H:%M}, {platform.processor() or platform.machine()}, "
             f"Python {platform.python_version()}; {args.rounds} interleaved rounds, median peak RSS growth (MiB)",
             "", "| image | bucket | planned resize | held at most | materialised (before) | guarded (now) |",
             "|---|---|---|---|---|---|"]
    for name, _, _ in cases:
        f = facts[name]
        lines.append(f"| {name} | {f['bucket'][0]}x{f['bucket'][1]} | {f['resize'][0]}x{f['resize'][1]} | "
                     f"{f['working'][0]}x{f['working'][1]} | "
                     f"{statistics.median(results[(name, 'materialised')]):.0f} | "
                     f"{statistics.median(results[(name, 'guarded')]):.0f} |")
    text = "\n".join(lines)
    print(text)
    if args.write:
        path = REPO / "bench" / "RESULTS.md"
        path.write_text(path.read_text().rstrip("\n") + "\n\n## Memory guard on extreme aspect ratios "
                        "(bench/aspect_memory.py)\n\n" + text + "\n")


if __name__ == "__main__":
    main()
