"""A separate eval dataset (`dataset_type: eval`, issue 15 item 1): its images are prepared and encoded like the
rest, are exactly the evaluation loss's set, and never reach a training batch; the refusals; the importer's mapping
of SimpleTuner's `dataset_type: eval` backends."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from flux2lora.config import ParamsError, parse_params
from flux2lora.errors import UserError
from flux2lora.train.draws import Sample
from flux2lora.train.evaluation import EVAL_DATASET, key_fraction, split_for_evaluation


def _samples(ids, eval_ids=()) -> list[Sample]:
    return [Sample(i, f"lat-{i}", f"txt-{i}", eval=i in eval_ids) for i in ids]


def test_eval_samples_are_the_eval_set_and_never_train():
    train_ids = [f"data/demo/img_{i:02d}.png" for i in range(10)]
    eval_ids = [f"data/eval/img_{i:02d}.png" for i in range(6)]
    params = parse_params({"validate": {"eval_max_samples": 4}})
    training, scored, source = split_for_evaluation(_samples(train_ids + eval_ids, set(eval_ids)), params)
    assert source == EVAL_DATASET == "eval_dataset"
    assert [s.image_id for s in training] == train_ids
    # at most eval_max_samples of the eval images, ranked by the same key hash as the other eval sets
    assert [s.image_id for s in scored] == sorted(eval_ids, key=lambda i: (key_fraction(i), i))[:4]
    # evaluation off: the eval images still stay out of training
    training, scored, _ = split_for_evaluation(_samples(train_ids + eval_ids, set(eval_ids)),
                                               parse_params({"validate": {"eval_every_n_steps": 0}}))
    assert [s.image_id for s in training] == train_ids and scored == []


def test_refusals_name_the_keys():
    with pytest.raises(UserError, match="eval dataset"):
        split_for_evaluation(_samples(["e.png"], {"e.png"}), parse_params({}))
    only_eval = {"prepare": {"datasets": [{"id": "held", "dataset_type": "eval", "instance_data_dir": "d"}]}}
    with pytest.raises(ParamsError, match="every enabled image dataset is an eval dataset"):
        parse_params(only_eval)
    both = {"prepare": {"datasets": [{"id": "a", "instance_data_dir": "a"},
                                     {"id": "held", "dataset_type": "eval", "instance_data_dir": "d"}]},
            "validate": {"eval_split": 0.2}}
    with pytest.raises(ParamsError, match=r"validate.eval_split=0.2 and prepare.datasets \['held'\]"):
        parse_params(both)
    with pytest.raises(ParamsError, match="'held'.*is_regularisation_data applies to image datasets only"):
        parse_params({"prepare": {"datasets": [{"id": "a", "instance_data_dir": "a"},
                                               {"id": "held", "dataset_type": "eval", "instance_data_dir": "d",
                                                "is_regularisation_data": True}]}})
    with pytest.raises(ParamsError, match="held.*needs instance_data_dir"):
        parse_params({"prepare": {"datasets": [{"id": "a", "instance_data_dir": "a"},
                                               {"id": "held", "dataset_type": "eval"}]}})


def test_importer_maps_simpletuners_eval_backend(tmp_path):
    import shutil

    from helpers import REPO

    from flux2lora.config import load_params
    from flux2lora.simpletuner import import_simpletuner

    project_root = tmp_path / "project"
    project_root.mkdir()
    shutil.copy2(REPO / "params.yaml", project_root / "params.yaml")
    folder = tmp_path / "st"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_family": "flux2", "lora_rank": 4,
                                                    "eval_steps_interval": 10, "num_eval_images": 2,
                                                    "eval_dataset_id": "held"}))
    backends = [{"id": "subject", "type": "local", "instance_data_dir": "data/subject"},
                {"id": "held", "type": "local", "dataset_type": "eval", "instance_data_dir": "data/held",
                 "caption_strategy": "filename"}]
    (folder / "multidatabackend.json").write_text(json.dumps(backends))
    report = import_simpletuner(folder, project_root / "params.yaml")
    status = report.status()
    assert status["multidatabackend.json[held] dataset_type"] == "mapped"
    # SimpleTuner's eval_dataset_id picks validation's input images, which flux2lora does not take from datasets
    assert status["config.json eval_dataset_id"] == "refused"
    params = load_params(project_root / "params.yaml")
    datasets = {d.id: d for d in params.prepare.datasets}
    assert datasets["held"].dataset_type == "eval" and datasets["subject"].dataset_type == "image"
    assert datasets["held"].caption_strategy == "filename"
    assert (params.validate_.eval_every_n_steps, params.validate_.eval_max_samples, params.validate_.eval_split) == \
        (10, 2, 0)


@pytest.mark.slow
def test_an_eval_datasets_images_are_the_eval_set_and_never_in_a_training_batch(tmp_path):
    from helpers import make_project

    from flux2lora.config import load_params
    from flux2lora.demo import make_demo_dataset
    from flux2lora.layout import layout_for
    from flux2lora.stages import run_stage
    from flux2lora.train.draws import load_samples
    from flux2lora.train.recipe import LoRATrainingRecipe

    datasets = [{"id": "demo", "instance_data_dir": "data/demo"},
                {"id": "held", "dataset_type": "eval", "instance_data_dir": "data/held"}]
    root = make_project(tmp_path / "project", images=4, git=False, **{
        "prepare.instance_data_dir": None, "prepare.datasets": datasets, "train.max_train_steps": 4,
        "train.train_batch_size": 2, "validate.eval_every_n_steps": 2, "validate.eval_max_samples": 2})
    make_demo_dataset(root / "data" / "held", count=3, seed=1)
    for stage in ("prepare", "encode-text", "encode-latents"):
        run_stage(stage, root / "params.yaml")
    layout = layout_for(root, "outputs")
    rows = [json.loads(line) for line in layout.images_manifest.read_text().splitlines()]
    held_ids = {r["id"] for r in rows if r.get("eval")}
    assert len(held_ids) == 3 and all(r["dataset"] == "held" for r in rows if r.get("eval"))
    assert set(json.loads((layout.latents_dir / "index.json").read_text())["eval"]) == held_ids

    params = load_params(root / "params.yaml")
    recipe = LoRATrainingRecipe(params, root)
    recipe.setup()
    scored = {s.image_id for s in recipe.evaluation.samples}
    assert recipe.evaluation.source == "eval_dataset"
    assert scored == set(sorted(held_ids, key=lambda i: (key_fraction(i), i))[:2])
    assert {s.image_id for s in split_for_evaluation(load_samples(layout)[0], params)[1]} == scored
    batches = recipe.draws.batches
    trained = {s.image_id for index in range(3 * batches.per_epoch) for s in batches.at(index)}
    assert len(trained) == 4 and not trained & held_ids
    held_latents = [recipe.draws.latent_store.get(s.latent_key)["latents"] for s in load_samples(layout)[0]
                    if s.image_id in held_ids]
    for step in range(params.train.max_train_steps):
        for batch in recipe.draws.micro_batches(step):
            for x0 in batch.x0:
                assert not any(torch.equal(x0, h.to(x0)) for h in held_latents)
