"""Starting the train stage on several GPUs: `accelerate launch` of `flux2lora stage train`, its output streamed
to a logger (the Prefect task's log, or the console under `dvc repro`).

Used when `runtime.num_processes` > 1, by both entry points: the Prefect train task and `flux2lora stage train`
(what `dvc repro` runs), so the setting never silently trains on one process. The processes run the library's
train stage; splitting the work between them is the train loop's (DDP) business. Several machines: see
infra/k8s/trainjob-train.yaml (Kubeflow Trainer) and runtime.engine: ray (flux2lora.ray_train).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import deque
from pathlib import Path

from .config import Params
from .layout import layout_for


class LaunchFailed(RuntimeError):
    """`accelerate launch` exited with an error; the message carries the last lines it printed."""


def accelerate_command(root: Path, params: Params, params_file: str = "params.yaml") -> list[str]:
    """argv of `accelerate launch ... -m flux2lora.cli stage train --params <root>/params.yaml`."""
    runtime = params.runtime
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if runtime.accelerate_config:
        config = Path(runtime.accelerate_config)
        config = config if config.is_absolute() else root / config
        if not config.is_file():
            raise FileNotFoundError(f"runtime.accelerate_config: {config} does not exist")
        cmd += ["--config_file", str(config)]
    else:
        cmd += ["--multi_gpu"]
    cmd += ["--num_processes", str(runtime.num_processes),
            "-m", "flux2lora.cli", "stage", "train", "--params", str(root / params_file)]
    return cmd


def stream(cmd: list[str], cwd: Path, logger, env: dict | None = None, keep: int = 40) -> None:
    """Run `cmd`, logging each line it prints (tqdm's carriage-return updates count as lines); LaunchFailed
    on a non-zero exit."""
    # tqdm in the child redraws at most every 30 s, so the log is not flooded with progress lines
    # FLUX2LORA_LAUNCHED: the launched `flux2lora stage train` trains, it does not launch again (one process under
    # engine accelerate may not get WORLD_SIZE)
    env = {**os.environ, "TQDM_MININTERVAL": "30", "PYTHONUNBUFFERED": "1", "FLUX2LORA_LAUNCHED": "1", **(env or {})}
    tail: deque[str] = deque(maxlen=keep)
    logger.info("launching: %s", " ".join(cmd))
    with subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          bufsize=1) as proc:
        for line in proc.stdout:
            line = line.rstrip()
            if line:
                tail.append(line)
                logger.info("%s", line)
    if proc.returncode:
        raise LaunchFailed(f"{cmd[2]} exited with code {proc.returncode}; last lines:\n" + "\n".join(tail))


def launched(params: Params) -> bool:
    """Whether the train stage is started by a launcher (runtime.engine, num_processes) rather than run in this
    process: engine accelerate or ray, or local with num_processes > 1."""
    return params.runtime.engine != "local" or params.runtime.num_processes > 1


def launch_train(root: Path, params: Params, logger, params_file: str = "params.yaml") -> dict:
    """Train with `accelerate launch` on runtime.num_processes processes, or (runtime.engine: ray) as a Ray Train
    job; returns the stage's summary (metrics)."""
    if params.runtime.engine == "ray":
        from .ray_train import train_on_ray

        return train_on_ray(root, params, logger, params_file)
    from .stages import heal_caches

    from .models import model_errors

    with model_errors(params.model):  # healing re-encodes with the base model: a missing one is a message
        heal_caches("train", params, root)  # once, here: the processes then only read the caches
    stream(accelerate_command(root, params, params_file), cwd=root, logger=logger)
    layout = layout_for(root, params.output_dir)
    metrics = json.loads(layout.train_metrics.read_text())
    run = json.loads(layout.run_file.read_text())
    return {**metrics, "lora_file": str(layout.lora_file), "mlflow_run_id": run["run_id"]}
