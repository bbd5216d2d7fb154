"""A small generated image/caption dataset for the demo and the tests: coloured shapes on plain backgrounds."""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40),
           "purple": (140, 60, 180), "orange": (240, 140, 30), "white": (245, 245, 245), "black": (20, 20, 20)}
SHAPES = ("circle", "square", "triangle")

DEMO_PROMPT_LIBRARY = {
    "shape_subject": "a photo of <subject>, a red circle on a blue background",
    "study_subject": "<subject>, a yellow triangle on a black background",
}


def draw_shape(size: int, shape: str, fg: tuple, bg: tuple, rng: random.Random) -> Image.Image:
    image = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(image)
    r = rng.randint(size // 5, size // 3)
    cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fg)
    elif shape == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fg)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fg)
    return image


def make_demo_dataset(folder: Path, count: int = 8, size: int = 96, seed: int = 0, trigger: str = "sks style") -> Path:
    """Write `count` PNG images with `.txt` captions into `folder` (deterministic for a seed)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    names = list(COLOURS)
    for i in range(count):
        fg_name, bg_name = rng.sample(names, 2)
        shape = SHAPES[i % len(SHAPES)]
        draw_shape(size, shape, COLOURS[fg_name], COLOURS[bg_name], rng).save(folder / f"shape_{i:03d}.png")
        (folder / f"shape_{i:03d}.txt").write_text(f"{trigger}, a {fg_name} {shape} on a {bg_name} background\n")
    return folder


def write_prompt_library(path: Path) -> Path:
    Path(path).write_text(json.dumps(DEMO_PROMPT_LIBRARY, indent=2) + "\n")
    return Path(path)
