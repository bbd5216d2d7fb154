"""Validation images people can judge: every `validation_step_interval` steps during training and, for the final
LoRA, by the validate stage; fixed seeds, the base model beside the LoRA, a labelled grid per step in MLflow."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from helpers import make_project, set_params
from PIL import Image
from safetensors.torch import load_file

from flux2lora.config import load_params, parse_params
from flux2lora.layout import layout_for
from flux2lora.stages import run_stage
from flux2lora.tracking import GRID_IMAGE_KEY

PROMPTS = ("shape_subject", "study_subject")
RESOLUTIONS = ("64x64", "32x48")
STEPS, INTERVAL = 4, 2


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """Tiny klein-4b, 4 training steps validated every 2, two resolutions; then the validate stage. LoRA dropout
    is on so that a validation that left the model in eval mode would change the trained LoRA."""
    root = make_project(tmp_path_factory.mktemp("validation") / "project", git=False, **{
        "train.max_train_steps": STEPS, "train.checkpointing_steps": 100, "train.lora_dropout": 0.1, "train.resume_from_checkpoint": None,
        "validate.validation_step_interval": INTERVAL, "validate.validation_resolution": ",".join(RESOLUTIONS),
        "validate.validation_num_inference_steps": 2})
    for name in ("prepare", "encode-text", "encode-latents", "train", "validate"):
        run_stage(name, root / "params.yaml")
    return root


def _run(root: Path):
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    client = mlflow.tracking.MlflowClient()
    run_id = json.loads(layout_for(root, "outputs").run_file.read_text())["run_id"]
    return client, run_id


def _logged_images(root: Path) -> dict[tuple[str, int], list[str]]:
    """{(image key as MLflow writes it, step): [artifact paths]} for the run's logged images (png only)."""
    client, run_id = _run(root)
    out: dict[tuple[str, int], list[str]] = {}
    for artifact in client.list_artifacts(run_id, "images"):
        name = artifact.path.removeprefix("images/")
        if name.endswith(".png"):
            key, _, rest = name.partition("+step+")
            out.setdefault((key, int(rest.split("+")[0])), []).append(artifact.path)
    return out


def test_grid_is_logged_at_every_interval_and_at_the_end(project):
    """The loop logs step 2; the final step 4 is logged once, by the validate stage (not also by the loop)."""
    images = _logged_images(project)
    grids = {step: paths for (key, step), paths in images.items() if key == GRID_IMAGE_KEY.replace("/", "~")}
    assert sorted(grids) == [2, 4]
    assert all(len(paths) == 1 for paths in grids.values())
    client, run_id = _run(project)
    assert [m.step for m in client.get_metric_history(run_id, "validation_time_s")] == [2]


def test_single_images_are_logged_per_prompt_and_resolution_with_their_step(project):
    images = _logged_images(project)
    for step in (2, 4):
        for name in PROMPTS:
            for resolution in RESOLUTIONS:
                assert (f"validation~{name}_{resolution}", step) in images
                assert (f"validation~base~{name}_{resolution}", step) in images


def test_grid_has_a_row_per_prompt_and_resolution_and_a_column_with_and_without_the_lora(project):
    out = layout_for(project, "outputs").validation_dir
    index = json.loads((out / "index.json").read_text())
    assert index["resolutions"] == [[64, 64], [32, 48]] and index["step"] == STEPS
    assert len(index["images"]) == len(PROMPTS) * len(RESOLUTIONS) * 2
    assert Image.open(out / "study_subject_32x48_lora.png").size == (32, 48)
    grid = Image.open(out / "grid.png")
    rows = len(PROMPTS) * len(RESOLUTIONS)
    assert grid.height >= rows * 64 and grid.width >= 2 * 64


def test_base_images_are_the_same_at_every_step_and_from_both_entry_points(project, tmp_path):
    """Fixed seed and cached prompt embeddings: the base model's image rendered by the loop (adapter disabled on
    the transformer being trained) equals the validate stage's (a fresh pipeline without the LoRA)."""
    client, run_id = _run(project)
    images = _logged_images(project)
    key = "validation~base~shape_subject_64x64"
    arrays = []
    for step in (2, 4):
        local = client.download_artifacts(run_id, images[(key, step)][0], str(tmp_path / str(step)))
        arrays.append(np.asarray(Image.open(local), dtype=np.int16))
    assert np.abs(arrays[0] - arrays[1]).max() <= 1
    lora_key = "validation~shape_subject_64x64"
    lora_2 = client.download_artifacts(run_id, images[(lora_key, 2)][0], str(tmp_path / "lora"))
    assert np.abs(np.asarray(Image.open(lora_2), dtype=np.int16) - arrays[0]).max() > 0  # the LoRA shows


def test_validation_during_training_does_not_change_the_lora(project, tmp_path):
    """The same training without validation ends with a bit-identical LoRA: validation restores train mode,
    requires_grad, LoRA scaling and every random generator."""
    twin = tmp_path / "twin"
    shutil.copytree(project, twin, ignore=shutil.ignore_patterns("mlflow.db", "mlartifacts", "lora", "validation"))
    set_params(twin, **{"validate.validation_step_interval": None, "tracking.tracking_uri": f"sqlite:///{twin}/m.db"})
    run_stage("train", twin / "params.yaml")
    with_validation = load_file(str(layout_for(project, "outputs").lora_file))
    without = load_file(str(layout_for(twin, "outputs").lora_file))
    assert with_validation.keys() == without.keys()
    assert all(torch.equal(with_validation[k], without[k]) for k in without)


