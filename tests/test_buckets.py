"""Aspect buckets: sizes aligned to 16 under the seed's crop rules, crops as the pipelines make them, and batches
that each come from one bucket in an order fixed by (seed, step)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image

from flux2lora.cache.latents import image_processor, preprocess
from flux2lora.data.buckets import apply_plan, plan_crop, plan_like, plan_loose, size_for_aspect, too_small
from flux2lora.data.config import DatasetOptions
from flux2lora.data.sampling import BucketBatches


def options(**kw) -> DatasetOptions:
    return DatasetOptions(**{"crop": True, "crop_style": "center", **kw})


@pytest.mark.parametrize("resolution_type,resolution,aspect,expected", [
    ("pixel", 512, 1.0, (512, 512)),
    ("pixel", 512, 1.5, (768, 512)),  # the shorter side is the resolution
    ("pixel", 512, 0.75, (512, 688)),  # 682.7 -> nearest multiple of 16
    ("pixel_area", 1024, 1.0, (1024, 1024)),
    ("pixel_area", 1024, 16 / 9, (1360, 768)),  # about 1024^2 pixels
    ("area", 1.0, 1.0, (1008, 1008)),  # 1 MP = 10^6 pixels, as the seed counts
    ("area", 1.05, 1.0, (1024, 1024)),
])
def test_bucket_sizes_follow_resolution_type_and_are_multiples_of_16(resolution_type, resolution, aspect, expected):
    width, height = size_for_aspect(aspect, resolution, resolution_type)
    assert (width, height) == expected and width % 16 == 0 and height % 16 == 0


def test_crop_aspect_rules():
    wide = (1600, 900)  # 16:9
    assert plan_crop(*wide, options(crop_aspect="square", resolution=512, resolution_type="pixel_area"),
                     "a").bucket == (512, 512)
    assert plan_crop(*wide, options(crop_aspect="preserve", resolution=512, resolution_type="pixel_area"),
                     "a").bucket == (688, 384)
    closest = options(crop_aspect="closest", crop_aspect_buckets=[1.0, 1.5, 0.5], resolution=512,
                      resolution_type="pixel_area")
    assert plan_crop(*wide, closest, "a").bucket == size_for_aspect(1.5, 512, "pixel_area")
    # crop false keeps the aspect: only the remainder of the 16-px alignment is trimmed
    assert plan_crop(*wide, DatasetOptions(crop=False, resolution=512, resolution_type="pixel_area"),
                     "a").bucket == (688, 384)


def test_random_aspect_and_random_crop_are_fixed_per_image_content():
    rand = options(crop_aspect="random", crop_aspect_buckets=[0.5, 1.0, 2.0], crop_style="random", resolution=256,
                   resolution_type="pixel_area")
    plans = {seed: plan_crop(800, 600, rand, seed) for seed in map(str, range(40))}
    assert plans["7"] == plan_crop(800, 600, rand, "7"), "a rerun must reuse the cache: same bucket, same crop"
    assert len({p.bucket for p in plans.values()}) == 3, "all buckets are drawn across images"
    assert len({p.offset for p in plans.values()}) > 5, "random crops differ between images"


@pytest.mark.parametrize("style,offset", [("center", (199, 0)), ("corner", (398, 0))])
def test_crop_styles(style, offset):
    plan = plan_crop(1600, 900, options(crop_aspect="square", crop_style=style, resolution=512,
                                        resolution_type="pixel_area"), "a")
    assert plan.bucket == (512, 512) and plan.resize == (910, 512) and plan.offset == offset


def test_resize_then_centre_crop_equals_the_pipelines_reference_preprocessing():
    """The pipelines bring a reference image to its size by Lanczos resizing, then Flux2ImageProcessor centre-crops
    it (resize_mode="crop"); our plan does the same two steps."""
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (90, 141, 3), dtype=np.uint8))
    plan = plan_crop(141, 90, options(crop_aspect="square", resolution=64, resolution_type="pixel_area"), "x")
    assert plan.resize == (100, 64)
    resized = image.resize(plan.resize, resample=Image.Resampling.LANCZOS)
    ours = image_processor().preprocess(apply_plan(image, plan), height=64, width=64)
    assert torch.equal(ours, preprocess(resized, 64, 64))


def test_strict_references_share_the_bucket_and_crop_position_loose_ones_keep_their_aspect():
    target = plan_crop(200, 100, options(crop_aspect="square", crop_style="corner", resolution=64,
                                         resolution_type="pixel_area"), "t")
    assert plan_like(200, 100, target) == target  # same size: aligned pixel for pixel
    assert plan_like(400, 200, target).bucket == target.bucket
    loose = plan_loose(300, 100, target)
    assert loose.bucket[0] / loose.bucket[1] == pytest.approx(3, rel=0.25)


def test_minimum_image_size_is_in_resolution_type_units():
    assert too_small(100, 50, DatasetOptions(minimum_image_size=64, resolution_type="pixel"))
    assert not too_small(100, 50, DatasetOptions(minimum_image_size=64, resolution_type="pixel_area"))
    assert too_small(1000, 900, DatasetOptions(minimum_image_size=1.0, resolution_type="area"))
    assert too_small(10, 500, DatasetOptions())  # under 16 px can never be encoded


@dataclass
class Item:
    name: str
    bucket: tuple[int, int]
    repeats: int = 0


def test_every_batch_comes_from_one_bucket_and_order_is_a_function_of_seed_and_step():
    items = [Item(f"s{i}", (64, 64)) for i in range(7)] + [Item(f"w{i}", (96, 48)) for i in range(5)]
    batches = BucketBatches(items, batch_size=2, seed=3)
    assert batches.per_epoch == 3 + 2
    for step in range(40):
        batch = batches.at(step)
        assert len(batch) == 2 and len({item.bucket for item in batch}) == 1
    again = BucketBatches(items, batch_size=2, seed=3)
    assert [b.name for s in (37, 2, 11) for b in again.at(s)] == [b.name for s in (37, 2, 11) for b in batches.at(s)]
    assert [b.name for b in BucketBatches(items, 2, seed=4).at(0)] != [b.name for b in batches.at(0)] or \
        [b.name for b in BucketBatches(items, 2, seed=4).at(1)] != [b.name for b in batches.at(1)]


def test_repeats_weight_datasets():
    items = [Item(f"a{i}", (64, 64)) for i in range(4)] + [Item(f"b{i}", (64, 64), repeats=3) for i in range(4)]
    batches = BucketBatches(items, batch_size=4, seed=0)
    seen = [item.name[0] for step in range(batches.per_epoch) for item in batches.at(step)]
    assert seen.count("b") == 4 * seen.count("a")  # repeats 3: each b image four times per epoch


def test_batch_larger_than_every_bucket_is_a_clear_error():
    items = [Item("a", (64, 64)), Item("b", (96, 48))]
    with pytest.raises(ValueError, match="larger than every aspect bucket.*64x64: 1"):
        BucketBatches(items, batch_size=2, seed=0)
