"""The `validate` stage: images from the pipeline with the trained LoRA, beside the base model's, for fixed seeds.

Prompt embeddings come from the encode-text cache (validation prompts and the empty negative prompt are cached
there), so validation never loads the text encoder. Images and a labelled grid go to the training run in MLflow.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from .. import tracking
from ..cache.store import TensorStore
from ..cache.text import read_text_index
from ..config import Params
from ..io import write_json_atomic
from ..layout import layout_for
from ..models import load_generation_pipeline, resolve_device

log = logging.getLogger(__name__)


def generate_images(pipe, params: Params, prompt_embeds: torch.Tensor, negative_embeds: torch.Tensor,
                    width: int, height: int, seed: int) -> Image.Image:
    """One image for cached embeddings (1, L, D); dev gets distilled guidance, klein base true CFG against ""."""
    cfg = params.validate_
    kwargs = dict(prompt_embeds=prompt_embeds, width=width, height=height,
                  num_inference_steps=cfg.validation_num_inference_steps, guidance_scale=cfg.validation_guidance,
                  generator=torch.Generator("cpu").manual_seed(seed))
    if params.model.flavour.is_klein:
        kwargs["negative_prompt_embeds"] = negative_embeds
    with torch.inference_mode():
        return pipe(**kwargs).images[0]


def labelled_grid(rows: list[tuple[str, list[Image.Image]]], column_titles: list[str]) -> Image.Image:
    """A grid with one row per prompt and a text label above every column."""
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    cell_w = max([img.width for _, imgs in rows for img in imgs]
                 + [int(measure.textlength(t)) + 8 for t in column_titles])
    cell_h = max(img.height for _, imgs in rows for img in imgs)
    label_h = 14
    label_w = max(int(measure.textlength(name)) + 8 for name, _ in rows)
    grid = Image.new("RGB", (label_w + cell_w * len(column_titles), label_h + len(rows) * (cell_h + label_h)), "white")
    draw = ImageDraw.Draw(grid)
    for c, title in enumerate(column_titles):
        draw.text((label_w + c * cell_w + 2, 1), title, fill="black")
    for r, (name, images) in enumerate(rows):
        y = label_h + r * (cell_h + label_h)
        draw.text((2, y + cell_h // 2), name, fill="black")
        for c, img in enumerate(images):
            grid.paste(img, (label_w + c * cell_w, y))
    return grid


def validate(params: Params, root: Path) -> dict:
    """Render every library prompt at every validation resolution with and without the LoRA; log to MLflow."""
    cfg = params.validate_
    layout = layout_for(root, params.output_dir)
    run_id = tracking.read_run_id(layout.run_file)
    text_index = read_text_index(layout)
    store = TensorStore(layout.text_embeds_dir)
    device = resolve_device(params.model.device)
    pipe = load_generation_pipeline(params.model, device)
    dtype = pipe.transformer.dtype
    negative = store.get(text_index["empty"])["prompt_embeds"][None].to(device, dtype)
    prompts = {name: store.get(key)["prompt_embeds"][None].to(device, dtype)
               for name, key in text_index["prompts"].items()}

    def render() -> dict[tuple[str, int, int], Image.Image]:
        return {(name, w, h): generate_images(pipe, params, emb, negative, w, h, cfg.validation_seed)
                for name, emb in prompts.items() for (w, h) in cfg.resolutions}

    base_images = render()
    pipe.load_lora_weights(str(layout.lora_dir), weight_name=layout.lora_file.name, adapter_name="trained")
    pipe.set_adapters(["trained"], adapter_weights=[cfg.validation_lora_scale])
    lora_images = render()

    out = layout.validation_dir
    out.mkdir(parents=True, exist_ok=True)
    files, rows = [], []
    for (name, w, h), lora_img in lora_images.items():
        stem = f"{name}_{w}x{h}"
        lora_img.save(out / f"{stem}_lora.png")
        base_images[(name, w, h)].save(out / f"{stem}_base.png")
        files += [f"{stem}_lora.png", f"{stem}_base.png"]
        rows.append((f"{name} {w}x{h}", [base_images[(name, w, h)], lora_img]))
    grid = labelled_grid(rows, ["base model", f"with LoRA (scale {cfg.validation_lora_scale:g})"])
    grid.save(out / "grid.png")

    import json

    step = json.loads(layout.train_metrics.read_text())["steps"]
    mlflow = tracking.configure(params, root)
    with mlflow.start_run(run_id=run_id):
        mlflow.log_image(grid, key="validation/grid", step=step)
        for (name, w, h), img in lora_images.items():
            mlflow.log_image(img, key=f"validation/{name}_{w}x{h}", step=step)
        mlflow.log_artifact(str(out / "grid.png"), artifact_path="validation")
    summary = {"images": files, "grid": "grid.png", "step": step, "seed": cfg.validation_seed,
               "prompts": text_index["prompt_texts"], "resolutions": [list(r) for r in cfg.resolutions]}
    write_json_atomic(out / "index.json", summary)
    log.info("validate: %d prompts x %d resolutions rendered to %s", len(prompts), len(cfg.resolutions), out)
    return summary
