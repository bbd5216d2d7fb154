"""Every adapter kind (LoRA, LoKr, LoHa, DoRA) on tiny klein-9b and dev: SIGKILLed after a checkpoint, the train
stage resumes and ends with the adapter of an uninterrupted run, bit for bit (CPU).

klein-4b is shown elsewhere: LoRA in tests/test_training.py, LoKr / LoHa / DoRA+TREAD in tests/test_lycoris.py,
DoRA in tests/test_dora.py. Kept cheap: 3 steps, a checkpoint every step, the kill after step 2 (so the resumed
run trains step 3 from step 2's checkpoint), no evaluation loss, one MLflow store for every project, and one
subprocess killing all eight runs (tests/helpers.py: kill_trains_after_step, a forked child per run, SIGKILLed at
flux2lora.faults' `train:step=2:hold` point)."""

from __future__ import annotations

import pytest
import torch
from helpers import copy_project, kill_trains_after_step, make_project
from safetensors.torch import load_file

from flux2lora.stages import run_stage

FLAVOURS = ("klein-9b", "dev")
KINDS = {"lora": {}, "lokr": {"train.lora_type": "lokr"}, "loha": {"train.lora_type": "loha"},
         "dora": {"train.use_dora": True}}
# a tensor only this kind's file has
TAGS = {"lora": "lora_A", "lokr": "lokr_w1", "loha": "hada_w1_a", "dora": "lora_magnitude_vector"}
RUN = {"train.lora_rank": 2, "train.lora_alpha": 4, "train.learning_rate": 1e-2, "train.train_batch_size": 1,
       "train.max_train_steps": 3, "train.checkpointing_steps": 1, "validate.eval_every_n_steps": 0}
KILL_AFTER = 2


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{(flavour, kind): (straight project, killed-and-resumed project)}."""
    base = tmp_path_factory.mktemp("resume")
    tracking = {"tracking.tracking_uri": f"sqlite:///{base / 'mlflow.db'}"}  # one store: its tables made once
    pairs = {}
    for flavour in FLAVOURS:
        encoded = make_project(base / flavour / "encoded", flavour=flavour, git=False, images=2, **RUN, **tracking)
        for stage in ("prepare", "encode-text", "encode-latents"):
            run_stage(stage, encoded / "params.yaml")
        for kind, params in KINDS.items():
            straight = copy_project(encoded, base / flavour / kind / "straight", **params)
            run_stage("train", straight / "params.yaml")
            pairs[flavour, kind] = (straight, copy_project(encoded, base / flavour / kind / "killed", **params))
    kill_trains_after_step([killed for _, killed in pairs.values()], KILL_AFTER)
    for flavour, kind in pairs:
        killed = pairs[flavour, kind][1]
        assert not (killed / "outputs/lora/pytorch_lora_weights.safetensors").exists()
        summary = run_stage("train", killed / "params.yaml")
        assert summary["resumed_from_step"] == KILL_AFTER, (flavour, kind, summary)
    return pairs


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("flavour", FLAVOURS)
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
