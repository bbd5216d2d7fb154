"""Every adapter kind (LoRA, LoKr, LoHa, DoRA) on every tiny flavour (klein-4b, klein-9b, dev), and DoRA with TREAD
routing on klein-4b: SIGKILLed after a checkpoint, the train stage resumes and ends with the adapter of an
uninterrupted run, bit for bit (CPU).

Kept cheap: 3 steps, a checkpoint every step, the kill after step 2 (so the resumed run trains step 3 from step 2's
checkpoint, the first step of the second epoch), no evaluation loss, one MLflow store for every project, and one
subprocess killing all thirteen runs (tests/helpers.py: kill_trains_after_step, a forked child per run, SIGKILLed
at flux2lora.faults' `train:step=2:hold` point). One killed project also holds the half-written folder a kill during
a checkpoint save leaves behind: the resume removes it and uses the complete checkpoint before it."""

from __future__ import annotations

import pytest
import torch
from helpers import copy_project, kill_trains_after_step, make_project
from safetensors.torch import load_file

from flux2lora.stages import run_stage

FLAVOURS = ("klein-4b", "klein-9b", "dev")
KINDS = {"lora": {}, "lokr": {"train.lora_type": "lokr"}, "loha": {"train.lora_type": "loha"},
         "dora": {"train.use_dora": True}}
# TREAD routes a random subset of tokens past some blocks: the resumed run must route step 3 as the straight one did
DORA_TREAD = {"train.use_dora": True, "train.tread_config": {"routes": [
    {"selection_ratio": 0.5, "start_layer_idx": 1, "end_layer_idx": -1}]}}
RUNS = [(flavour, kind, params) for flavour in FLAVOURS for kind, params in KINDS.items()] + \
    [("klein-4b", "dora-tread", DORA_TREAD)]
# a tensor only this kind's file has
TAGS = {"lora": "lora_A", "lokr": "lokr_w1", "loha": "hada_w1_a", "dora": "lora_magnitude_vector",
        "dora-tread": "lora_magnitude_vector"}
RUN = {"train.lora_rank": 2, "train.lora_alpha": 4, "train.learning_rate": 1e-2, "train.train_batch_size": 1,
       "train.max_train_steps": 3, "train.checkpointing_steps": 1, "validate.eval_every_n_steps": 0}
KILL_AFTER = 2
# what a SIGKILL during step 3's checkpoint save leaves (flux2lora.train.checkpoint writes under this name, then
# renames): planted in this run's killed project
HALF_SAVED_IN, HALF_SAVED = ("klein-4b", "lora"), "outputs/checkpoints/.tmp-step-000003-99999"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{(flavour, kind): (straight project, killed-and-resumed project)}."""
    base = tmp_path_factory.mktemp("resume")
    tracking = {"tracking.tracking_uri": f"sqlite:///{base / 'mlflow.db'}"}  # one store: its tables made once
    encoded = {}
    for flavour in FLAVOURS:
        encoded[flavour] = make_project(base / flavour / "encoded", flavour=flavour, git=False, images=2, **RUN,
                                        **tracking)
        for stage in ("prepare", "encode-text", "encode-latents"):
            run_stage(stage, encoded[flavour] / "params.yaml")
    pairs = {}
    for flavour, kind, params in RUNS:
        straight = copy_project(encoded[flavour], base / flavour / kind / "straight", **params)
        run_stage("train", straight / "params.yaml")
        pairs[flavour, kind] = (straight, copy_project(encoded[flavour], base / flavour / kind / "killed", **params))
    kill_trains_after_step([killed for _, killed in pairs.values()], KILL_AFTER)
    half_saved = pairs[HALF_SAVED_IN][1] / HALF_SAVED
    half_saved.mkdir()
    (half_saved / "lora.safetensors").write_bytes(b"\0" * 100)  # cut off mid-write
    for flavour, kind in pairs:
        killed = pairs[flavour, kind][1]
        assert not (killed / "outputs/lora/pytorch_lora_weights.safetensors").exists()
        summary = run_stage("train", killed / "params.yaml")
        assert summary["resumed_from_step"] == KILL_AFTER, (flavour, kind, summary)
    return pairs


@pytest.mark.parametrize("flavour,kind", [(flavour, kind) for flavour, kind, _ in RUNS])
def test_killed_with_sigkill_and_resumed_ends_with_the_same_adapter(runs, flavour, kind):
    straight, killed = runs[flavour, kind]
    checkpoint = load_file(str(killed / f"outputs/checkpoints/step-{KILL_AFTER:06d}/lora.safetensors"))
    assert any(TAGS[kind] in k for k in checkpoint)  # the kind's own tensors were checkpointed
    a = load_file(str(straight / "outputs/lora/pytorch_lora_weights.safetensors"))
    b = load_file(str(killed / "outputs/lora/pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and any(TAGS[kind] in k for k in a)
    if kind == "lora":
        assert not any(TAGS["dora"] in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the resumed run trained step 3: its adapter is not step 2's
    moved = {k.removeprefix("transformer."): v for k, v in b.items()}
    assert any(not torch.equal(moved[k], v) for k, v in checkpoint.items() if k in moved)


def test_a_checkpoint_half_written_when_killed_is_removed_and_the_one_before_it_resumed(runs):
    killed = runs[HALF_SAVED_IN][1]
    assert not (killed / HALF_SAVED).exists()
    assert not list((killed / "outputs/checkpoints").glob(".tmp-*"))
