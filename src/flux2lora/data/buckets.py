"""Aspect buckets: the training size of each image, aligned to 16 px, and how it is cropped to it.

The seed's rules: `resolution` in `resolution_type` units (pixel = shorter side, pixel_area = side of an equal-area
square, area = megapixels) sets the size; `crop_aspect` the shape (square; preserve = the image's own; closest / random
= one of `crop_aspect_buckets`); `crop_style` where the crop sits (center, random, corner = bottom-right). An image is
resized to cover its bucket (aspect kept, Lanczos, as the pipelines resize) and then cropped; the centre crop is the
one the pipelines' Flux2ImageProcessor takes. Random choices are seeded by the image's content hash: a rerun gives the
same bucket and crop, and so reuses the cache.

Sides are multiples of 16: the VAE downsamples by 8 and latents are patchified 2x2.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from PIL import Image

from .config import DEFAULT_ASPECT_BUCKETS, MEGAPIXEL, DatasetOptions

ALIGN = 16


@dataclass(frozen=True)
class CropPlan:
    """How one image becomes a training image: resize to `resize` (covers `bucket`), crop `bucket` at `offset`.

    All sizes (width, height) in pixels; `offset` is (left, top) inside the resized image.
    """

    bucket: tuple[int, int]
    resize: tuple[int, int]
    offset: tuple[int, int]

    def to_json(self) -> dict:
        return {"bucket": list(self.bucket), "resize": list(self.resize), "offset": list(self.offset)}

    @classmethod
    def from_json(cls, row: dict) -> "CropPlan":
        return cls(tuple(row["bucket"]), tuple(row["resize"]), tuple(row["offset"]))


def align(value: float) -> int:
    """Nearest multiple of 16 (halves round up), at least 16."""
    return max(ALIGN, math.floor(value / ALIGN + 0.5) * ALIGN)


def size_for_aspect(aspect: float, resolution: float, resolution_type: str) -> tuple[int, int]:
    """(width, height), multiples of 16, of an image with `aspect` = width/height at `resolution`."""
    if resolution_type == "pixel":  # the shorter side is the resolution
        short = resolution
        width, height = (short * aspect, short) if aspect >= 1 else (short, short / aspect)
    else:
        side = math.sqrt(resolution * MEGAPIXEL) if resolution_type == "area" else resolution
        width, height = side * math.sqrt(aspect), side / math.sqrt(aspect)
    return align(width), align(height)


def aspect_range(options: DatasetOptions) -> tuple[float, float]:
    """The smallest and largest bucket aspect ratio (width/height) of a dataset: its crop_aspect_buckets, else
    DEFAULT_ASPECT_BUCKETS (1:2 .. 2:1)."""
    buckets = options.crop_aspect_buckets or DEFAULT_ASPECT_BUCKETS
    return min(buckets), max(buckets)


def aspect_out_of_range(width: int, height: int, options: DatasetOptions) -> str | None:
    """Why an image cannot be trained uncropped (crop: false) at its own shape, or None: its aspect ratio is
    outside the buckets' range, so its bucket would be a strip (a 16x8000 image at resolution 1024 would be
    1024x512000 pixels). With crop: true such images are cropped to the nearest bucket instead."""
    if options.crop:
        return None
    low, high = aspect_range(options)
    own = width / height
    if low <= own <= high:
        return None
    return (f"{width}x{height} has aspect ratio {own:.3g}, outside the buckets' range {low:g}..{high:g} "
            "(crop_aspect_buckets); with crop: false it would train at that shape. Set crop: true to crop it to the "
            "nearest bucket, widen crop_aspect_buckets, or crop the file")


def choose_aspect(width: int, height: int, options: DatasetOptions, seed: str) -> float:
    """The bucket's width/height for an image of (width, height) under the dataset's crop rules. `preserve` keeps
    the image's own ratio within the buckets' range (aspect_range) and crops beyond it to the nearest end."""
    own = width / height
    if not options.crop:
        reason = aspect_out_of_range(width, height, options)
        if reason:  # prepare skips these first: planning one would be a memory bomb, not a training image
            raise ValueError(reason)
        return own
    if options.crop_aspect == "preserve":
        low, high = aspect_range(options)
        return min(max(own, low), high)
    if options.crop_aspect == "square":
        return 1.0
    buckets = options.crop_aspect_buckets or DEFAULT_ASPECT_BUCKETS
    if options.crop_aspect == "random":
        return random.Random(f"aspect:{seed}").choice(sorted(buckets))
    # closest in log space: 2:1 and 1:2 are equally far from 1:1
    log_own = math.log(own)
    return min(buckets, key=lambda r: abs(math.log(r) - log_own))


def cover(width: int, height: int, bucket: tuple[int, int]) -> tuple[int, int]:
    """The smallest size (width, height) with the image's aspect that covers `bucket` (integer sides)."""
    bw, bh = bucket
    if bw / bh > width / height:
        return bw, height * bw // width
    return width * bh // height, bh


