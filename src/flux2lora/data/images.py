"""Reading user images safely: every failure becomes a reason, never a crash.

`inspect_image` is what prepare runs once per file (its result is remembered by path, size and mtime); `decode_rgb`
is what encode-latents runs on the bytes it hashes, so an image is encoded exactly as prepare accepted it.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

# 64 megapixels: above this a file is treated as a decompression bomb and skipped before it is decoded (PIL's own
# guard warns at ~89 MP and refuses at ~179 MP). A 64 MP photo is 8K x 8K: far above any training resolution.
MAX_IMAGE_PIXELS = 64 * 1024 * 1024

# What an extension promises; a file whose content is another format is skipped as mislabelled (the user should
# rename it: tools downstream of us, and DVC diffs, trust extensions).
EXPECTED_FORMATS = {".png": {"PNG"}, ".jpg": {"JPEG", "MPO"}, ".jpeg": {"JPEG", "MPO"}, ".webp": {"WEBP"},
                    ".bmp": {"BMP", "DIB"}, ".tif": {"TIFF"}, ".tiff": {"TIFF"}, ".gif": {"GIF"}}

# EXIF orientations 5-8 rotate by 90 degrees: width and height swap.
_TRANSPOSED_ORIENTATIONS = {5, 6, 7, 8}
_EXIF_ORIENTATION = 0x0112
_CONVERTIBLE_MODES = {"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "I", "F",
                      "I;16", "I;16B", "I;16L", "I;16N", "LAB", "HSV"}


class ImageRejected(Exception):
    """The file cannot be used; `reason` is a short machine-friendly code, str(e) the human explanation."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


@dataclass(frozen=True)
class ImageFacts:
    """What prepare needs to know about an accepted file: content hash and upright size (EXIF applied)."""

    sha256: str
    width: int
    height: int
    format: str


def _open(data: bytes, label: str, max_pixels: int) -> Image.Image:
    """PIL image of `data`, header read and size checked, not yet decoded."""
    if not data:
        raise ImageRejected("empty_file", f"{label}: zero-byte file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageRejected("too_large", f"{label}: {e}") from None
    except UnidentifiedImageError:
        raise ImageRejected("unreadable", f"{label}: not an image Pillow can identify") from None
    except Exception as e:  # PIL raises a zoo of errors on hostile headers
        raise ImageRejected("unreadable", f"{label}: {type(e).__name__}: {e}") from None
    width, height = image.size
    if width * height > max_pixels:
        raise ImageRejected("too_large", f"{label}: {width}x{height} is {width * height / 1e6:.0f} MP, above the "
                                         f"{max_pixels / 1e6:.0f} MP decompression-bomb limit")
    if width < 1 or height < 1:
        raise ImageRejected("unreadable", f"{label}: {width}x{height} has no pixels")
    return image


def _decode(image: Image.Image, label: str) -> None:
    """Decode every byte: truncated and corrupt files fail here, not hours later in the VAE stage."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Corrupt EXIF data", "Truncated File Read": judged by the outcome
            image.load()
    except OSError as e:
        text = str(e).lower()
        reason = "truncated" if "truncated" in text or "broken data stream" in text else "unreadable"
        raise ImageRejected(reason, f"{label}: {e}") from None
    except Exception as e:
        raise ImageRejected("unreadable", f"{label}: {type(e).__name__}: {e}") from None


def _orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # a broken EXIF block does not make the pixels unusable
        return 1


def inspect_image(path: Path, max_pixels: int = MAX_IMAGE_PIXELS) -> ImageFacts:
    """Validate one image file: readable, complete, what its extension says, not a decompression bomb.

    The whole file is decoded (JPEGs at reduced scale: the entropy decoder still reads every byte) so truncation is
    caught now. Raises ImageRejected with reason empty_file, unreadable, truncated, too_large or mislabelled.
    """
    label = str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ImageRejected("unreadable", f"{label}: {e.strerror or e}") from None
    image = _open(data, label, max_pixels)
    expected = EXPECTED_FORMATS.get(Path(path).suffix.lower())
    if expected and image.format not in expected:
        raise ImageRejected("mislabelled", f"{label}: the content is {image.format}, not what the extension "
                                           f"{Path(path).suffix} says; rename the file to its real type")
    if image.mode not in _CONVERTIBLE_MODES:
        raise ImageRejected("unreadable", f"{label}: pixel mode {image.mode} cannot be converted to RGB")
    width, height = image.size
    orientation = _orientation(image)
    if image.format == "JPEG":
        image.draft(image.mode, (max(1, width // 8), max(1, height // 8)))  # DCT scaling: ~5x faster, same check
    _decode(image, label)
    if orientation in _TRANSPOSED_ORIENTATIONS:
        width, height = height, width
    return ImageFacts(hashlib.sha256(data).hexdigest(), width, height, image.format)


def decode_rgb(data: bytes, label: str, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """An image file's bytes -> upright 8-bit RGB (EXIF orientation applied, colour converted by `to_rgb`)."""
    image = _open(data, label, max_pixels)
    _decode(image, label)
    return to_rgb(ImageOps.exif_transpose(image))


def _srgb_from_profile(image: Image.Image, icc: bytes, mode: str) -> Image.Image | None:
    """Convert through the embedded ICC profile to sRGB; None when the profile is sRGB already or unusable."""
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        if "srgb" in (ImageCms.getProfileDescription(source) or "").lower():
            return None
        return ImageCms.profileToProfile(image, source, ImageCms.createProfile("sRGB"), outputMode=mode)
    except Exception:  # a broken profile: fall back to Pillow's plain conversion
        return None


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit sRGB.

    Transparency (RGBA, LA, P with a transparent index) is composited onto white rather than dropped to black;
    16-bit and 32-bit grayscale are scaled to 8 bits rather than clipped; CMYK and RGB with a non-sRGB ICC profile
    are converted through the profile.
    """
    icc = image.info.get("icc_profile")
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        peak = float(arr.max()) if arr.size else 1.0
        if image.mode.startswith("I;16"):
            scale = 65535.0
        elif image.mode == "F":
            scale = 1.0 if peak <= 1.0 else peak
        else:  # 32-bit integers: 16-bit data loaded as "I" by some formats, else stretched to the peak
            scale = 255.0 if peak <= 255 else 65535.0 if peak <= 65535 else peak
        image = Image.fromarray((arr / scale * 255.0).round().clip(0, 255).astype("uint8"), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba).convert("RGB")
    if icc and image.mode in ("CMYK", "RGB"):
        converted = _srgb_from_profile(image, icc, "RGB")
        if converted is not None:
            return converted
    return image if image.mode == "RGB" else image.convert("RGB")