def test_inference_state_restores_what_training_needs_even_after_an_error(tmp_path):
    from diffusers.utils.peft_utils import scale_lora_layers

    from flux2lora.models import load_transformer
    from flux2lora.tiny import make_tiny_model
    from flux2lora.train.lora import add_lora, target_modules
    from flux2lora.validate.during_training import inference_state

    model = make_tiny_model(tmp_path / "model", "klein-4b")
    params = parse_params({"model": {"model_flavour": "tiny-klein-4b", "pretrained_model_name_or_path": str(model),
                                     "base_model_default_dtype": "fp32"}})
    transformer = load_transformer(params.model, torch.device("cpu"))
    transformer.requires_grad_(False)
    add_lora(transformer, 4, 4, 0.0, target_modules(transformer, "tiny"))
    transformer.train()
    grads = [p.requires_grad for p in transformer.parameters()]
    layer = transformer.transformer_blocks[0].attn.to_q
    scaling = dict(layer.scaling)
    rng = torch.get_rng_state()
    with pytest.raises(RuntimeError, match="boom"):
        with inference_state(transformer, torch.device("cpu")):
            assert not transformer.training
            transformer.disable_adapters()
            scale_lora_layers(transformer, 0.3)
            torch.rand(10)
            raise RuntimeError("boom")
    assert transformer.training
    assert [p.requires_grad for p in transformer.parameters()] == grads
    assert layer.scaling == scaling and not layer.disable_adapters
    assert torch.equal(torch.get_rng_state(), rng)


class _RecordingPipeline:
    def __init__(self):
        self.calls = []

    def __call__(self, **kwargs):
        self.calls.append(kwargs)
        return type("Out", (), {"images": [Image.new("RGB", (kwargs["width"], kwargs["height"]))]})()


@pytest.mark.parametrize("flavour", ["tiny-klein-4b", "tiny-dev"])
def test_klein_gets_true_cfg_against_the_cached_empty_prompt_and_dev_distilled_guidance(flavour):
    from flux2lora.validate.images import render_image

    params = parse_params({"model": {"model_flavour": flavour}, "validate": {"validation_guidance": 3.5,
                                                                            "validation_seed": 7}})
    pipe, prompt, negative = _RecordingPipeline(), torch.zeros(1, 4, 48), torch.ones(1, 4, 48)
    render_image(pipe, params, prompt, negative, 32, 48, lora_scale=0.8)
    call = pipe.calls[0]
    assert call["guidance_scale"] == 3.5 and call["attention_kwargs"] == {"scale": 0.8}
    assert call["generator"].initial_seed() == 7
    if flavour == "tiny-dev":
        assert "negative_prompt_embeds" not in call  # dev: guidance embedder, no CFG
    else:
        assert call["negative_prompt_embeds"] is negative


def test_validation_step_interval_defaults_to_the_validate_stage_only(tmp_path):
    from flux2lora.validate.during_training import TrainingValidator

    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    assert params.validate_.validation_step_interval in (None, 0)
    assert TrainingValidator.for_training(params, tmp_path, transformer=None, device=torch.device("cpu")) is None


def test_group_offloaded_validation_renders_the_same_images(project, tmp_path):
    """validate.enable_group_offload: transformer and VAE stay in CPU memory behind diffusers' hooks (the LoRA is
    loaded before the hooks); the images are identical to the plain pipeline's."""
    copy = tmp_path / "offloaded"
    shutil.copytree(project, copy, symlinks=True)
    set_params(copy, **{"validate.enable_group_offload": True})
    run_stage("validate", copy / "params.yaml")
    names = sorted(p.name for p in (project / "outputs/validation").glob("*.png") if p.name != "grid.png")
    assert names and names == sorted(p.name for p in (copy / "outputs/validation").glob("*.png")
                                     if p.name != "grid.png")
    for name in names:
        a = np.asarray(Image.open(project / "outputs/validation" / name), dtype=np.int16)
        b = np.asarray(Image.open(copy / "outputs/validation" / name), dtype=np.int16)
        assert np.array_equal(a, b), name


def test_the_lora_file_renders_deterministically_although_trained_with_dropout(project):
    """The fixture trains with lora_dropout 0.1. The file's adapter metadata says 0 (peft would otherwise rebuild
    the dropout, in train mode, for everyone loading it), and a plain diffusers load renders the same image twice."""
    from flux2lora.train.lora import read_lora_metadata

    lora_file = project / "outputs/lora/pytorch_lora_weights.safetensors"
    assert json.loads(read_lora_metadata(lora_file)["lora_adapter_metadata"])["transformer.lora_dropout"] == 0.0
    from diffusers import Flux2KleinPipeline

    params = load_params(project / "params.yaml")
    pipe = Flux2KleinPipeline.from_pretrained(params.model.model_path, dtype=torch.float32)
    pipe.load_lora_weights(str(lora_file.parent), weight_name=lora_file.name)
    pipe.set_progress_bar_config(disable=True)
    images = [np.asarray(pipe(prompt="a red cube", height=32, width=32, num_inference_steps=2,
                              text_encoder_out_layers=tuple(params.model.flavour.stacked_layers),
                              generator=torch.Generator().manual_seed(0)).images[0]) for _ in range(2)]
    assert np.array_equal(*images)
