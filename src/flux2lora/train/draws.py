"""The training data of each step: which samples, and every random draw made for them, in one place.

Everything random in a step (caption dropout, noise, sigma, dev's guidance, the reference picked for edit training)
comes from one generator whose state is checkpointed, drawn in a fixed order. With several processes, every process
draws every micro-batch of the step, in the same order, and keeps only its own: the generators stay in step without
communication, and N processes compute what one process accumulating N micro-batches computes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..cache.latents import read_latent_index
from ..cache.store import TensorStore
from ..cache.text import read_text_index
from ..config import TrainParams
from ..data.captions import caption_choice
from ..data.sampling import BucketBatches
from .forward import pick_references
from .rollout import draw_offsets
from .rollout import enabled as rollout_enabled
from .step import MicroBatch, sample_sigmas


@dataclass
class Sample:
    image_id: str
    latent_key: str
    text_key: str
    reference_keys: list[str] = field(default_factory=list)  # edit training: the image's references, in order
    bucket: tuple[int, int] = (0, 0)  # (width, height) of its aspect bucket: a batch holds one bucket
    repeats: int = 0  # extra appearances per epoch (its dataset's `repeats`)
    caption_keys: list[str] = field(default_factory=list)  # several captions: one is picked per step
    dataset: str = ""  # its dataset's id
    mask_key: str | None = None  # a loss mask (its dataset's mask dataset): weights per latent token
    regularisation: bool = False  # is_regularisation_data: the target is the base model's own prediction
    probability: float | None = None  # its dataset's sampling probability, when any dataset sets one
    eval: bool = False  # from a dataset_type eval dataset: scored by the evaluation loss, never trained on

    def text_key_at(self, seed: int, micro_batch: int, position: int) -> str:
        """The caption embedding this sample trains with at `position` of global micro-batch `micro_batch`."""
        if not self.caption_keys:
            return self.text_key
        return self.caption_keys[caption_choice(seed, micro_batch, position, len(self.caption_keys))]


def load_samples(layout) -> tuple[list[Sample], str]:
    """Training samples: images with both a cached latent and a cached caption embedding. Also the empty-prompt key."""
    latent_index = read_latent_index(layout)
    text_index = read_text_index(layout)
    captions = text_index["captions"]
    references = latent_index.get("references", {})
    buckets, repeats = latent_index.get("buckets", {}), latent_index.get("repeats", {})
    lines = text_index.get("caption_lines", {})
    datasets, masks = latent_index.get("datasets", {}), latent_index.get("masks", {})
    regularisation, probability = set(latent_index.get("regularisation", [])), latent_index.get("probability", {})
    evaluated = set(latent_index.get("eval", []))
    samples = [Sample(i, k, captions[i], references.get(i, []), tuple(buckets.get(i, (0, 0))), repeats.get(i, 0),
                      lines.get(i, []), datasets.get(i) or "", masks.get(i), i in regularisation, probability.get(i),
                      i in evaluated)
               for i, k in sorted(latent_index["images"].items()) if i in captions]
    if not samples:
        raise ValueError("train: no image has both a cached latent and a caption embedding; re-run the encode stages")
    return samples, text_index["empty"]


def total_steps(cfg: TrainParams, batches: BucketBatches, processes: int = 1) -> int:
    """max_train_steps, or num_train_epochs passes over the data (each step consumes train_batch_size x
    gradient_accumulation_steps x processes samples)."""
    if cfg.num_train_epochs is None:
        return cfg.max_train_steps
    per_step = cfg.gradient_accumulation_steps * processes
    return max(1, math.ceil(batches.per_epoch * cfg.num_train_epochs / per_step))


def routing_generator(seed: int, step: int, process: int) -> torch.Generator:
    """TREAD's token selection for one step of one process: a pure function of (seed, step, process), so that it
    needs no checkpointing and processes never share a draw."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 1_009 + process)


def guidance_values(cfg: TrainParams, batch: int, generator: torch.Generator) -> torch.Tensor:
    """dev's distilled-guidance input per sample: constant, or uniform in [min, max] drawn per sample."""
    if cfg.flux_guidance_mode == "random-range":
        u = torch.rand(batch, generator=generator)
        return cfg.flux_guidance_min + u * (cfg.flux_guidance_max - cfg.flux_guidance_min)
    return torch.full((batch,), float(cfg.flux_guidance_value))


@dataclass
class Draws:
    """The random choices for one micro-batch (CPU tensors): which samples get the empty prompt, the noise like
    x0 (B, 128, h, w), sigmas (B,), dev's guidance (B,) and, for edit training, each sample's references; and the
    micro-batch's index in the run (which caption line each sample trains with: `Sample.text_key_at`)."""

    index: int
    dropped: list[bool]
    noise: torch.Tensor
    sigmas: torch.Tensor
    guidance: torch.Tensor | None
    references: list[list[str]] | None
    rollout: torch.Tensor | None = None  # scheduled sampling's rollout lengths (B,), when it is on


