"""Masked loss, regularisation data and per-dataset probability (issue 15, item 6): the objective against hand
computations, the regularisation target against the transformer without LoRA, the masks' cache, pairing errors,
the sampling's draw order, the importer's mapping, and one tiny pipeline run with both kinds of dataset."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from flux2lora.config import ParamsError, parse_params
from flux2lora.train.step import MicroBatch, flow_matching_loss

CPU = torch.device("cpu")


class FixedPrediction(torch.nn.Module):
    """A stand-in transformer call that returns a given prediction (B, h*w, C): the objective alone is tested."""

    def __init__(self, prediction: torch.Tensor):
        super().__init__()
        self.prediction = prediction

    def forward(self, generator=None, **inputs):
        return self.prediction


def test_masked_loss_equals_a_hand_computation():
    g = torch.Generator().manual_seed(0)
    b, c, h, w = 2, 128, 2, 3
    x0, noise = torch.randn(b, c, h, w, generator=g), torch.randn(b, c, h, w, generator=g)
    prediction = torch.randn(b, h * w, c, generator=g)
    mask = torch.tensor([[[1.0, 0.0, 0.5], [0.25, 1.0, 0.0]], [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]])
    batch = MicroBatch(x0, torch.zeros(b, 4, 8), noise, torch.full((b,), 0.5), loss_mask=mask)
    loss = flow_matching_loss(FixedPrediction(prediction), batch, CPU, None, torch.float32)
    total = 0.0
    for s in range(b):
        for i in range(h):
            for j in range(w):
                token = i * w + j  # row-major: pack()'s token order
                velocity = noise[s, :, i, j] - x0[s, :, i, j]
                total += float(mask[s, i, j]) * float(((prediction[s, token] - velocity) ** 2).sum())
    assert float(loss) == pytest.approx(total / (b * h * w * c), rel=1e-6)  # float32 sums
    # an all-ones mask is plain training's MSE
    plain = MicroBatch(x0, torch.zeros(b, 4, 8), noise, torch.full((b,), 0.5))
    ones = MicroBatch(x0, torch.zeros(b, 4, 8), noise, torch.full((b,), 0.5), loss_mask=torch.ones(b, h, w))
    model = FixedPrediction(prediction)
    assert float(flow_matching_loss(model, ones, CPU, None, torch.float32)) == pytest.approx(
        float(flow_matching_loss(model, plain, CPU, None, torch.float32)), rel=1e-6)


@pytest.fixture(scope="module")
def lora_and_base():
    """A tiny FLUX.2 transformer with a LoRA whose B is non-zero (it changes the output), and its copy without."""
    from flux2lora.flavours import get_flavour
    from flux2lora.tiny import _transformer
    from flux2lora.train.lora import add_lora
    from flux2lora.train.model import TrainingModel

    base = _transformer(get_flavour("tiny-klein-4b"), seed=0).eval()
    adapted = copy.deepcopy(base)
    add_lora(adapted, 4, 4, 0.0, ["to_q", "to_k", "to_v", "to_out.0"], "gaussian")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return TrainingModel(adapted), TrainingModel(base)


def tiny_batch(regularisation=None, loss_mask=None) -> MicroBatch:
    g = torch.Generator().manual_seed(2)
    x0, noise = torch.randn(2, 128, 2, 2, generator=g), torch.randn(2, 128, 2, 2, generator=g)
    return MicroBatch(x0, None, noise, torch.tensor([0.3, 0.8]), None, None, loss_mask, regularisation)


def test_regularisation_target_is_the_base_models_prediction_and_the_loss_a_hand_computation(lora_and_base):
    from flux2lora.latents import pack
    from flux2lora.train.datasets import base_prediction
    from flux2lora.train.forward import predict

    adapted, base = lora_and_base
    dim = adapted.transformer.config.joint_attention_dim
    batch = tiny_batch(regularisation=torch.tensor([True, False]))
    batch.prompt_embeds = torch.randn(2, 8, dim, generator=torch.Generator().manual_seed(3))
    s = batch.sigmas.view(-1, 1, 1, 1)
    noisy = (1 - s) * batch.x0 + s * batch.noise
    with torch.no_grad():
        expected = predict(base, noisy, batch.prompt_embeds, batch.sigmas, None, None)  # no LoRA at all
        with_lora = predict(adapted, noisy, batch.prompt_embeds, batch.sigmas, None, None)
    target = base_prediction(adapted, noisy, batch, None, torch.float32)
    assert torch.equal(target, expected)  # bitwise: a disabled peft layer runs its base layer alone
    assert not torch.allclose(with_lora, expected)  # the LoRA does change the prediction
    assert all(p.requires_grad for n, p in adapted.named_parameters() if "lora_" in n)  # adapter back on
    loss = flow_matching_loss(adapted, batch, CPU, None, torch.float32)
    assert loss.requires_grad
    velocity = pack(batch.noise - batch.x0)
    hand = torch.cat([(with_lora[0] - expected[0]) ** 2, (with_lora[1] - velocity[1]) ** 2]).mean()
    assert float(loss.detach()) == pytest.approx(float(hand), rel=1e-5)  # the same forwards; float32 reductions


def test_mask_cache_is_the_share_of_each_token_s_pixels(tmp_path):
    from flux2lora.cache.masks import latent_mask
    from flux2lora.data.buckets import CropPlan
    import hashlib

    mask = Image.new("L", (32, 48), 0)
    mask.paste(255, (0, 0, 16, 48))  # left column of tokens kept
    mask.paste(255, (16, 0, 24, 16))  # half of the top-right token
    mask.save(tmp_path / "m.png")
    sha = hashlib.sha256((tmp_path / "m.png").read_bytes()).hexdigest()
    weights = latent_mask(tmp_path, "m.png", sha, CropPlan(bucket=(32, 48), resize=(32, 48), offset=(0, 0)))
    assert weights.tolist() == [[1.0, 0.5], [1.0, 0.0], [1.0, 0.0]]
    again = latent_mask(tmp_path, "m.png", sha, CropPlan(bucket=(32, 48), resize=(32, 48), offset=(0, 0)))
    assert torch.equal(weights, again)
    with pytest.raises(ValueError, match="m.png .a mask. changed since prepare"):
        latent_mask(tmp_path, "m.png", "0" * 64, CropPlan(bucket=(32, 48), resize=(32, 48), offset=(0, 0)))


# --------------------------------------------------------------------------------------------------------------
# configuration and prepare


def project(root: Path, datasets: list[dict]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump({"output_dir": "outputs",
                                                      "prepare": {"data_root": "data", "datasets": datasets,
                                                                  "resolution": 32, "crop": True}}))
    return root


def images(folder: Path, names: list[str], size=(48, 48), mode="RGB") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        Image.new(mode, size, (i * 40) % 256 if mode == "L" else (i * 40 % 256, 90, 200)).save(folder / f"{name}.png")
        if mode == "RGB":
            (folder / f"{name}.txt").write_text(f"image {name}\n")


def test_config_errors_name_the_dataset_and_key():
    with pytest.raises(ParamsError, match="'m'.*is_regularisation_data applies to image datasets only"):
        parse_params({"prepare": {"datasets": [{"id": "a", "instance_data_dir": "d"},
                                               {"id": "m", "dataset_type": "mask", "instance_data_dir": "m",
                                                "is_regularisation_data": True}]}})
    with pytest.raises(ParamsError, match="every enabled image dataset has is_regularisation_data"):
        parse_params({"prepare": {"datasets": [{"id": "a", "instance_data_dir": "d",
                                                "is_regularisation_data": True}]}})
    with pytest.raises(ParamsError, match="probability"):
        parse_params({"prepare": {"datasets": [{"id": "a", "instance_data_dir": "d", "probability": -1}]}})
    with pytest.raises(ParamsError, match="'a': conditioning_data names 2 mask datasets"):
        parse_params({"prepare": {"datasets": [{"id": "a", "instance_data_dir": "d", "conditioning_data": ["m", "n"]},
                                               {"id": "m", "dataset_type": "mask", "instance_data_dir": "m"},
                                               {"id": "n", "dataset_type": "conditioning", "conditioning_type": "mask",
                                                "instance_data_dir": "n"}]}})
    params = parse_params({"prepare": {"datasets": [{"id": "a", "instance_data_dir": "d", "conditioning_data": "m"},
                                                    {"id": "m", "dataset_type": "mask", "instance_data_dir": "m"}]}})
    assert (params.prepare.datasets[1].dataset_type, params.prepare.datasets[1].conditioning_type) == \
        ("conditioning", "mask")


def test_prepare_pairs_masks_by_name_and_names_a_missing_or_mis_sized_mask(tmp_path):
    from flux2lora.stages import run_stage

    datasets = [{"id": "subject", "instance_data_dir": "data/subject", "conditioning_data": ["masks"],
                 "probability": 2},
                {"id": "masks", "dataset_type": "conditioning", "conditioning_type": "mask",
                 "instance_data_dir": "data/masks"},
                {"id": "reg", "instance_data_dir": "data/reg", "is_regularisation_data": True}]
    root = project(tmp_path, datasets)
    images(root / "data/subject", ["a", "b"])
    images(root / "data/masks", ["a"], mode="L")
    images(root / "data/reg", ["r"])
    with pytest.raises(FileNotFoundError, match=r"mask dataset 'masks': no mask for b.png in .*data/masks"):
        run_stage("prepare", root / "params.yaml")
    images(root / "data/masks", ["b"], size=(40, 48), mode="L")
    with pytest.raises(ValueError, match=r"data/masks/b.png is 40x48 but its image .*data/subject/b.png is 48x48"):
        run_stage("prepare", root / "params.yaml")
    images(root / "data/masks", ["b"], mode="L")
    run_stage("prepare", root / "params.yaml")
    rows = {r["id"]: r for r in map(json.loads, (root / "outputs/prepare/images.jsonl").read_text().splitlines())}
    a = rows["subject/a.png"]
    assert a["mask"]["path"] == "data/masks/a.png" and a["probability"] == 2 and "references" not in a
    assert {k: a["mask"][k] for k in ("bucket", "resize", "offset")} == {k: a[k] for k in ("bucket", "resize",
                                                                                         "offset")}
    assert rows["reg/r.png"]["regularisation"] is True and "mask" not in rows["reg/r.png"]


# --------------------------------------------------------------------------------------------------------------
# per-dataset probability


class Item:
    def __init__(self, name: str, dataset: str, probability):
        self.name, self.dataset, self.probability = name, dataset, probability
        self.bucket, self.repeats = (64, 64), 0


def test_probability_draws_are_seeded_resume_exact_and_weighted():
    from flux2lora.data.sampling import BucketBatches, WeightedDatasetBatches, batches_for

    items = [Item(f"a{i}", "a", 3.0) for i in range(8)] + [Item(f"b{i}", "b", None) for i in range(8)] + \
        [Item(f"z{i}", "z", 0.0) for i in range(8)]
    batches = batches_for(items, 2, seed=7)
    assert isinstance(batches, WeightedDatasetBatches)
    steps = range(0, 9000, 1)
    drawn = [batches.dataset_at(k) for k in steps]
    share = drawn.count("a") / len(drawn)
    assert "z" not in drawn and abs(share - 0.75) < 0.02  # weights 3 x 4 batches : 1 x 4 batches
    fresh = batches_for(items, 2, seed=7)  # a resumed run: a new object, asked from step 5000 on
    assert [[i.name for i in fresh.at(k)] for k in range(5000, 5010)] == \
        [[i.name for i in batches.at(k)] for k in range(5000, 5010)]
    # within a dataset, draws follow that dataset's own bucketed order
    own = BucketBatches([i for i in items if i.dataset == "b"], 2, seed=7)
    b_batches = [[i.name for i in batches.at(k)] for k in range(300) if drawn[k] == "b"]
    assert b_batches == [[i.name for i in own.at(k)] for k in range(len(b_batches))]
    assert batches_for(items, 2, seed=8).dataset_at(0) in ("a", "b")
    plain = [Item(f"a{i}", "a", None) for i in range(4)]
    assert isinstance(batches_for(plain, 2, seed=7), BucketBatches)  # none set: the order as before


def test_importer_maps_simpletuners_keys(tmp_path):
    from flux2lora.config import load_params
    from flux2lora.simpletuner import import_simpletuner

    from helpers import REPO
    import shutil

    project_root = tmp_path / "project"
    project_root.mkdir()
    shutil.copy2(REPO / "params.yaml", project_root / "params.yaml")
    folder = tmp_path / "st"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_family": "flux2", "lora_rank": 4}))
    backends = [{"id": "subject", "type": "local", "instance_data_dir": "data/subject", "conditioning_data": "masks",
                 "probability": 2.0},
                {"id": "masks", "type": "local", "dataset_type": "conditioning", "conditioning_type": "mask",
                 "instance_data_dir": "data/masks"},
                {"id": "reg", "type": "local", "instance_data_dir": "data/reg", "is_regularization_data": True}]
    (folder / "multidatabackend.json").write_text(json.dumps(backends))
    report = import_simpletuner(folder, project_root / "params.yaml")
    status = report.status()
    assert status["multidatabackend.json[reg] is_regularization_data"] == "mapped"
    assert status["multidatabackend.json[subject] probability"] == "mapped"
    datasets = {d.id: d for d in load_params(project_root / "params.yaml").prepare.datasets}
    assert datasets["reg"].is_regularisation_data and datasets["subject"].probability == 2.0
    assert datasets["masks"].conditioning_type == "mask" and datasets["subject"].conditioning_data == ["masks"]


# --------------------------------------------------------------------------------------------------------------
# end to end


@pytest.mark.slow
def test_pipeline_with_a_mask_dataset_and_a_regularisation_dataset(tmp_path):
    """The demo project on the tiny model with its images masked and a regularisation dataset: all six stages."""
    from helpers import make_project

    from flux2lora.cache.latents import encode_latents
    from flux2lora.config import load_params
    from flux2lora.demo import make_demo_dataset
    from flux2lora.stages import STAGES, run_stage
    from flux2lora.train.draws import StepDraws, load_samples
    from flux2lora.layout import layout_for
    from flux2lora.cache.store import TensorStore
    from flux2lora.data.sampling import batches_for

    datasets = [{"id": "demo", "instance_data_dir": "data/demo", "conditioning_data": ["demo_masks"]},
                {"id": "demo_masks", "dataset_type": "mask", "instance_data_dir": "data/demo_masks"},
                {"id": "reg", "instance_data_dir": "data/reg", "is_regularisation_data": True, "probability": 1}]
    root = make_project(tmp_path / "project", images=4, git=True, **{
        "prepare.instance_data_dir": None, "prepare.datasets": datasets, "train.max_train_steps": 4,
        "train.checkpointing_steps": 2, "validate.eval_every_n_steps": 2})
    make_demo_dataset(root / "data" / "reg", count=4, seed=1)
    (root / "data" / "demo_masks").mkdir()
    for image in sorted((root / "data" / "demo").glob("*.png")):
        mask = Image.new("L", Image.open(image).size, 0)
        mask.paste(255, (0, 0, mask.size[0] // 2, mask.size[1]))  # the left half trains
        mask.save(root / "data" / "demo_masks" / image.name)
    for name in STAGES:
        run_stage(name, root / "params.yaml")

    layout = layout_for(root, "outputs")
    index = json.loads((layout.latents_dir / "index.json").read_text())
    assert len(index["masks"]) == 4 and len(index["regularisation"]) == 4 and len(index["probability"]) == 4
    store = TensorStore(layout.latents_dir)
    mask = store.get(next(iter(index["masks"].values())))["mask"]
    # 64 px crop, /16; Lanczos rings a little across the edge between the halves
    assert mask.shape == (4, 4) and mask[:, :2].gt(0.95).all() and mask[:, 2:].lt(0.05).all()
    metrics = json.loads(layout.train_metrics.read_text())
    assert metrics["steps"] == 4 and metrics["final_loss"] == metrics["final_loss"]  # finite, not NaN
    assert (layout.lora_dir / "pytorch_lora_weights.safetensors").exists()
    # the batches trained: both kinds of dataset, each micro-batch carrying its masks or regularisation flags
    params = load_params(root / "params.yaml")
    samples, empty = load_samples(layout)
    batches = batches_for(samples, 2, params.train.seed)
    drawn = {batches.dataset_at(k) for k in range(4)}
    draws = StepDraws(params.train, batches, store, TensorStore(layout.text_embeds_dir), empty, False, CPU)
    kinds = {("mask" if mb.loss_mask is not None else "") + ("reg" if mb.regularisation is not None else "")
             for k in range(8) for mb in draws.micro_batches(k)}
    assert drawn <= {"demo", "reg"} and kinds == {"mask", "reg"}
    # the masks are cached byte-stably: a rerun of encode-latents encodes nothing and keeps the index
    before = (layout.latents_dir / "index.json").read_bytes()
    assert encode_latents(params, root)["encoded"] == 0
    assert (layout.latents_dir / "index.json").read_bytes() == before
