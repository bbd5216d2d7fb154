"""Training checkpoints: the LoRA, optimizer, LR schedule and every RNG state, so a resumed run continues exactly.

A checkpoint folder `step-000123/` appears only once complete (written under a temporary name, then renamed), and
carries the fingerprint of the run it belongs to: a checkpoint from a run with other data or hyperparameters is
never resumed from.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)

PREFIX = "step-"


@dataclass
class Checkpoint:
    path: Path
    step: int
    state: dict

    @property
    def lora(self) -> dict[str, torch.Tensor]:
        return load_file(str(self.path / "lora.safetensors"))

    def training_state(self) -> dict:
        return torch.load(self.path / "training_state.pt", map_location="cpu", weights_only=False)


def save_checkpoint(folder: Path, step: int, lora: dict[str, torch.Tensor], training_state: dict, info: dict,
                    keep: int | None, protect: int | None = None) -> Path:
    """Write checkpoint `step` under `folder`, then delete the oldest beyond `keep`; the checkpoint of step
    `protect` (the best eval loss's) is never deleted and not counted."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{PREFIX}{step:06d}"
    tmp = folder / f".tmp-{PREFIX}{step:06d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(lora, str(tmp / "lora.safetensors"))
    torch.save(training_state, tmp / "training_state.pt")
    (tmp / "state.json").write_text(json.dumps({**info, "step": step}, indent=2, sort_keys=True))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    if keep:
        for old in [c for c in list_checkpoints(folder) if c.step != protect][:-keep]:
            log.info("removing checkpoint %s: only the newest %d are kept", old.path.name, keep)
            shutil.rmtree(old.path, ignore_errors=True)
    return final


def list_checkpoints(folder: Path) -> list[Checkpoint]:
    """Complete checkpoints, oldest first (half-written `.tmp-*` folders are ignored)."""
    out = []
    if not folder.exists():
        return out
    for path in folder.glob(f"{PREFIX}*"):
        try:
            state = json.loads((path / "state.json").read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if (path / "lora.safetensors").exists() and (path / "training_state.pt").exists():
            out.append(Checkpoint(path, int(state["step"]), state))
    return sorted(out, key=lambda c: c.step)


def latest_matching(folder: Path, fingerprint: str) -> Checkpoint | None:
    """The newest checkpoint of the run with this fingerprint; older runs' checkpoints are logged and removed."""
    checkpoints = list_checkpoints(folder)
    stale = [c for c in checkpoints if c.state.get("fingerprint") != fingerprint]
    for c in stale:
        log.info("removing checkpoint %s: it belongs to a run with other data or params", c.path.name)
        shutil.rmtree(c.path, ignore_errors=True)
    for tmp in folder.glob(f".tmp-{PREFIX}*") if folder.exists() else []:
        shutil.rmtree(tmp, ignore_errors=True)  # a save killed half-way
    matching = [c for c in checkpoints if c not in stale]
    return matching[-1] if matching else None


class TrainingState:
    """Everything a resumed run needs, captured into and restored from one checkpoint: the LoRA weights, the
    optimizer, LR schedule and grad scaler (`TrainingStep`), the data generator (`StepDraws`) and each process's
    torch RNG (LoRA dropout).

    With several processes every process calls `capture` (FSDP gathers the LoRA's and the optimizer's shards there;
    every process's RNG is gathered); only the main one writes. `extras`: more objects with state_dict /
    load_state_dict whose state travels in the same file (the evaluation's best-so-far)."""

    def __init__(self, transformer, training_step, draws, accelerator, extras: tuple = ()):
        self.transformer, self.training_step, self.draws = transformer, training_step, draws
        self.accelerator, self.extras = accelerator, extras

    def capture(self, folder: Path, step: int, info: dict, keep: int | None,
                protect: int | None = None) -> Path | None:
        """Write checkpoint `step` (main process); returns its folder there, None elsewhere."""
        from .lora import lora_state_dict

        lora, state = lora_state_dict(self.transformer), self.training_step.state_dict()
        processes = self.accelerator.num_processes
        torch_rng = [torch.get_rng_state()]
        if processes > 1:
            torch_rng = [None] * processes
            torch.distributed.all_gather_object(torch_rng, torch.get_rng_state())
        if not self.accelerator.is_main_process:
            return None
        state.update(self.draws.state_dict(), torch_rng=torch_rng[0], torch_rng_per_process=torch_rng)
        for extra in self.extras:
            state.update(extra.state_dict())
        return save_checkpoint(folder, step, lora, state, {**info, "processes": processes}, keep=keep,
                               protect=protect)

    @staticmethod
    def restore_lora(transformer, checkpoint: Checkpoint) -> None:
        """The LoRA weights, into the bare transformer, before any wrapping (FSDP shards them)."""
        from .lora import load_lora_state_dict

        load_lora_state_dict(transformer, checkpoint.lora)

    def restore(self, checkpoint: Checkpoint) -> None:
        """Optimizer, schedule, scaler, data generator and this process's RNG (the LoRA: `restore_lora`)."""
        state = checkpoint.training_state()
        self.training_step.load_state_dict(state)
        self.draws.load_state_dict(state)
        for extra in self.extras:
            extra.load_state_dict(state)
        rank = self.accelerator.process_index
        per_process = state.get("torch_rng_per_process", [state["torch_rng"]])
        # a run resumed on another process count (allowed: it changes how the run executes) reuses the saved RNGs
        torch.set_rng_state(per_process[rank % len(per_process)])
