"""The GPU run is ready: `bash bench/gpu.sh --dry-run` runs every row of the real run on the CPU at reduced size,
with only torch's own distributions and bench/gpu_requirements.txt importable (what the GPU machine has: a bare
CUDA torch install plus the carried wheels), and every measured row has the planner's prediction beside it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from helpers import REPO

EXPECTED_ROWS = [
    "klein-4b recipe (diffusers + peft)", "klein-4b ours: equal work", "klein-9b recipe (diffusers + peft)",
    "klein-9b ours: equal work", "dev recipe (diffusers + peft)", "dev ours: equal work",
    "dev text encoder (Mistral 24B text, 30 layers)", "dev text encoder (Mistral 24B text, 30 layers) offloaded",
    "klein-4b ours: no checkpointing", "klein-4b ours: int8 base", "klein-4b ours: fp8 base (torchao)",
    "klein-4b ours: int4 base", "klein-4b ours: group offload", "klein-4b ours: TREAD 0.5",
    "klein-4b ours: all modules", "klein-4b ours: speed mode: compile, no ckpt",
    "klein-4b ours: memory mode: compile + ckpt", "klein-4b ours: budget 14 GiB: compile",
    "klein-4b ours: text encode (PromptEncoder, cut at 27)"]


def test_gpu_script_dry_run_builds_every_row_with_only_the_carried_wheels(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", "bench/gpu.sh", "--dry-run"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "gpu_run.jsonl").read_text().splitlines()]
    by_name = {r["what"]: r for r in rows}
    errors = [r for r in rows if "error" in r or "skipped" in r]
    assert not errors, errors
    assert set(EXPECTED_ROWS) <= set(by_name), sorted(set(EXPECTED_ROWS) - set(by_name))
    for name in EXPECTED_ROWS:  # the planner's prediction for the real-size row, beside the measurement
        assert by_name[name]["planned_peak_gib"] > 0 and by_name[name]["planned_needs_gib"] > 0, name
    assert by_name["dev recipe (diffusers + peft)"]["planned_peak_gib"] > 60  # the real size, not the dry one
    assert any(r["what"].startswith("vae encode") for r in rows)
    assert "| row |" in (tmp_path / "gpu_run.md").read_text()
    print(f"\ndry run: {len(rows)} rows; last at {rows[-1].get('t_s')} s")
