"""The evaluation loss: a fixed eval set (held out, or a fixed sample of the training images) scored at fixed sigmas
with fixed noise; it never changes the LoRA, survives a kill-and-resume exactly, and its held-out images are never
trained on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import copy_project, make_project
from safetensors.torch import load_file

from flux2lora.config import load_params
from flux2lora.layout import layout_for
from flux2lora.stages import run_stage
from flux2lora.tracking import EVAL_LOSS_METRIC
from flux2lora.train.draws import Sample
from flux2lora.train.evaluation import key_fraction, sigma_metric, split_for_evaluation

pytestmark = pytest.mark.slow

SIGMAS = [0.2, 0.5, 0.8]
BASE = {"train.max_train_steps": 8, "train.checkpointing_steps": 4, "train.train_batch_size": 2,
        "train.learning_rate": 0.05, "train.checkpoints_total_limit": 10, "validate.eval_every_n_steps": 2,
        "validate.eval_split": 0.25, "validate.eval_sigmas": SIGMAS}
EVAL_STEPS = [0, 2, 4, 6, 8]


def _samples(ids) -> list[Sample]:
    return [Sample(i, f"lat-{i}", f"txt-{i}") for i in ids]


def _params(**validate):
    from flux2lora.config import parse_params

    return parse_params({"validate": validate})


def test_the_split_is_a_function_of_each_image_key_and_stable_when_images_are_added():
    params = _params(eval_split=0.3, eval_max_samples=100)
    ids = [f"data/demo/img_{i:03d}.png" for i in range(40)]
    training, held, source = split_for_evaluation(_samples(ids), params)
    assert source == "held_out" and held and training
    assert {s.image_id for s in held} == {i for i in ids if key_fraction(i) < 0.3}
    assert not {s.image_id for s in held} & {s.image_id for s in training}
    # more images: those already held out stay held out, those training stay training
    _, held_more, _ = split_for_evaluation(_samples(ids + [f"data/new/{i}.png" for i in range(20)]), params)
    assert {s.image_id for s in held} <= {s.image_id for s in held_more}
    assert not {s.image_id for s in training} & {s.image_id for s in held_more}
    # no split: everything trains, the eval set is a fixed sample of it (capped)
    training_all, sample, source = split_for_evaluation(_samples(ids), _params(eval_max_samples=5))
    assert source == "training_sample" and len(training_all) == 40 and len(sample) == 5
    assert [s.image_id for s in sample] == sorted(ids, key=key_fraction)[:5]


def test_a_split_that_holds_out_everything_is_refused_naming_the_key():
    from flux2lora.errors import UserError

    with pytest.raises(UserError, match="validate.eval_split"):
        split_for_evaluation(_samples(["only.png"]), _params(eval_split=0.5))


def test_best_eval_without_evaluation_is_refused():
    from flux2lora.config import ParamsError, parse_params

    with pytest.raises((ParamsError, ValueError), match="eval_every_n_steps"):
        parse_params({"train": {"checkpoint_selection": "best_eval"}, "validate": {"eval_every_n_steps": 0}})


@pytest.fixture(scope="module")
def encoded(tmp_path_factory) -> Path:
    root = make_project(tmp_path_factory.mktemp("evalloss") / "encoded", git=False, images=8, **BASE)
    for stage in ("prepare", "encode-text", "encode-latents"):
        run_stage(stage, root / "params.yaml")
    return root


_copy = copy_project


def _eval_history(root: Path) -> dict[str, dict[int, float]]:
    from mlflow.tracking import MlflowClient

    layout = layout_for(root, "outputs")
    run_id = json.loads(layout.run_file.read_text())["run_id"]
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    keys = [EVAL_LOSS_METRIC] + [sigma_metric(s) for s in SIGMAS]
    return {k: {m.step: m.value for m in client.get_metric_history(run_id, k)} for k in keys}


@pytest.fixture(scope="module")
def with_eval(encoded, tmp_path_factory) -> Path:
    root = _copy(encoded, tmp_path_factory.mktemp("with-eval"))
    run_stage("train", root / "params.yaml")
    return root


def test_eval_curves_are_in_mlflow_per_sigma_and_the_lora_beats_the_base_on_held_out_images(with_eval):
    history = _eval_history(with_eval)
    for key, curve in history.items():
        assert sorted(curve) == EVAL_STEPS, key
    for step in EVAL_STEPS:  # eval_loss is the mean of the bands
        bands = [history[sigma_metric(s)][step] for s in SIGMAS]
        assert history[EVAL_LOSS_METRIC][step] == pytest.approx(sum(bands) / len(bands), rel=1e-12)
    curve = history[EVAL_LOSS_METRIC]
    assert curve[8] < curve[0], f"the trained LoRA should score below the base on held-out images: {curve}"
    metrics = json.loads(layout_for(with_eval, "outputs").train_metrics.read_text())
    assert metrics["eval_loss"] == pytest.approx(curve[8])
    from mlflow.tracking import MlflowClient

    run_id = json.loads(layout_for(with_eval, "outputs").run_file.read_text())["run_id"]
    tags = MlflowClient(f"sqlite:///{with_eval / 'mlflow.db'}").get_run(run_id).data.tags
    assert tags["eval_set"] == "held_out" and int(tags["eval_images"]) >= 1


def test_evaluation_leaves_training_bitwise_unchanged(with_eval, encoded, tmp_path):
    without = _copy(encoded, tmp_path, **{"validate.eval_every_n_steps": 0})
    run_stage("train", without / "params.yaml")
    a = load_file(str(layout_for(with_eval, "outputs").lora_file))
    b = load_file(str(layout_for(without, "outputs").lora_file))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "evaluation changed the trained LoRA"
    assert _eval_history(without)[EVAL_LOSS_METRIC] == {}


def test_the_eval_curve_is_identical_across_a_kill_and_resume(with_eval, encoded, tmp_path, monkeypatch):
    from flux2lora.faults import InjectedFault

    root = _copy(encoded, tmp_path)
    monkeypatch.setenv("FLUX2LORA_FAULT", "train:step=5")  # after step 4's checkpoint, with step 4's eval logged
    with pytest.raises(InjectedFault):
        run_stage("train", root / "params.yaml")
    monkeypatch.delenv("FLUX2LORA_FAULT")
    run_stage("train", root / "params.yaml")
    assert json.loads(layout_for(root, "outputs").train_metrics.read_text())["resumed_from_step"] == 4
    assert _eval_history(root) == _eval_history(with_eval)  # exact floats, each step logged once
    resumed, uninterrupted = (json.loads(layout_for(r, "outputs").train_metrics.read_text())
                              for r in (root, with_eval))
    for key in ("eval_loss", "best_eval_loss", "best_eval_step", "selected_step"):
        assert resumed[key] == uninterrupted[key], key


def test_a_held_out_image_never_appears_in_a_training_batch(encoded):
    from flux2lora.train.recipe import LoRATrainingRecipe

    params = load_params(encoded / "params.yaml")
    recipe = LoRATrainingRecipe(params, encoded)
    recipe.setup()
    held = {s.image_id for s in recipe.evaluation.samples}
    assert held and recipe.evaluation.source == "held_out"
    assert held == {s.image_id for s in split_for_evaluation(_all_samples(encoded), params)[1]}
    batches = recipe.draws.batches
    trained = {s.image_id for index in range(3 * batches.per_epoch) for s in batches.at(index)}
    assert trained and not trained & held
    # the latents the steps actually load are never a held-out image's
    held_latents = [recipe.draws.latent_store.get(s.latent_key)["latents"] for s in recipe.evaluation.samples]
    for step in range(params.train.max_train_steps):
        for batch in recipe.draws.micro_batches(step):
            for x0 in batch.x0:
                assert not any(torch.equal(x0, h.to(x0)) for h in held_latents)


def _all_samples(root: Path):
    from flux2lora.train.draws import load_samples

    return load_samples(layout_for(root, "outputs"))[0]


# A learning rate that warms up into one too large for the tiny model: the held-out loss falls, then rises.
OVERFIT = {"train.max_train_steps": 40, "train.learning_rate": 0.3, "train.lr_scheduler": "constant_with_warmup",
           "train.lr_warmup_steps": 10, "train.checkpointing_steps": 4, "train.checkpoints_total_limit": 1,
           "train.checkpoint_selection": "best_eval", "train.early_stopping_patience": 3,
           "validate.eval_every_n_steps": 2, "publish.registered_model_name": "evalloss-lora"}


def test_best_eval_publishes_the_lowest_eval_loss_step_and_early_stopping_ends_the_run(encoded, tmp_path, caplog):
    import logging

    from mlflow.tracking import MlflowClient

    root = _copy(encoded, tmp_path, **OVERFIT)
    with caplog.at_level(logging.WARNING, logger="flux2lora.train.recipe"):
        run_stage("train", root / "params.yaml")
    layout = layout_for(root, "outputs")
    curve = _eval_history(root)[EVAL_LOSS_METRIC]
    best = min(curve, key=curve.get)
    metrics = json.loads(layout.train_metrics.read_text())
    assert 0 < best and metrics["selected_step"] == best == metrics["best_eval_step"], (curve, metrics)
    # stopped after 3 evaluations (every 2 steps) without improvement, before max_train_steps
    assert metrics["steps"] == best + 3 * 2 < 40
    assert sorted(curve)[-1] == metrics["steps"] and curve[metrics["steps"]] > curve[best], curve
    assert "early stopping" in metrics["stop_reason"] and "early_stopping_patience=3" in metrics["stop_reason"]
    assert any("early stopping" in r.getMessage() for r in caplog.records)
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    run_id = json.loads(layout.run_file.read_text())["run_id"]
    tags = client.get_run(run_id).data.tags
    assert tags["stop_reason"] == metrics["stop_reason"] and tags["stopped_at_step"] == str(metrics["steps"])
    assert tags["selected_step"] == str(best)
    # the best step's checkpoint survived checkpoints_total_limit: 1, and its LoRA is the one written
    from flux2lora.train.checkpoint import list_checkpoints

    checkpoints = {c.step: c for c in list_checkpoints(layout.checkpoints_dir)}
    assert best in checkpoints and len(checkpoints) == 2, sorted(checkpoints)
    written = load_file(str(layout.lora_file))
    kept = checkpoints[best].lora
    assert {f"transformer.{k}" for k in kept} == set(written)
    assert all(torch.equal(written[f"transformer.{k}"], v) for k, v in kept.items())
    # published: the model card and the registry name the step
    run_stage("publish", root / "params.yaml")
    card = (layout.publish_dir / "README.md").read_text()
    assert f"| published checkpoint | step {best} (lowest eval loss) |" in card
    version = client.get_model_version("evalloss-lora", "1")
    assert version.tags["selected_step"] == str(best)
    assert float(version.tags["eval_loss"]) == pytest.approx(curve[best])
