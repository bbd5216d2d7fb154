"""EMA of the adapter weights: the exported LoRA equals an independent recomputation of diffusers' EMA over the
trained weights the checkpoints hold, and a killed-and-resumed run ends bitwise where an uninterrupted one does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import copy_project, make_project
from safetensors.torch import load_file

from flux2lora.layout import layout_for
from flux2lora.stages import run_stage
from flux2lora.train.checkpoint import list_checkpoints

pytestmark = pytest.mark.slow

# updates after steps 2, 4 and 6 (none after 7); every step is checkpointed, so each update's trained weights are
# on disk; decay 0.2 caps diffusers' warm-up n / (n + 9) from the third update on
EMA = {"train.max_train_steps": 7, "train.checkpointing_steps": 1, "train.checkpoints_total_limit": None,
       "train.train_batch_size": 2, "train.learning_rate": 0.05, "train.use_ema": True, "train.ema_decay": 0.2,
       "train.ema_update_interval": 2, "validate.eval_every_n_steps": 3}


@pytest.fixture(scope="module")
def encoded(tmp_path_factory) -> Path:
    root = make_project(tmp_path_factory.mktemp("ema") / "encoded", git=False, images=6, **EMA)
    for stage in ("prepare", "encode-text", "encode-latents"):
        run_stage(stage, root / "params.yaml")
    return root


_copy = copy_project


@pytest.fixture(scope="module")
def trained(encoded, tmp_path_factory) -> Path:
    root = _copy(encoded, tmp_path_factory.mktemp("ema-run"))
    run_stage("train", root / "params.yaml")
    return root


def _lora(root: Path) -> dict[str, torch.Tensor]:
    return load_file(str(layout_for(root, "outputs").lora_file))


def test_the_exported_lora_is_the_ema_recomputed_over_the_trained_weights(trained):
    checkpoints = {c.step: c.lora for c in list_checkpoints(layout_for(trained, "outputs").checkpoints_dir)}
    assert sorted(checkpoints) == [1, 2, 3, 4, 5, 6]
    shadow = None
    for n, step in enumerate((2, 4, 6), start=1):
        raw = checkpoints[step]
        if shadow is None:
            shadow = {k: v.clone() for k, v in raw.items()}  # the first update copies the weights
            continue
        decay = min(0.2, n / (n + 9))
        shadow = {k: shadow[k] - (1 - decay) * (shadow[k] - raw[k]) for k in shadow}
    written = _lora(trained)
    assert set(written) == {f"transformer.{k}" for k in shadow}
    for key, expected in shadow.items():
        # float32 arithmetic in another order than diffusers' foreach kernels: equal to float32 rounding
        torch.testing.assert_close(written[f"transformer.{key}"], expected, rtol=1e-6, atol=1e-8)
    # and it is not the trained weights of any step
    assert not all(torch.equal(written[f"transformer.{k}"], checkpoints[6][k]) for k in shadow)
    from flux2lora.train.lora import read_lora_metadata

    metadata = read_lora_metadata(layout_for(trained, "outputs").lora_file)
    assert metadata["flux2lora.ema_export"] == "ema"


def test_ema_export_raw_writes_the_trained_weights_and_the_ema_never_changes_training(trained, encoded, tmp_path):
    raw = _copy(encoded, tmp_path / "raw", **{"train.ema_export": "raw"})
    plain = _copy(encoded, tmp_path / "plain", **{"train.use_ema": False})
    for root in (raw, plain):
        run_stage("train", root / "params.yaml")
    a, b = _lora(raw), _lora(plain)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the trained weights of every step are those of a run without EMA (the EMA swapped in for evaluation and
    # copied back leaves them bit for bit)
    with_ema = {c.step: c.lora for c in list_checkpoints(layout_for(trained, "outputs").checkpoints_dir)}
    without = {c.step: c.lora for c in list_checkpoints(layout_for(plain, "outputs").checkpoints_dir)}
    assert with_ema.keys() == without.keys()
    assert all(torch.equal(with_ema[s][k], without[s][k]) for s in with_ema for k in with_ema[s])


def test_an_ema_run_killed_and_resumed_ends_bitwise_equal(trained, encoded, tmp_path, monkeypatch):
    from flux2lora.faults import InjectedFault

    root = _copy(encoded, tmp_path, **{"train.checkpointing_steps": 3})
    monkeypatch.setenv("FLUX2LORA_FAULT", "train:step=5")  # after the update of step 4, resumed from step 3
    with pytest.raises(InjectedFault):
        run_stage("train", root / "params.yaml")
    monkeypatch.delenv("FLUX2LORA_FAULT")
    run_stage("train", root / "params.yaml")
    assert json.loads(layout_for(root, "outputs").train_metrics.read_text())["resumed_from_step"] == 3
    a, b = _lora(root), _lora(trained)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    resumed = json.loads(layout_for(root, "outputs").train_metrics.read_text())
    assert resumed["eval_loss"] == json.loads(layout_for(trained, "outputs").train_metrics.read_text())["eval_loss"]
