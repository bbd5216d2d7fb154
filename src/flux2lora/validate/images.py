"""Validation images: cached prompt embeddings in, base and LoRA images and a labelled grid out, logged to MLflow.

Shared by the `validate` stage (the final LoRA, after training) and by validation during training
(`during_training.py`). Both render the same prompts at the same resolutions with the same seed, so an image at
step 200 is comparable with the one at step 400, and with the same prompt in another run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image, ImageDraw

from ..cache.store import TensorStore
from ..cache.text import read_prompt_index
from ..config import Params
from ..tracking import GRID_IMAGE_KEY

BASE, LORA = "base", "lora"

# (prompt shortname, width, height) -> image
Images = dict[tuple[str, int, int], Image.Image]


@dataclass
class CachedPrompts:
    """Validation prompts as the encode-text stage cached them: embeddings (1, 512, joint_attention_dim) per
    shortname, the empty prompt's (the klein CFG negative), and the prompt texts (with `<subject>` replaced)."""

    embeds: dict[str, torch.Tensor]
    negative: torch.Tensor
    texts: dict[str, str]


def load_cached_prompts(layout, device: torch.device, dtype: torch.dtype) -> CachedPrompts:
    """Read the validation prompts' embeddings from `prompt_embeds/` (no text encoder is loaded)."""
    index = read_prompt_index(layout)
    store = TensorStore(layout.prompt_embeds_dir)
    if not index.get("prompts"):
        raise ValueError("validation: the prompt library has no prompts in the text cache; re-run encode-text")

    def load(key: str) -> torch.Tensor:
        return store.get(key)["prompt_embeds"][None].to(device, dtype)

    return CachedPrompts(embeds={name: load(key) for name, key in index["prompts"].items()},
                         negative=load(index["empty"]), texts=dict(index["prompt_texts"]))


def render_image(pipe, params: Params, prompt_embeds: torch.Tensor, negative_embeds: torch.Tensor,
                 width: int, height: int, lora_scale: float | None = None, label: str | None = None) -> Image.Image:
    """One image for cached embeddings (1, L, D) with `validate.validation_seed`.

    dev: `validation_guidance` is the distilled-guidance input (no negative prompt); klein base: true CFG at
    `validation_guidance` against the cached empty prompt. `lora_scale` scales the active LoRA (None: no LoRA).
    label: a progress bar over the denoising steps, titled with it (None: the pipeline's progress bar setting).
    """
    cfg = params.validate_
    if label is not None:
        pipe.set_progress_bar_config(desc=label, leave=False)
    kwargs = dict(prompt_embeds=prompt_embeds, width=width, height=height,
                  num_inference_steps=cfg.validation_num_inference_steps, guidance_scale=cfg.validation_guidance,
                  generator=torch.Generator("cpu").manual_seed(cfg.validation_seed))
    if params.model.flavour.is_klein:
        kwargs["negative_prompt_embeds"] = negative_embeds
    if lora_scale is not None:
        kwargs["attention_kwargs"] = {"scale": lora_scale}
    with torch.inference_mode():
        return pipe(**kwargs).images[0]


def render_all(pipe, params: Params, prompts: CachedPrompts, lora_scale: float | None = None) -> Images:
    """Every prompt at every `validation_resolution`."""
    which = "base" if lora_scale is None else f"LoRA x{lora_scale:g}"
    return {(name, w, h): render_image(pipe, params, emb, prompts.negative, w, h, lora_scale,
                                       label=f"validation {name} {w}x{h} {which}")
            for name, emb in prompts.embeds.items() for (w, h) in params.validate_.resolutions}


def labelled_grid(rows: list[tuple[str, list[Image.Image]]], column_titles: list[str],
                  title: str | None = None) -> Image.Image:
    """A grid with one labelled row per prompt, a text label above every column and an optional title line."""
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    cell_w = max([img.width for _, imgs in rows for img in imgs]
                 + [int(measure.textlength(t)) + 8 for t in column_titles])
    cell_h = max(img.height for _, imgs in rows for img in imgs)
    label_h = 14
    title_h = label_h if title else 0
    label_w = max(int(measure.textlength(name)) + 8 for name, _ in rows)
    grid = Image.new("RGB", (label_w + cell_w * len(column_titles),
                             title_h + label_h + len(rows) * (cell_h + label_h)), "white")
    draw = ImageDraw.Draw(grid)
    if title:
        draw.text((2, 1), title, fill="black")
    for c, column in enumerate(column_titles):
        draw.text((label_w + c * cell_w + 2, title_h + 1), column, fill="black")
    for r, (name, images) in enumerate(rows):
        y = title_h + label_h + r * (cell_h + label_h)
        draw.text((2, y + cell_h // 2), name, fill="black")
        for c, img in enumerate(images):
            grid.paste(img, (label_w + c * cell_w, y))
    return grid


def comparison_grid(base: Images, lora: Images, lora_scale: float, step: int) -> Image.Image:
    """Rows: prompt x resolution; columns: the base model, then with the LoRA."""
    rows = [(f"{name} {w}x{h}", [base[(name, w, h)], image]) for (name, w, h), image in lora.items()]
    return labelled_grid(rows, ["base model", f"with LoRA (scale {lora_scale:g})"], title=f"step {step}")


def image_stem(name: str, width: int, height: int) -> str:
    return f"{name}_{width}x{height}"


def log_validation(mlflow, step: int, grid: Image.Image, lora: Images, base: Images | None = None) -> None:
    """Log the grid and the single images to the active MLflow run at `step` (MLflow shows them per step).

    Keys: `training/validation_grid` (tracking.GRID_IMAGE_KEY: beside the loss charts on the run page),
    `validation/<prompt>_<W>x<H>` (with the LoRA) and, when given, `validation/base/<prompt>_<W>x<H>` (the base
    model, which does not change from step to step).
    """
    mlflow.log_image(grid, key=GRID_IMAGE_KEY, step=step)
    for (name, w, h), image in lora.items():
        mlflow.log_image(image, key=f"validation/{image_stem(name, w, h)}", step=step)
    for (name, w, h), image in (base or {}).items():
        mlflow.log_image(image, key=f"validation/base/{image_stem(name, w, h)}", step=step)
