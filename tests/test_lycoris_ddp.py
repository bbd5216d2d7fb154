"""LoKr, LoHa and DoRA under DDP: two CPU processes (gloo); for LoKr and DoRA a fault after a checkpoint, whose
relaunch resumes bitwise; for LoHa equality with one process accumulating the two micro-batches.

Apart from tests/test_lycoris.py so that pytest-xdist (--dist loadfile) can run the two heavy files on different
workers."""

from __future__ import annotations

import pytest
import torch
from helpers import encoded_ddp_project
from safetensors.torch import load_file

from flux2lora.config import load_params
from flux2lora.stages import run_stage
from test_lycoris import BASE


@pytest.mark.slow
@pytest.mark.parametrize("extra", [{"train.lora_type": "lokr"}, {"train.use_dora": True}], ids=["lokr", "dora"])
def test_two_ddp_processes_train_and_resume_after_a_fault_bitwise(tmp_path, monkeypatch, extra):
    """DDP on two CPU processes (gloo, as tests/test_distributed.py): the adapter's gradients are all-reduced like a
    LoRA's. FLUX2LORA_FAULT fails a process after step 2's checkpoint; the relaunch resumes from it and ends
    bitwise equal to an uninterrupted two-process run."""
    import logging
    import shutil

    from tasks.launch import LaunchFailed, launch_train

    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    logger = logging.getLogger("test.ddp")
    template = encoded_ddp_project(tmp_path / "template", images=4,
                                   **{**BASE, "train.max_train_steps": 4, "train.checkpointing_steps": 2,
                                      "train.train_batch_size": 1, "train.mixed_precision": "no",
                                      "runtime.num_processes": 2, **extra})
    straight, faulted = tmp_path / "straight", tmp_path / "faulted"
    shutil.copytree(template, straight, symlinks=True)
    shutil.copytree(template, faulted, symlinks=True)
    assert launch_train(straight, load_params(straight / "params.yaml"), logger)["processes"] == 2
    monkeypatch.setenv("FLUX2LORA_FAULT", "train:step=2")
    with pytest.raises(LaunchFailed, match="exited with code"):
        launch_train(faulted, load_params(faulted / "params.yaml"), logger)
    monkeypatch.delenv("FLUX2LORA_FAULT")
    assert launch_train(faulted, load_params(faulted / "params.yaml"), logger)["resumed_from_step"] == 2
    a = load_file(straight / "outputs/lora/pytorch_lora_weights.safetensors")
    b = load_file(faulted / "outputs/lora/pytorch_lora_weights.safetensors")
    tag = "lokr_w1" if "train.lora_type" in extra else "lora_magnitude_vector"
    assert a.keys() == b.keys() and any(tag in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_loha_on_two_ddp_processes_equals_one_process_accumulating_their_micro_batches(tmp_path, monkeypatch):
    """LoHa under DDP (two CPU processes, gloo): the Hadamard factors' gradients are all-reduced like a LoRA's, so
    two processes of one micro-batch each train what one process accumulating both trains. Tolerance as
    tests/test_distributed.py's: only the order of the gradient sum differs (all-reduce vs accumulation)."""
    import logging

    from helpers import set_params
    from tasks.launch import launch_train

    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    project = encoded_ddp_project(tmp_path / "project", images=4,
                                  **{**BASE, "train.lora_type": "loha", "train.max_train_steps": 2,
                                     "train.checkpointing_steps": 100, "train.train_batch_size": 1,
                                     "train.mixed_precision": "no", "runtime.num_processes": 2})
    summary = launch_train(project, load_params(project / "params.yaml"), logging.getLogger("test.ddp"))
    assert summary["processes"] == 2 and summary["steps"] == 2
    lora_file = project / "outputs/lora/pytorch_lora_weights.safetensors"
    ddp = load_file(lora_file)
    set_params(project, **{"runtime.num_processes": 1, "train.gradient_accumulation_steps": 2})
    run_stage("train", project / "params.yaml")
    single = load_file(lora_file)
    assert ddp.keys() == single.keys() and any("hada_w1_a" in k for k in ddp)
    for key in ddp:
        torch.testing.assert_close(ddp[key], single[key], rtol=1e-4, atol=2e-3 * BASE["train.learning_rate"])
