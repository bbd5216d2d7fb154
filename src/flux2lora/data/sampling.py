"""Training batches: every batch from one aspect bucket, datasets weighted by their repeats, order a pure function
of (seed, step) so a run resumed from a checkpoint draws exactly the batches it would have drawn.

One batch must share one latent shape: the FLUX.2 transformer reads position ids from the first sample of a batch
only, so mixed shapes would be silently wrong rather than an error.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Generic, Protocol, Sequence, TypeVar

import torch

log = logging.getLogger(__name__)


class Bucketed(Protocol):
    bucket: tuple[int, int]  # (width, height) in pixels
    repeats: int  # extra appearances per epoch (0: once)


T = TypeVar("T", bound=Bucketed)


class BucketBatches(Generic[T]):
    """Deterministic bucketed batches.

    Epoch e: each bucket's items (an item with repeats r appears 1 + r times) are shuffled with a generator seeded by
    seed + e and cut into full batches (a bucket's remainder is dropped: every batch has one shape), then the batches
    of all buckets are shuffled together. Step k's batch is a pure function of (seed, k): nothing to checkpoint.
    """

    def __init__(self, items: Sequence[T], batch_size: int, seed: int):
        self.items, self.batch_size, self.seed = list(items), batch_size, seed
        buckets: dict[tuple[int, int], list[int]] = defaultdict(list)
        for index, item in enumerate(self.items):
            buckets[tuple(item.bucket)].extend([index] * (1 + item.repeats))
        self.buckets = dict(sorted(buckets.items()))
        self.per_epoch = sum(len(slots) // batch_size for slots in self.buckets.values())
        if self.per_epoch == 0:
            sizes = ", ".join(f"{w}x{h}: {len(s)}" for (w, h), s in self.buckets.items())
            raise ValueError(f"train.train_batch_size={batch_size} is larger than every aspect bucket (images per "
                             f"bucket, with repeats: {sizes}); lower it, add images or repeats, or crop to fewer "
                             "buckets (crop_aspect: square or crop_aspect_buckets)")
        unused = {b: len(s) for b, s in self.buckets.items() if len(s) < batch_size}
        if unused:
            log.warning("buckets with fewer samples than train_batch_size=%d are never trained on: %s", batch_size,
                        ", ".join(f"{w}x{h} ({n})" for (w, h), n in unused.items()))

    def _epoch(self, epoch: int) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed + epoch)
        batches = []
        for slots in self.buckets.values():
            order = torch.randperm(len(slots), generator=generator).tolist()
            shuffled = [slots[i] for i in order]
            full = len(shuffled) // self.batch_size * self.batch_size
            batches += [shuffled[i:i + self.batch_size] for i in range(0, full, self.batch_size)]
        order = torch.randperm(len(batches), generator=generator).tolist()
        return [batches[i] for i in order]

    def at(self, step: int) -> list[T]:
        """The batch of training step `step` (0-based)."""
        epoch, index = divmod(step, self.per_epoch)
        if getattr(self, "_cached_epoch", None) != epoch:
            self._cached_epoch, self._cached = epoch, self._epoch(epoch)
        return [self.items[i] for i in self._cached[index]]


class WeightedDatasetBatches(Generic[T]):
    """Batches when datasets set `probability`: each batch comes from one dataset, drawn with weight
    probability x (its batches per epoch), so equal probabilities mix datasets by size as `BucketBatches` does and
    probability 2 doubles a dataset's share. Within a dataset, batches follow that dataset's own `BucketBatches`
    order (its k-th draw is its batch k). Draw j is a pure function of (seed, j): the choices are made in blocks of
    BLOCK from a generator seeded by (seed, block), so a resumed run draws exactly what it would have drawn."""

    BLOCK = 4096

    def __init__(self, groups: dict[str, list[T]], probabilities: dict[str, float], batch_size: int, seed: int):
        self.names = sorted(groups)
        self.seed = seed
        self.batches = {name: BucketBatches(groups[name], batch_size, seed) for name in self.names}
        self.per_epoch = sum(b.per_epoch for b in self.batches.values())
        weights = [probabilities[name] * self.batches[name].per_epoch for name in self.names]
        if not sum(weights) > 0:
            raise ValueError("prepare.datasets: every dataset with images to train on has probability 0")
        self.weights = torch.tensor(weights, dtype=torch.float64)
        self._blocks: list[torch.Tensor] = []  # per block, each draw's dataset index
        self._counts: list[torch.Tensor] = []  # per block, how many draws each dataset had before it

    def _block(self, block: int) -> torch.Tensor:
        while len(self._blocks) <= block:
            b = len(self._blocks)
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + b)
            choices = torch.multinomial(self.weights, self.BLOCK, replacement=True, generator=generator)
            before = self._counts[-1] + torch.bincount(self._blocks[-1], minlength=len(self.names)) \
                if self._blocks else torch.zeros(len(self.names), dtype=torch.long)
            self._blocks.append(choices)
            self._counts.append(before)
        return self._blocks[block]

    def dataset_at(self, step: int) -> str:
        """The dataset batch `step` is drawn from."""
        block, offset = divmod(step, self.BLOCK)
        return self.names[int(self._block(block)[offset])]

    def at(self, step: int) -> list[T]:
        """The batch of training step `step` (0-based)."""
        block, offset = divmod(step, self.BLOCK)
        choices = self._block(block)
        index = int(choices[offset])
        k = int(self._counts[block][index]) + int((choices[:offset] == index).sum())
        return self.batches[self.names[index]].at(k)


def batches_for(items: Sequence[T], batch_size: int, seed: int):
    """`BucketBatches` over all items, or `WeightedDatasetBatches` when any item's dataset sets a probability
    (items of the others weigh 1; a dataset with probability 0 is never drawn)."""
    if all(getattr(item, "probability", None) is None for item in items):
        return BucketBatches(items, batch_size, seed)
    groups: dict[str, list] = defaultdict(list)
    probabilities: dict[str, float] = {}
    for item in items:
        groups[item.dataset].append(item)
        probabilities[item.dataset] = 1.0 if item.probability is None else float(item.probability)
    drawn = {name: group for name, group in groups.items() if probabilities[name] > 0}
    if not drawn:
        raise ValueError("prepare.datasets: every dataset with images to train on has probability 0")
    return WeightedDatasetBatches(drawn, probabilities, batch_size, seed)
