"""The `validate` stage: images from the pipeline with the trained LoRA, beside the base model's, for fixed seeds.

This stage owns the end-of-training validation: it renders the final LoRA (step = max_train_steps) into
`validation/`, a DVC output, so changing only the prompts or the resolution re-runs this stage and not training.
The training loop validates only at the intermediate steps (`validate.validation_step_interval`).

Prompt embeddings come from the encode-text cache (validation prompts and the empty negative prompt are cached
there), so validation never loads the text encoder. Images and a labelled grid go to the training run in MLflow.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from .. import tracking
from ..config import Params
from ..io import write_json_atomic
from ..layout import layout_for
from ..models import load_generation_pipeline, place_pipeline, resolve_device
from .images import comparison_grid, image_stem, load_cached_prompts, log_validation, render_all

log = logging.getLogger(__name__)


def validate(params: Params, root: Path) -> dict:
    """Render every library prompt at every validation resolution with and without the LoRA; log to MLflow.

    Writes `validation/<prompt>_<W>x<H>_{base,lora}.png`, `validation/grid.png` and `validation/index.json`.
    """
    cfg = params.validate_
    layout = layout_for(root, params.output_dir)
    run_id = tracking.read_run_id(layout.run_file)
    device = resolve_device(params.model.device)
    pipe = load_generation_pipeline(params.model)
    prompts = load_cached_prompts(layout, device, pipe.transformer.dtype)

    # The LoRA is loaded first and switched off for the base images: group offload's hooks move only the weights
    # that exist when they are installed.
    from ..train.lora import load_adapter_weights

    load_adapter_weights(pipe, layout.lora_file, "trained")  # LoRA, DoRA, LoKr: load_lora_weights; LoHa: peft
    # peft creates the adapter's layers in train mode: with train.lora_dropout > 0 its dropout would stay active
    # and make every validation image random
    pipe.transformer.eval()
    # validate.enable_group_offload forces group offload; otherwise the pipeline goes where it fits the GPU
    placement = place_pipeline(pipe, device, placement="group_offload" if cfg.enable_group_offload else None)
    log.info("validate: model %s, flavour %s, device %s, dtype %s, LoRA scale %g, %s", params.model.model_path,
             params.model.model_flavour, device, params.model.base_model_default_dtype, cfg.validation_lora_scale,
             placement)
    pipe.disable_lora()
    base_images = render_all(pipe, params, prompts)
    pipe.enable_lora()
    lora_images = render_all(pipe, params, prompts, lora_scale=cfg.validation_lora_scale)

    step = json.loads(layout.train_metrics.read_text())["steps"]
    out = layout.validation_dir
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for (name, w, h), lora_img in lora_images.items():
        stem = image_stem(name, w, h)
        lora_img.save(out / f"{stem}_lora.png")
        base_images[(name, w, h)].save(out / f"{stem}_base.png")
        files += [f"{stem}_lora.png", f"{stem}_base.png"]
    grid = comparison_grid(base_images, lora_images, cfg.validation_lora_scale, step)
    grid.save(out / "grid.png")

    mlflow = tracking.configure(params, root)
    with mlflow.start_run(run_id=run_id):
        log_validation(mlflow, step, grid, lora_images, base_images)
        mlflow.log_artifact(str(out / "grid.png"), artifact_path="validation")
    summary = {"images": files, "grid": "grid.png", "step": step, "seed": cfg.validation_seed,
               "prompts": prompts.texts, "resolutions": [list(r) for r in cfg.resolutions]}
    write_json_atomic(out / "index.json", summary)
    log.info("validate: %d prompts x %d resolutions rendered to %s", len(prompts.embeds), len(cfg.resolutions), out)
    return summary
