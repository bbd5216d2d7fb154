"""Reading user images safely: every failure becomes a reason, never a crash."""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

from PIL import Image, ImageOps

# 64 megapixels: above this a file is treated as a decompression bomb and skipped (PIL's own guard is ~179 MP).
MAX_IMAGE_PIXELS = 64 * 1024 * 1024


class ImageRejected(Exception):
    """The file cannot be used; `reason` is a short machine-friendly code, str(e) the human explanation."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def open_rgb(path: Path, minimum_side: int = 1, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Open `path` as an upright 8-bit RGB image (EXIF orientation applied, alpha composited on white).

    Raises ImageRejected with a reason: empty_file, too_large, unreadable, truncated, too_small.
    """
    if path.stat().st_size == 0:
        raise ImageRejected("empty_file", f"{path}: zero-byte file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as probe:
                width, height = probe.size
                if width * height > max_pixels:
                    raise ImageRejected("too_large", f"{path}: {width}x{height} exceeds {max_pixels} pixels")
                probe.verify()
            image = Image.open(path)
            image.load()
    except ImageRejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageRejected("too_large", f"{path}: {e}") from None
    except OSError as e:
        reason = "truncated" if "truncated" in str(e).lower() or "broken data stream" in str(e).lower() else "unreadable"
        raise ImageRejected(reason, f"{path}: {e}") from None
    except Exception as e:  # PIL raises a zoo of errors on hostile files
        raise ImageRejected("unreadable", f"{path}: {type(e).__name__}: {e}") from None
    image = ImageOps.exif_transpose(image)
    image = to_rgb(image)
    if min(image.size) < minimum_side:
        raise ImageRejected("too_small", f"{path}: {image.size[0]}x{image.size[1]}, shorter side < {minimum_side}")
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparency is composited onto white rather than dropped to black."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grayscale: scale to 8 bits instead of clipping everything above 255 to white
        import numpy as np

        arr = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        image = Image.fromarray((arr / peak * 255.0).clip(0, 255).astype("uint8"), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")
