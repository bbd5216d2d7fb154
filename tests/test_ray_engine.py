"""runtime.engine: ray on a real Ray cluster on this machine: a head and two worker nodes, each its own `ray start`
process on a loopback address with one CPU (conftest's session-wide `ray_cluster`, shared with the other Ray
files: Ray clusters are heavy, one per session).

The workers run the train stage's recipe under accelerate, with torch.distributed on gloo (CPU). Every socket of
the cluster, its workers and this driver must stay on loopback: the nodes are started with --node-ip-address,
torch.distributed's rendezvous is pinned with runtime.ray_master_addr, gloo's own pairs with GLOO_SOCKET_IFNAME=lo,
and the processes' connections are sampled with psutil while training runs.
"""

from __future__ import annotations

import sys

import psutil
import pytest
import torch
from helpers import copy_project
from ray_cluster import launch, ray_params, worker_killer
from safetensors.torch import load_file

from flux2lora.stages import run_stage

pytestmark = pytest.mark.slow
ray = pytest.importorskip("ray", reason="the ray extra (pip install 'flux2lora[ray]') is not installed")

LORA = "outputs/lora/pytorch_lora_weights.safetensors"


def test_without_ray_engine_ray_is_an_error_naming_the_extra(monkeypatch, tmp_path):
    from flux2lora.errors import UserError
    from flux2lora.ray_train import require_ray

    monkeypatch.setitem(sys.modules, "ray", None)  # as if the extra were not installed
    with pytest.raises(UserError, match=r"pip install 'flux2lora\[ray\]'"):
        require_ray()


def test_engine_decides_who_starts_the_train_stage():
    from flux2lora.config import Params
    from flux2lora.launch import launched

    def params(**runtime):
        return Params.model_validate({"runtime": runtime})

    assert not launched(params())  # local, one process: the stage runs in the calling process
    assert launched(params(num_processes=2))  # local, several: accelerate launch, as before
    assert launched(params(engine="accelerate")) and launched(params(engine="ray"))
    with pytest.raises(ValueError, match="engine"):
        params(engine="slurm")


def test_ray_job_on_three_nodes_trains_the_lora_of_two_accelerate_processes_and_of_one_accumulating(
        ray_encoded, ray_run, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    on_ray, summary, watch = ray_run
    assert summary["steps"] == 2 and summary["processes"] == 2
    assert watch.remote, "no connection was sampled"
    assert not watch.not_loopback(), f"connections left loopback: {watch.not_loopback()}"

    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    accelerate = copy_project(ray_encoded, tmp_path / "accelerate")  # engine local, 2 processes: accelerate launch
    assert launch(accelerate)["processes"] == 2
    single = copy_project(ray_encoded, tmp_path / "single", **{"runtime.num_processes": 1,
                                                     "train.gradient_accumulation_steps": 2})
    run_stage("train", single / "params.yaml")
    ray_lora = load_file(on_ray / LORA)
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in ray_lora.items() if "lora_B" in k)
    for other in (accelerate, single):
        other_lora = load_file(other / LORA)
        assert ray_lora.keys() == other_lora.keys()
        for key in ray_lora:
            # test_distributed's bound: the same computation, only the order of the gradient sum differs
            # (all-reduce vs accumulation), which AdamW amplifies where a gradient element nearly cancels; 0.2% of
            # one step's update at lr 0.01
            torch.testing.assert_close(ray_lora[key], other_lora[key], rtol=1e-4, atol=2e-3 * 0.01)

    client = MlflowClient(tracking_uri=f"sqlite:///{on_ray / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("flux2-lora").experiment_id])
    assert [r.info.run_id for r in runs] == [summary["mlflow_run_id"]]  # rank 0 only
    assert [m.step for m in client.get_metric_history(summary["mlflow_run_id"], "training/loss")] == [1, 2]


def test_a_worker_killed_mid_training_restarts_the_job_from_the_checkpoint_with_the_lora_of_an_uninterrupted_run(
        ray_encoded, ray_cluster, ray_run, tmp_path, monkeypatch):
    """FLUX2LORA_FAULT=train:step=1:hold stops the first worker past step 1's checkpoint and writes its pid; the
    test SIGKILLs that pid (as a lost machine would end it); Ray's FailureConfig starts the workers again, the recipe
    resumes from step 1 (optimizer state, generators) and ends bitwise equal to the uninterrupted Ray run (that the
    per-process dropout RNG resumes too is test_distributed's fault test)."""
    from flux2lora import faults

    straight = ray_run[0]
    faulted = copy_project(ray_encoded, tmp_path / "faulted",
                           **ray_params(ray_cluster, **{"runtime.ray_max_failures": 1}))

    monkeypatch.setenv("FLUX2LORA_FAULT", "train:step=1:hold")
    marker = faults.marker_path(faulted / "outputs", "train", "step=1")
    killer, killed = worker_killer(marker)
    killer.start()
    summary = launch(faulted)
    killer.join(timeout=1)
    assert killed, "no worker reached the fault"
    assert not psutil.pid_exists(killed[0])
    assert summary["resumed_from_step"] == 1 and summary["steps"] == 2
    a, b = load_file(straight / LORA), load_file(faulted / LORA)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
