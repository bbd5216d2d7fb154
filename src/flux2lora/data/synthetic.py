"""Generated image folders for tests and benchmarks: good images of many shapes and modes, and every kind of bad
input a real folder contains (zero-byte, garbage, truncated, too small, decompression bomb, mislabelled, missing /
empty / undecodable caption, unsupported format). Deterministic for a seed; nothing is downloaded.
"""

from __future__ import annotations

import io
import random
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# name -> the prepare skip reason it must produce
BAD_INPUTS = {
    "empty.png": "empty_file",
    "garbage.jpg": "unreadable",
    "truncated.jpg": "truncated",
    "tiny.png": "too_small",
    "bomb.png": "too_large",
    "png_named.jpg": "mislabelled",
    "no_caption.png": "missing_caption",
    "empty_caption.png": "empty_caption",
    "latin1_caption.png": "undecodable_caption",
    "animation.gif": "unsupported_format",
}

# Good but awkward files: name -> (mode description, upright (width, height))
AWKWARD_INPUTS = {
    "rotated_exif.jpg": ("EXIF orientation 6 (stored 96x64)", (64, 96)),
    "rgba.png": ("RGBA with transparency", (80, 80)),
    "la.png": ("grayscale + alpha", (80, 80)),
    "palette.png": ("P with a transparent index", (80, 80)),
    "cmyk.jpg": ("CMYK JPEG", (80, 80)),
    "gray16.png": ("16-bit grayscale", (80, 80)),
    "gray.jpg": ("8-bit grayscale", (80, 80)),
}


def shapes_image(width: int, height: int, rng: random.Random) -> Image.Image:
    """An RGB image of a few coloured shapes on a plain background."""
    image = Image.new("RGB", (width, height), tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x0, y0 = rng.randrange(width), rng.randrange(height)
        x1, y1 = x0 + rng.randint(8, max(9, width // 2)), y0 + rng.randint(8, max(9, height // 2))
        colour = tuple(rng.randrange(256) for _ in range(3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
    return image


def write_images(folder: Path, count: int, seed: int = 0, sizes=((96, 96), (128, 96), (96, 128)),
                 start: int = 0, prefix: str = "img", formats=("png", "jpg"), grain: float = 0.0) -> list[Path]:
    """`count` good images with .txt captions, named `<prefix>_<n>`; sizes and formats cycle. `grain` adds
    per-pixel noise of that standard deviation (0-255 scale) so files compress like photos. Returns the images."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for n in range(start, start + count):
        rng = random.Random(f"{seed}:{n}")
        width, height = sizes[n % len(sizes)]
        fmt = formats[n % len(formats)]
        path = folder / f"{prefix}_{n:05d}.{fmt}"
        image = shapes_image(width, height, rng)
        if grain:
            noise = np.random.default_rng(rng.randrange(1 << 30)).normal(0, grain, (height, width, 3))
            image = Image.fromarray((np.asarray(image) + noise).clip(0, 255).astype(np.uint8))
        image.save(path, quality=90) if fmt == "jpg" else image.save(path)
        path.with_suffix(".txt").write_text(f"sks style, picture {n} of coloured shapes\n")
        written.append(path)
    return written


def _png_with_size(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose header claims (width, height): a decompression bomb as far as any reader can tell."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    ihdr = 8 + 8  # PNG signature, then the IHDR chunk's length and type
    data[ihdr:ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr - 4:ihdr + 13]))
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", crc)
    return bytes(data)


def write_bad_inputs(folder: Path, seed: int = 0) -> dict[str, str]:
    """Write one file of every bad-input kind (see BAD_INPUTS) into `folder`. Returns {file name: skip reason}."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    caption = lambda name: (folder / name).with_suffix(".txt").write_text("sks style, a picture\n")  # noqa: E731
    good = shapes_image(96, 96, rng)

    (folder / "empty.png").write_bytes(b"")
    (folder / "garbage.jpg").write_bytes(bytes(rng.randrange(256) for _ in range(2048)))
    jpeg = io.BytesIO()
    shapes_image(256, 256, rng).save(jpeg, "JPEG", quality=95)
    (folder / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    shapes_image(8, 8, rng).save(folder / "tiny.png")
    (folder / "bomb.png").write_bytes(_png_with_size(30000, 30000))
    good.save(folder / "png_named.jpg", "PNG")
    good.save(folder / "animation.gif")
    for name in ("empty.png", "garbage.jpg", "truncated.jpg", "tiny.png", "bomb.png", "png_named.jpg",
                 "animation.gif"):
        caption(name)
    good.save(folder / "no_caption.png")
    good.save(folder / "empty_caption.png")
    (folder / "empty_caption.txt").write_text("  \n")
    good.save(folder / "latin1_caption.png")
    (folder / "latin1_caption.txt").write_bytes("sks style, caf\xe9 cr\xe8me".encode("latin-1"))
    return dict(BAD_INPUTS)


def write_awkward_inputs(folder: Path) -> dict[str, tuple[str, tuple[int, int]]]:
    """Write good images in awkward encodings (see AWKWARD_INPUTS), captioned. Returns AWKWARD_INPUTS."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # stored 96 wide x 64 tall, top half red, bottom half blue; orientation 6 = rotate 90 degrees clockwise to view
    stored = Image.new("RGB", (96, 64), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 96, 32))
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(folder / "rotated_exif.jpg", quality=95, exif=exif)
    rgba = Image.new("RGBA", (80, 80), (0, 0, 0, 0))  # transparent black: must come out white, not black
    rgba.paste((255, 0, 0, 255), (0, 0, 40, 80))
    rgba.save(folder / "rgba.png")
    la = Image.new("LA", (80, 80), (0, 0))
    la.paste((0, 255), (0, 0, 40, 80))
    la.save(folder / "la.png")
    palette = Image.new("P", (80, 80), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.paste(1, (0, 0, 40, 80))
    palette.save(folder / "palette.png", transparency=0)
    Image.new("CMYK", (80, 80), (0, 255, 255, 0)).save(folder / "cmyk.jpg", quality=95)  # pure red in CMYK
    gray16 = np.full((80, 80), 65535, dtype=np.uint16)
    gray16[:, 40:] = 32768
    Image.fromarray(gray16).save(folder / "gray16.png")
    Image.new("L", (80, 80), 128).save(folder / "gray.jpg", quality=95)
    for name in AWKWARD_INPUTS:
        (folder / name).with_suffix(".txt").write_text(f"sks style, {name}\n")
    return dict(AWKWARD_INPUTS)
