"""LoKr, LoHa and DoRA under DDP: two CPU processes (gloo) train what one process accumulating their two
micro-batches trains. Resume after a DDP fault is shown for LoRA (tests/test_distributed.py: the checkpoint
machinery is the same for every kind) and each kind's resume after a SIGKILL in tests/test_lycoris_resume.py.

Apart from tests/test_lycoris.py so that pytest-xdist (--dist loadfile) can run the two heavy files on different
workers."""

from __future__ import annotations

import logging

import pytest
import torch
from helpers import copy_project, encoded_ddp_project, set_params
from safetensors.torch import load_file

from flux2lora.config import load_params
from flux2lora.stages import run_stage
from test_lycoris import BASE
from test_lycoris_resume import KINDS as ADAPTER_KINDS
from test_lycoris_resume import TAGS

pytestmark = pytest.mark.slow

KINDS = {kind: params for kind, params in ADAPTER_KINDS.items() if kind != "lora"}  # LoRA: tests/test_distributed.py


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    """One encoded project, copied for each kind."""
    return encoded_ddp_project(tmp_path_factory.mktemp("ddp") / "encoded", images=4,
                               **{**BASE, "train.max_train_steps": 2, "train.checkpointing_steps": 100,
                                  "train.train_batch_size": 1, "train.mixed_precision": "no",
                                  "runtime.num_processes": 2})


@pytest.mark.parametrize("kind", KINDS)
def test_two_ddp_processes_train_what_one_process_accumulating_their_micro_batches_trains(encoded, tmp_path,
                                                                                          monkeypatch, kind):
    """The adapter's factors' gradients (LoKr's Kronecker factors, LoHa's Hadamard factors, DoRA's magnitudes with
    A and B) are all-reduced like a LoRA's. Tolerance as tests/test_distributed.py's: only the order of the gradient
    sum differs (all-reduce vs accumulation)."""
    from tasks.launch import launch_train

    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    project = copy_project(encoded, tmp_path, **KINDS[kind])
    summary = launch_train(project, load_params(project / "params.yaml"), logging.getLogger("test.ddp"))
    assert summary["processes"] == 2 and summary["steps"] == 2
    lora_file = project / "outputs/lora/pytorch_lora_weights.safetensors"
    ddp = load_file(lora_file)
    set_params(project, **{"runtime.num_processes": 1, "train.gradient_accumulation_steps": 2})
    run_stage("train", project / "params.yaml")
    single = load_file(lora_file)
    assert ddp.keys() == single.keys() and any(TAGS[kind] in k for k in ddp)
    for key in ddp:
        torch.testing.assert_close(ddp[key], single[key], rtol=1e-4, atol=2e-3 * BASE["train.learning_rate"])