class StepDraws:
    """Micro-batches of a step for one process, drawn from the checkpointed `generator` (see the module docstring).

    A micro-batch's index in the run is (step * accumulation + j) * processes + p for micro-batch j of process p.
    """

    def __init__(self, cfg: TrainParams, batches: BucketBatches, latent_store: TensorStore,
                 text_store: TensorStore, empty_key: str, guidance: bool, device: torch.device,
                 processes: int = 1, rank: int = 0):
        self.cfg, self.batches, self.guidance = cfg, batches, guidance
        self.latent_store, self.text_store, self.empty_key = latent_store, text_store, empty_key
        self.device, self.processes, self.rank = device, processes, rank
        self.generator = torch.Generator().manual_seed(cfg.seed)  # CPU: identical draws on every device

    def micro_batches(self, step: int) -> list[MicroBatch]:
        """This process's micro-batches of `step` (0-based), every process's draws made in order."""
        accumulation, own = self.cfg.gradient_accumulation_steps, []
        for j in range(accumulation):
            for p in range(self.processes):
                index = (step * accumulation + j) * self.processes + p
                batch = self.batches.at(index)
                draws = self.draw(batch, index)
                if p == self.rank:
                    own.append(self.materialise(batch, draws))
        return own

    def draw(self, batch: list[Sample], index: int) -> Draws:
        """The random choices for `batch`, in their fixed order; only the latents' shape is needed for them."""
        cfg, g = self.cfg, self.generator
        dropped = (torch.rand(len(batch), generator=g) < cfg.caption_dropout_probability).tolist()
        shape = self._latent_shape(batch)
        noise = torch.randn(shape, generator=g)
        sigmas = sample_sigmas(cfg, len(batch), g, image_seq_len=shape[-2] * shape[-1])  # tokens: (H/16)*(W/16)
        guidance = guidance_values(cfg, len(batch), g) if self.guidance else None
        references = None
        if any(sample.reference_keys for sample in batch):
            references = pick_references([s.reference_keys for s in batch], cfg.conditioning_multidataset_sampling, g)
        rollout = None
        if rollout_enabled(cfg):  # last, and only when on: with it off the draws are exactly as before
            step = index // (cfg.gradient_accumulation_steps * self.processes)
            rollout = draw_offsets(cfg, len(batch), step, g)
        return Draws(index, dropped, noise, sigmas, guidance, references, rollout)

    def materialise(self, batch: list[Sample], draws: Draws) -> MicroBatch:
        """The cached latents and embeddings of `batch` with its draws, on the training device."""
        get_latent, get_text = self.latent_store.get, self.text_store.get
        x0 = torch.stack([get_latent(s.latent_key)["latents"] for s in batch]).to(self.device, torch.float32)
        seed = self.cfg.seed
        keys = [self.empty_key if drop else s.text_key_at(seed, draws.index, i)
                for i, (s, drop) in enumerate(zip(batch, draws.dropped))]
        prompt_embeds = torch.stack([get_text(key)["prompt_embeds"] for key in keys]).to(self.device)
        references = None
        if draws.references is not None:
            references = [[get_latent(key)["latents"].float() for key in keys] for keys in draws.references]
        loss_mask = regularisation = None
        if any(s.mask_key for s in batch):  # samples without a mask weigh every token 1
            loss_mask = torch.stack([get_latent(s.mask_key)["mask"] if s.mask_key else torch.ones(x0.shape[2:])
                                     for s in batch]).to(self.device, torch.float32)
        if any(s.regularisation for s in batch):
            regularisation = torch.tensor([s.regularisation for s in batch], device=self.device)
        return MicroBatch(x0, prompt_embeds, draws.noise.to(self.device), draws.sigmas.to(self.device),
                          None if draws.guidance is None else draws.guidance.to(self.device), references,
                          loss_mask=loss_mask, regularisation=regularisation, rollout_offsets=draws.rollout)

    def _latent_shape(self, batch: list[Sample]) -> tuple[int, ...]:
        # a batch is one bucket (W, H): its latents are (128, H/16, W/16); without a recorded bucket, read them
        width, height = batch[0].bucket
        if width and height:
            return (len(batch), 128, height // 16, width // 16)
        return (len(batch), *self.latent_store.get(batch[0].latent_key)["latents"].shape)

    def state_dict(self) -> dict:
        return {"noise_generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["noise_generator"])
