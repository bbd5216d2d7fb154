"""The evaluation loss: how well the LoRA being trained denoises a fixed eval set, on a curve comparable across steps
and runs.

The eval set is the images of the `dataset_type: eval` datasets when there are any (never trained on), else a share
of the prepared images held out from training (`validate.eval_split`), or, without a split, a fixed sample of the
training images, so that every run has a readable curve. Which images is decided by a hash of
each image's key, not by the training seed or the dataset's order: an image stays on its side when others are added.

Every scored step sees the same inputs: each eval image at each sigma of `validate.eval_sigmas` (no shift applied),
with noise drawn from a generator seeded by (`validate.eval_seed`, the image's key), caption without dropout, dev's
guidance at `flux_guidance_value` (the middle of the range for random-range), and for edit training all of an
image's references (`combined`) or its first (`random`). The loss is the training objective itself
(`step.flow_matching_loss`) under the training's mixed precision, on the whole model (no TREAD routing) in eval mode
(no LoRA dropout), without gradients. Evaluation draws nothing from the training's generators and restores every
RNG it could touch (`inference_state`), so a run with evaluation ends with the same LoRA as one without; and since
its inputs are a pure function of the params and the cache, a resumed run scores exactly what the uninterrupted run
would have.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import dataclass

import torch

from ..config import Params
from ..errors import UserError
from ..tracking import EVAL_LOSS_METRIC
from ..validate.during_training import inference_state
from .draws import Sample
from .model import TrainingModel
from .step import MicroBatch, flow_matching_loss

log = logging.getLogger(__name__)

HELD_OUT, TRAINING_SAMPLE, EVAL_DATASET = "held_out", "training_sample", "eval_dataset"


class EvalSplitError(UserError, ValueError):
    """validate.eval_split leaves nothing to train on."""


def key_fraction(image_id: str) -> float:
    """A number in [0, 1) fixed by the image's key alone: which side of the split it is on, and its eval rank."""
    digest = hashlib.sha256(f"flux2lora-eval:{image_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_for_evaluation(samples: list[Sample], params: Params) -> tuple[list[Sample], list[Sample], str]:
    """(training samples, eval samples, where the eval set comes from: "eval_dataset", "held_out" or
    "training_sample").

    Eval datasets (`dataset_type: eval`): their images never train, and the eval set is at most eval_max_samples
    of them, lowest key fraction first (even with evaluation off, they stay out of training); eval_split must be 0.

    eval_split > 0: images whose key fraction is below it (at least one) are held out and never trained on; the
    eval set is at most eval_max_samples of them, lowest fraction first. eval_split 0: every image trains and the
    eval set is the eval_max_samples training images of lowest fraction. Evaluation off: no eval set."""
    cfg = params.validate_
    ranked = sorted(samples, key=lambda s: (key_fraction(s.image_id), s.image_id))
    if any(s.eval for s in samples):
        if cfg.eval_split > 0:  # Params refuses this too; a hand-built cache could still meet it
            raise EvalSplitError(f"validate.eval_split={cfg.eval_split} with eval datasets (dataset_type: eval): "
                                 "set validate.eval_split to 0, the eval datasets are the eval set")
        training = [s for s in samples if not s.eval]
        if not training:
            raise EvalSplitError("every cached image is from an eval dataset (dataset_type: eval), which is never "
                                 "trained on: add a dataset_type: image dataset to prepare.datasets")
        scored = [s for s in ranked if s.eval][:cfg.eval_max_samples] if cfg.eval_every_n_steps else []
        log.info("evaluation: %d images of eval datasets, never trained on; %d scored", len(samples) - len(training),
                 len(scored))
        return training, scored, EVAL_DATASET
    if cfg.eval_split > 0:
        held = {s.image_id for s in samples if key_fraction(s.image_id) < cfg.eval_split} or {ranked[0].image_id}
        training = [s for s in samples if s.image_id not in held]
        if not training:
            raise EvalSplitError(f"validate.eval_split={cfg.eval_split} holds out all {len(samples)} images: lower "
                                 "it, or set it to 0 to score a sample of the training images")
        log.info("evaluation: %d of %d images held out (validate.eval_split=%g), never trained on", len(held),
                 len(samples), cfg.eval_split)
        return training, [s for s in ranked if s.image_id in held][:cfg.eval_max_samples], HELD_OUT
    if not cfg.eval_every_n_steps:
        return samples, [], TRAINING_SAMPLE
    return samples, ranked[:cfg.eval_max_samples], TRAINING_SAMPLE


def noise_seed(eval_seed: int, image_id: str) -> int:
    digest = hashlib.sha256(f"{eval_seed}:{image_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


def eval_guidance(cfg) -> float:
    """dev's guidance input while scoring: the constant, or the middle of the random range."""
    if cfg.flux_guidance_mode == "random-range":
        return (cfg.flux_guidance_min + cfg.flux_guidance_max) / 2
    return float(cfg.flux_guidance_value)


@dataclass
class EvalChunk:
    """Eval images of one shape, stacked (CPU): latents (B, 128, h, w), noise like them, prompt embeddings
    (B, L, D), per-image reference latents or None."""

    x0: torch.Tensor
    noise: torch.Tensor
    prompt_embeds: torch.Tensor
    references: list[list[torch.Tensor]] | None

    def micro_batch(self, sigma: float, guidance: float | None, device: torch.device) -> MicroBatch:
        n = self.x0.shape[0]
        return MicroBatch(self.x0.to(device), self.prompt_embeds.to(device), self.noise.to(device),
                          torch.full((n,), float(sigma), device=device),
                          None if guidance is None else torch.full((n,), guidance, device=device), self.references)


class EvaluationLoss:
    """Scores the eval set with the current LoRA (see the module docstring); built by `for_training`."""

    def __init__(self, params: Params, samples: list[Sample], source: str, latent_store, text_store,
                 guidance: bool, transformer, device: torch.device, autocast_dtype: torch.dtype | None):
        cfg, train = params.validate_, params.train
        self.every, self.sigmas, self.source = cfg.eval_every_n_steps, list(cfg.eval_sigmas), source
        self.samples = samples
        self.transformer, self.device, self.autocast_dtype = transformer, device, autocast_dtype
        self.model = TrainingModel(transformer)  # diffusers' own forward: no routing, no block wrappers
        self.guidance = eval_guidance(train) if guidance else None
        self.chunks = self._chunks(samples, latent_store, text_store, cfg.eval_seed,
                                   train.conditioning_multidataset_sampling, train.train_batch_size)
        self.last: dict[str, float] = {}
        self.selection = EvalSelection(train)

    @classmethod
    def for_training(cls, params: Params, samples: list[Sample], source: str, latent_store, text_store,
                     guidance: bool, transformer, device: torch.device,
                     autocast_dtype: torch.dtype | None) -> EvaluationLoss | None:
        """The evaluation when validate.eval_every_n_steps > 0, else None."""
        if not params.validate_.eval_every_n_steps or not samples:
            return None
        return cls(params, samples, source, latent_store, text_store, guidance, transformer, device, autocast_dtype)

    @staticmethod
    def _chunks(samples, latent_store, text_store, seed: int, reference_mode: str, size: int) -> list[EvalChunk]:
        groups: dict[tuple, list] = {}
        for s in samples:
            x0 = latent_store.get(s.latent_key)["latents"].float()
            noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(noise_seed(seed, s.image_id)))
            embeds = text_store.get(s.text_key)["prompt_embeds"]
            keys = s.reference_keys if reference_mode == "combined" else s.reference_keys[:1]
            refs = [latent_store.get(k)["latents"].float() for k in keys]
            shape = (tuple(x0.shape), tuple(embeds.shape), tuple(tuple(r.shape) for r in refs))
            groups.setdefault(shape, []).append((x0, noise, embeds, refs))
        chunks = []
        for entries in groups.values():
            for start in range(0, len(entries), size):
                part = entries[start:start + size]
                chunks.append(EvalChunk(torch.stack([e[0] for e in part]), torch.stack([e[1] for e in part]),
                                        torch.stack([e[2] for e in part]),
                                        [e[3] for e in part] if part[0][3] else None))
        return chunks

    def due(self, step: int, max_steps: int) -> bool:
        """Step 0 (the base model), every `every`-th step and the last; never twice (a resumed run's first step
        may be one its checkpoint had scored)."""
        return (step % self.every == 0 or step == max_steps) and step > self.selection.last_step

    def describe(self) -> dict[str, str]:
        """Tags for the MLflow run: where the eval set comes from and its size."""
        return {"eval_set": self.source, "eval_images": str(len(self.samples)),
                "eval_sigmas": ",".join(f"{s:g}" for s in self.sigmas)}

    def evaluate(self, step: int) -> dict[str, float]:
        """`validation_eval_loss/sigma_<s>` for each sigma (mean over the eval images) and `training/loss_eval`
        (tracking.EVAL_LOSS_METRIC), their mean, of the LoRA at `step` (recorded in `selection`)."""
        t0 = time.perf_counter()
        per_sigma = {}
        dtype = self.transformer.dtype
        with inference_state(self.transformer, self.device), torch.no_grad():
            for sigma in self.sigmas:
                total, count = 0.0, 0
                for chunk in self.chunks:
                    batch = chunk.micro_batch(sigma, self.guidance, self.device)
                    loss = flow_matching_loss(self.model, batch, self.device, self.autocast_dtype, dtype)
                    total += float(loss) * chunk.x0.shape[0]
                    count += chunk.x0.shape[0]
                per_sigma[sigma] = total / count
        metrics = {sigma_metric(sigma): value for sigma, value in per_sigma.items()}
        metrics[EVAL_LOSS_METRIC] = math.fsum(per_sigma.values()) / len(per_sigma)
        metrics["eval_time_s"] = time.perf_counter() - t0
        self.last = metrics
        self.selection.update(step, metrics[EVAL_LOSS_METRIC])
        return metrics


def sigma_metric(sigma: float) -> str:
    # MLflow's run page orders its chart sections by name: "validation_eval_loss" comes after "validation" (the
    # validation grid, which then stays in view); the mean sits beside the training loss (tracking.py)
    return f"validation_eval_loss/sigma_{sigma:g}"


class EvalSelection:
    """The lowest eval loss so far and, from it, the step `checkpoint_selection: best_eval` publishes and when
    `early_stopping_patience` ends training. An evaluation improves when its loss is below the best by more than
    `early_stopping_min_delta` (Keras' rule); the step-0 evaluation of the base model is the first. Its state is
    checkpointed, so a resumed run selects and stops exactly where the uninterrupted one would."""

    def __init__(self, train_cfg):
        self.keep_best = train_cfg.checkpoint_selection == "best_eval"
        self.patience, self.min_delta = train_cfg.early_stopping_patience, train_cfg.early_stopping_min_delta
        self.best_loss, self.best_step, self.since_best, self.last_step = math.inf, None, 0, -1

    def update(self, step: int, loss: float) -> bool:
        """Record the evaluation at `step`; True when it is the new best."""
        self.last_step = step
        if loss < self.best_loss - self.min_delta:
            self.best_loss, self.best_step, self.since_best = loss, step, 0
            return True
        self.since_best += 1
        return False

    @property
    def stop_reason(self) -> str | None:
        """Why training ends early, or None."""
        if not self.patience or self.since_best < self.patience:
            return None
        return (f"early stopping: eval_loss did not improve by more than {self.min_delta:g} in {self.patience} "
                f"evaluations (best {self.best_loss:.6g} at step {self.best_step}; "
                f"train.early_stopping_patience={self.patience})")

    def state_dict(self) -> dict:
        return {"eval_selection": {"best_loss": self.best_loss, "best_step": self.best_step,
                                   "since_best": self.since_best, "last_step": self.last_step}}

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("eval_selection")
        if saved is not None:
            self.best_loss, self.best_step = saved["best_loss"], saved["best_step"]
            self.since_best, self.last_step = saved["since_best"], saved["last_step"]
