"""Multi-process training: the train stage under `accelerate launch` with the project's DDP config, on two CPU
processes talking gloo (ACCELERATE_USE_CPU makes accelerate pick gloo; on GPUs the same config uses NCCL).

Only rank 0 logs and saves. Every process draws all micro-batches of a step from the shared generator and keeps its
own, so two processes with one micro-batch each compute exactly what one process accumulating both computes.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from helpers import REPO, encoded_ddp_project
from safetensors.torch import load_file

from flux2lora.config import load_params
from flux2lora.stages import run_stage
from flux2lora.tracking import LOSS_METRIC

pytestmark = pytest.mark.slow


def _set(params_file: Path, **values) -> None:
    raw = yaml.safe_load(params_file.read_text())
    for dotted, value in values.items():
        section, key = dotted.split(".")
        raw.setdefault(section, {})[key] = value
    params_file.write_text(yaml.safe_dump(raw, sort_keys=False))


def test_ddp_on_two_cpu_processes_trains_and_saves_one_lora_equal_to_one_process(tmp_path, monkeypatch):
    from mlflow import MlflowClient
    from tasks.launch import launch_train

    project = encoded_ddp_project(tmp_path / "project", images=8,
                                  **{"train.max_train_steps": 3, "train.checkpointing_steps": 2,
                                     "train.mixed_precision": "no", "train.train_batch_size": 1,
                                     "runtime.num_processes": 2})
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    summary = launch_train(project, load_params(project / "params.yaml"), logging.getLogger("test.ddp"))
    assert summary["steps"] == 3 and summary["processes"] == 2

    lora_dir = project / "outputs" / "lora"
    assert [p.name for p in lora_dir.iterdir() if p.suffix == ".safetensors"] == ["pytorch_lora_weights.safetensors"]
    ddp_lora = load_file(lora_dir / "pytorch_lora_weights.safetensors")
    checkpoints = sorted((project / "outputs" / "checkpoints").iterdir())
    assert [c.name for c in checkpoints] == ["step-000002"], checkpoints  # written once, by rank 0

    # one process, accumulating the two micro-batches the two processes trained on
    _set(project / "params.yaml", **{"runtime.num_processes": 1, "train.gradient_accumulation_steps": 2})
    run_stage("train", project / "params.yaml")
    single_lora = load_file(lora_dir / "pytorch_lora_weights.safetensors")
    assert ddp_lora.keys() == single_lora.keys()
    for key in ddp_lora:
        # the same computation; only the order of the gradient sum differs (all-reduce vs accumulation), which
        # AdamW's normalisation amplifies where a gradient element nearly cancels (its update is ~lr whatever the
        # gradient's size): single elements were seen 3e-6 and 1.6e-5 apart at lr 0.01, so the bound is 0.2% of one
        # step's update
        torch.testing.assert_close(ddp_lora[key], single_lora[key], rtol=1e-4, atol=2e-3 * 0.01)
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in ddp_lora.items() if "lora_B" in k)

    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("flux2-lora").experiment_id])
    assert len(runs) == 2  # the DDP run (rank 0 only) and the single-process one
    ddp_run = next(r for r in runs if r.info.run_id == summary["mlflow_run_id"])
    assert [m.step for m in client.get_metric_history(ddp_run.info.run_id, LOSS_METRIC)] == [1, 2, 3]
    assert ddp_run.data.metrics["final_loss"] == pytest.approx(summary["final_loss"])


def test_ddp_run_killed_by_a_fault_resumes_from_its_checkpoint_and_ends_with_the_same_lora(tmp_path, monkeypatch,
                                                                                           caplog):
    """FLUX2LORA_FAULT fails one process after step 2's checkpoint; torchrun stops the other; the relaunch resumes
    both from rank 0's checkpoint (optimizer state, generators, each process's own dropout RNG) and ends bitwise
    equal to an uninterrupted two-process run."""
    from tasks.launch import LaunchFailed, launch_train

    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    logger = logging.getLogger("test.ddp")
    template = encoded_ddp_project(tmp_path / "template", images=8,
                                   **{"train.max_train_steps": 4, "train.checkpointing_steps": 2,
                                      "train.lora_dropout": 0.1, "train.mixed_precision": "no",
                                      "runtime.num_processes": 2})
    straight, faulted = tmp_path / "straight", tmp_path / "faulted"
    shutil.copytree(template, straight, symlinks=True)
    shutil.copytree(template, faulted, symlinks=True)

    launch_train(straight, load_params(straight / "params.yaml"), logger)
    monkeypatch.setenv("FLUX2LORA_FAULT", "train:step=2")
    with caplog.at_level(logging.INFO, logger="test.ddp"), pytest.raises(LaunchFailed, match="exited with code"):
        launch_train(faulted, load_params(faulted / "params.yaml"), logger)
    # whichever process fired it, its traceback went through the task log
    assert any("injected fault at step=2" in r.getMessage() for r in caplog.records)
    assert not (faulted / "outputs/lora/pytorch_lora_weights.safetensors").exists()
    summary = launch_train(faulted, load_params(faulted / "params.yaml"), logger)
    assert summary["resumed_from_step"] == 2

    a = load_file(straight / "outputs/lora/pytorch_lora_weights.safetensors")
    b = load_file(faulted / "outputs/lora/pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fsdp2_config_is_a_valid_accelerate_config_sharding_the_transformer_blocks():
    """FSDP2 needs accelerators (accelerate runs FSDP only there), so here only its config is checked; the loop's
    distributed paths it relies on (sharded-safe LoRA gathering, full optimizer state dicts) run under DDP above."""
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(REPO / "infra/accelerate/fsdp2.yaml"))
    assert config.distributed_type.value == "FSDP" and config.mixed_precision == "no"
    assert config.fsdp_config["fsdp_version"] == 2
    from diffusers import Flux2Transformer2DModel

    assert config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"].split(",") == \
        Flux2Transformer2DModel._no_split_modules


def test_dvc_repro_launches_the_configured_processes_too(repro_project):
    """`dvc repro` runs `flux2lora stage train`, which starts `accelerate launch` itself when
    runtime.num_processes > 1: the setting never silently trains on one process. On a copy of the demo project after
    its first `dvc repro` (conftest): a changed step count re-runs train, now on two processes."""
    import json

    from helpers import run, set_params

    project = repro_project
    shutil.copytree(REPO / "infra", project / "infra")
    set_params(project, **{"train.max_train_steps": 2, "train.train_batch_size": 1, "runtime.num_processes": 2})
    result = run(["dvc", "repro", "train"], cwd=project, ACCELERATE_USE_CPU="true")
    assert "Running stage 'train'" in result.stdout and "Running stage 'encode-latents'" not in result.stdout
    assert "training on 2 processes" in result.stdout + result.stderr
    metrics = json.loads((project / "outputs/train/metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["steps"] == 2