def plan_crop(width: int, height: int, options: DatasetOptions, seed: str) -> CropPlan:
    """Bucket and crop of an upright image of (width, height); `seed` (its content hash) fixes random choices."""
    aspect = choose_aspect(width, height, options, seed)
    bucket = size_for_aspect(aspect, options.resolution, options.resolution_type)
    resize = cover(width, height, bucket)
    style = options.crop_style if options.crop else "center"  # no crop: only the alignment remainder, centred
    return CropPlan(bucket, resize, crop_offset(resize, bucket, style, seed))


def crop_offset(resize: tuple[int, int], bucket: tuple[int, int], style: str, seed: str) -> tuple[int, int]:
    """(left, top) of the bucket inside the resized image for a crop style."""
    (sw, sh), (bw, bh) = resize, bucket
    if style in ("center", "centre"):
        return (sw - bw) // 2, (sh - bh) // 2  # as Flux2ImageProcessor's centre crop
    if style == "corner":
        return sw - bw, sh - bh
    rng = random.Random(f"crop:{seed}")
    return rng.randint(0, sw - bw), rng.randint(0, sh - bh)


def plan_like(width: int, height: int, target: CropPlan) -> CropPlan:
    """A reference_strict image's plan: its edit image's bucket and the same relative crop position, so the two
    stay aligned pixel for pixel when they have the same size."""
    resize = cover(width, height, target.bucket)
    (tw, th), (bw, bh) = target.resize, target.bucket

    def same_fraction(offset: int, excess_target: int, excess: int) -> int:
        return round(offset / excess_target * excess) if excess_target else excess // 2

    left = same_fraction(target.offset[0], tw - bw, resize[0] - bw)
    top = same_fraction(target.offset[1], th - bh, resize[1] - bh)
    return CropPlan(target.bucket, resize, (left, top))


def plan_loose(width: int, height: int, target: CropPlan) -> CropPlan:
    """A reference_loose image's plan: its own aspect ratio at about its edit image's area, centre-cropped (the
    area, not a side, is fixed: an extreme ratio costs no more pixels than its edit image)."""
    area = target.bucket[0] * target.bucket[1]
    bucket = size_for_aspect(width / height, math.sqrt(area), "pixel_area")
    resize = cover(width, height, bucket)
    return CropPlan(bucket, resize, crop_offset(resize, bucket, "center", ""))


def too_small(width: int, height: int, options: DatasetOptions) -> str | None:
    """Why an image is below the dataset's `minimum_image_size` (in resolution_type's unit), or None."""
    if min(width, height) < ALIGN:
        return f"{width}x{height}: shorter side under {ALIGN} px"
    minimum = options.minimum_image_size
    if not minimum:
        return None
    if options.resolution_type == "pixel" and min(width, height) < minimum:
        return f"{width}x{height}: shorter side under minimum_image_size={minimum:g} px"
    if options.resolution_type == "pixel_area" and width * height < minimum * minimum:
        return f"{width}x{height}: area under minimum_image_size={minimum:g}^2 px"
    if options.resolution_type == "area" and width * height < minimum * MEGAPIXEL:
        return f"{width}x{height}: {width * height / MEGAPIXEL:.2f} MP, under minimum_image_size={minimum:g} MP"
    return None


# apply_plan materialises the resized image only up to this many times the bucket's pixels; beyond (a thin strip
# cropped to a square: a 16x8000 image at 1024 resizes to 1024x512000, 1.5 GB of RGB) it resizes only the region
# that the crop keeps, so memory stays bounded by the bucket whatever the image's shape.
MAX_RESIZE_OVER_BUCKET = 4


def working_size(plan: CropPlan) -> tuple[int, int]:
    """(width, height) of the largest image apply_plan holds for `plan`: the resized image, or the bucket itself
    when that would exceed MAX_RESIZE_OVER_BUCKET times the bucket."""
    (rw, rh), (bw, bh) = plan.resize, plan.bucket
    return plan.resize if rw * rh <= MAX_RESIZE_OVER_BUCKET * bw * bh else plan.bucket


def apply_plan(image: Image.Image, plan: CropPlan) -> Image.Image:
    """Resize (Lanczos, as the pipelines) then crop an RGB image to its bucket.

    When the resized image would be much larger than the bucket (working_size), the crop's region of the source is
    resized straight to the bucket (PIL's `box`): the same filter at the same sample positions, equal to
    resize-then-crop up to rounding (at most 1 in a few pixels per 100k), without the huge intermediate image."""
    left, top = plan.offset
    (bw, bh), (rw, rh) = plan.bucket, plan.resize
    if working_size(plan) == plan.bucket and plan.resize != plan.bucket:
        sx, sy = image.size[0] / rw, image.size[1] / rh
        return image.resize((bw, bh), resample=Image.Resampling.LANCZOS,
                            box=(left * sx, top * sy, (left + bw) * sx, (top + bh) * sy))
    resized = image if image.size == plan.resize else image.resize(plan.resize, resample=Image.Resampling.LANCZOS)
    return resized.crop((left, top, left + bw, top + bh))
