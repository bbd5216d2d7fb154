"""Dataset preparation at scale: prepare's throughput on a generated folder, and what a rerun costs after adding 1%.

    python bench/data.py                   # 5,000 generated images (640x480 / 480x640 JPEG, 512x512 PNG) + captions
    python bench/data.py --images 500      # a quick look
    python bench/data.py --write           # also append the results to bench/RESULTS.md

Runs the prepare stage function itself (`flux2lora.data.prepare.prepare`) in this process on a fresh folder:

1. full: no per-file records yet, every image is decoded and hashed (threads: `prepare.WORKERS`), and once more with
   one thread for comparison;
2. unchanged rerun: nothing new, every file is only stat'ed and its caption read;
3. incremental: 1% new images added (goal: at most 5% of the full run's time).

Timings are wall-clock seconds of the stage call (manifests and report written included), best of `--repeat`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SIZES = ((640, 480), (480, 640), (512, 512))
FORMATS = ("jpg", "jpg", "png")
GRAIN = 12.0  # pixel noise, so files are photo-sized (~100-200 KB JPEG, ~500 KB PNG) and decode like photos


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def timed_prepare(params, root: Path) -> tuple[float, dict]:
    from flux2lora.data.prepare import prepare

    start = time.perf_counter()
    summary = prepare(params, root)
    return time.perf_counter() - start, summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=3, help="reruns timed per measurement (best kept)")
    parser.add_argument("--dir", type=Path, default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--write", action="store_true", help="append the results to bench/RESULTS.md")
    args = parser.parse_args()

    import logging

    import flux2lora.data.prepare as prepare_module
    from flux2lora.config import parse_params
    from flux2lora.data.synthetic import write_images

    logging.getLogger("flux2lora").setLevel(logging.ERROR)
    os.environ.setdefault("TQDM_DISABLE", "1")
    work = args.dir or Path(tempfile.mkdtemp(prefix="flux2lora-bench-data-"))
    root = work / "project"
    shutil.rmtree(root, ignore_errors=True)
    folder = root / "data" / "bench"
    started = time.perf_counter()
    write_images(folder, args.images, sizes=SIZES, formats=FORMATS, grain=GRAIN)
    generated = time.perf_counter() - started
    size_mb = sum(p.stat().st_size for p in folder.iterdir()) / 1e6
    params = parse_params({"output_dir": "outputs", "prepare": {
        "data_root": "data", "instance_data_dir": "data/bench", "resolution": 1024, "resolution_type": "pixel_area",
        "crop": True, "crop_aspect": "closest", "crop_style": "center", "minimum_image_size": 256}})
    state = root / "outputs" / "state"

    def cold(workers: int) -> tuple[float, dict]:
        prepare_module.WORKERS = workers
        best, summary = float("inf"), {}
        for _ in range(max(1, args.repeat - 1)):
            shutil.rmtree(state, ignore_errors=True)  # no per-file records: every image decoded again
            seconds, summary = timed_prepare(params, root)
            best = min(best, seconds)
        return best, summary

    threads = prepare_module.WORKERS
    full_1, _ = cold(1)
    full, summary = cold(threads)
    assert summary["accepted"] == args.images and summary["inspected"] == args.images, summary
    same = min(timed_prepare(params, root)[0] for _ in range(args.repeat))

    added = max(1, args.images // 100)
    incremental = []
    for round_ in range(args.repeat):  # each round adds a fresh 1%
        write_images(folder, added, start=args.images + round_ * added, sizes=SIZES, formats=FORMATS, grain=GRAIN)
        seconds, summary = timed_prepare(params, root)
        assert summary["inspected"] == added, summary
        incremental.append(seconds)
    incr = min(incremental)

    result = {
        "machine": f"{cpu_name()}, {os.cpu_count()} cores", "python": platform.python_version(),
        "date": datetime.date.today().isoformat(), "images": args.images, "dataset_mb": round(size_mb, 1),
        "generate_s": round(generated, 1), "threads": threads,
        "full_s": round(full, 2), "full_images_per_s": round(args.images / full, 1),
        "full_1_thread_s": round(full_1, 2), "full_1_thread_images_per_s": round(args.images / full_1, 1),
        "unchanged_rerun_s": round(same, 3), "added_images": added, "incremental_s": round(incr, 3),
        "incremental_ratio": round(incr / full, 4), "goal_ratio": 0.05,
    }
    print(json.dumps(result))
    table = (
        f"\n### prepare: {args.images} generated images ({result['date']}, {result['machine']}, "
        f"Python {result['python']})\n\n"
        f"Folder: {args.images} images ({'/'.join(f'{w}x{h}' for w, h in SIZES)}, JPEG q90 and PNG) with .txt "
        f"captions, {result['dataset_mb']} MB; `python bench/data.py --images {args.images}`.\n\n"
        "| measurement | seconds | images/s | vs full |\n|---|---:|---:|---:|\n"
        f"| full prepare, {threads} threads (cold: every image decoded + hashed) | {full:.2f} | "
        f"{args.images / full:.0f} | 1.00 |\n"
        f"| full prepare, 1 thread | {full_1:.2f} | {args.images / full_1:.0f} | {full_1 / full:.2f} |\n"
        f"| rerun, nothing changed (stat + caption read per file) | {same:.3f} | | {same / full:.3f} |\n"
        f"| rerun after adding 1% ({added} images) | {incr:.3f} | | **{incr / full:.3f}** (goal <= 0.05) |\n"
    )
    print(table)
    if args.write:
        results = REPO / "bench" / "RESULTS.md"
        if not results.exists():
            results.write_text("# Benchmark results\n")
        with open(results, "a") as f:
            f.write(table)
    if args.dir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if incr / full <= 0.05 else 1


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "src"))
    sys.exit(main())
