"""The `train` stage: LoRA on the FLUX.2 transformer from cached latents and prompt embeddings.

Flow matching: x_t = (1 - sigma) * x0 + sigma * noise, the model predicts noise - x0, MSE loss. Everything random
(data order, noise, sigma, guidance, caption dropout) comes from generators whose state is checkpointed, so a run
resumed from a checkpoint ends with the same LoRA as one that never stopped.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import faults, tracking
from ..cache.latents import read_latent_index
from ..cache.store import TensorStore
from ..cache.text import read_text_index
from ..config import Params, TrainParams
from ..data.prepare import log_prepare_report
from ..data.sampling import BucketBatches
from ..io import write_json_atomic
from ..layout import layout_for
from ..models import (component_identity, describe_model, load_training_transformer, pipeline_class, resolve_device,
                      torch_dtype)
from ..validate.during_training import TrainingValidator
from .checkpoint import latest_matching, save_checkpoint
from .forward import pick_references
from .step import MicroBatch, TrainingDiverged, TrainingStep, make_optimizer, sample_sigmas  # noqa: F401
from .lora import add_lora, load_lora_state_dict, lora_state_dict, save_diffusers_lora, target_modules
from .model import build_training_model

log = logging.getLogger(__name__)

# Params that change how a run is observed or saved, or its memory and speed, not what it computes: editing them
# keeps checkpoints valid (a run that ran out of memory resumes with checkpointing or offload switched on).
NON_COMPUTING = {"checkpointing_steps", "checkpoints_total_limit", "resume_from_checkpoint", "log_every_n_steps",
                 "gradient_checkpointing", "gradient_checkpointing_blocks", "vram_budget_gib", "compile_transformer",
                 "compile_backend", "enable_group_offload", "group_offload_type", "group_offload_blocks_per_group",
                 "group_offload_use_stream", "offload_during_startup", "quantize_via"}


def distributed_accelerator():
    """accelerate's Accelerator when this process is one of several (started by `accelerate launch`), else None:
    a single process trains without it, exactly as before."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import Accelerator

    # precision is the loop's own autocast (train.mixed_precision), not accelerate's
    accelerator = Accelerator(mixed_precision="no")
    if accelerator.distributed_type.value == "DEEPSPEED":
        # DeepSpeed's engine owns backward, accumulation and clipping, which this loop does itself; for a LoRA
        # ZeRO-2 would shard only the small adapter's optimizer state, and FSDP2 shards the large frozen base.
        raise ValueError("runtime.accelerate_config: DeepSpeed is not supported by the train loop; use "
                         "infra/accelerate/multi-gpu.yaml (DDP) or infra/accelerate/fsdp2.yaml (sharded base)")
    return accelerator


class _NotTracked:
    """What the loop uses of mlflow, for processes other than the main one (only rank 0 logs and saves)."""

    class _Run:
        info = type("Info", (), {"run_id": None})()

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    def start_run(self, *args, **kwargs):
        return self._Run()

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


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


@dataclass
class Sample:
    image_id: str
    latent_key: str
    text_key: str
    reference_keys: list[str] = field(default_factory=list)  # edit training: the image's references, in order
    bucket: tuple[int, int] = (0, 0)  # (width, height) of its aspect bucket: a batch holds one bucket
    repeats: int = 0  # extra appearances per epoch (its dataset's `repeats`)


def load_samples(layout) -> tuple[list[Sample], str]:
    """Training samples: images with both a cached latent and a cached caption embedding. Also the empty-prompt key."""
    latent_index = read_latent_index(layout)
    text_index = read_text_index(layout)
    captions = text_index["captions"]
    references = latent_index.get("references", {})
    buckets, repeats = latent_index.get("buckets", {}), latent_index.get("repeats", {})
    samples = [Sample(i, k, captions[i], references.get(i, []), tuple(buckets.get(i, (0, 0))), repeats.get(i, 0))
               for i, k in sorted(latent_index["images"].items()) if i in captions]
    if not samples:
        raise ValueError("train: no image has both a cached latent and a caption embedding; re-run the encode stages")
    return samples, text_index["empty"]


def fingerprint(params: Params, layout, processes: int = 1) -> str:
    """Identity of what this run computes: train params, model, the exact cached inputs, and the number of
    processes (each step trains on every process's micro-batches)."""
    train = {k: v for k, v in params.train.model_dump().items() if k not in NON_COMPUTING}
    identity = {"train": train, "model": params.model.model_dump(),
                "transformer": component_identity(params.model, "transformer")}
    if processes > 1:
        identity["processes"] = processes
    h = hashlib.sha256(json.dumps(identity, sort_keys=True).encode())
    h.update((layout.latents_dir / "index.json").read_bytes())
    h.update((layout.text_embeds_dir / "index.json").read_bytes())
    return h.hexdigest()[:20]


def guidance_values(cfg: TrainParams, batch: int, generator: torch.Generator) -> torch.Tensor:
    """dev's distilled-guidance input per sample: constant, or uniform in [min, max] drawn per sample."""
    if cfg.flux_guidance_mode == "random-range":
        u = torch.rand(batch, generator=generator)
        return cfg.flux_guidance_min + u * (cfg.flux_guidance_max - cfg.flux_guidance_min)
    return torch.full((batch,), float(cfg.flux_guidance_value))


def warn_if_guidance_ignored(params: Params) -> None:
    cfg, defaults = params.train, TrainParams()
    keys = ("flux_guidance_mode", "flux_guidance_value", "flux_guidance_min", "flux_guidance_max")
    changed = [k for k in keys if getattr(cfg, k) != getattr(defaults, k)]
    if changed and not params.model.flavour.guidance_embeds:
        warnings.warn(f"{params.model.model_flavour} has no guidance embedder: {', '.join(changed)} "
                      "is ignored (only dev trains with distilled guidance)", UserWarning, stacklevel=2)


def train(params: Params, root: Path) -> dict:
    """Train the LoRA; writes lora/pytorch_lora_weights.safetensors, train/metrics.json and train/mlflow_run.json."""
    cfg = params.train
    layout = layout_for(root, params.output_dir)
    accelerator = distributed_accelerator()
    processes, rank = (accelerator.num_processes, accelerator.process_index) if accelerator else (1, 0)
    main_process = rank == 0
    device = accelerator.device if accelerator else resolve_device(params.model.device)
    samples, empty_key = load_samples(layout)
    latent_store, text_store = TensorStore(layout.latents_dir), TensorStore(layout.text_embeds_dir)
    batches = BucketBatches(samples, cfg.train_batch_size, cfg.seed)  # one aspect bucket per batch
    max_steps = total_steps(cfg, batches, processes)
    run_fingerprint = fingerprint(params, layout, processes)
    warn_if_guidance_ignored(params)

    torch.manual_seed(cfg.seed)
    group_offload = dict(offload_type=cfg.group_offload_type, blocks_per_group=cfg.group_offload_blocks_per_group,
                         use_stream=cfg.group_offload_use_stream) if cfg.enable_group_offload else None
    transformer = load_training_transformer(params.model, device, cfg.base_model_precision, cfg.quantize_via,
                                            group_offload=group_offload,
                                            offload_during_startup=cfg.offload_during_startup)
    targets = target_modules(transformer, cfg.flux_lora_target)
    lora_params = add_lora(transformer, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, targets, cfg.lora_init_type)
    if group_offload is not None:
        for p in lora_params:  # the offload hooks move only the frozen weights; the adapter lives on the device
            p.data = p.data.to(device)
    model = build_training_model(params, transformer)
    transformer.train()

    start_step, run_id = 0, None
    resumed = latest_matching(layout.checkpoints_dir, run_fingerprint) if cfg.resume_from_checkpoint else None
    if resumed is not None:  # the LoRA weights before any wrapping (FSDP shards them)
        load_lora_state_dict(transformer, resumed.lora)
    optimizer = make_optimizer(lora_params, cfg, device)
    from diffusers.optimization import get_scheduler

    scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                              num_training_steps=max_steps)
    if accelerator is not None:
        # DDP synchronises only the LoRA gradients; the frozen base is loaded identically by every process and
        # is not broadcast (quantized weights could not be)
        frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
        torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            model, frozen + [name for name, _ in model.named_buffers()])
        model, optimizer = accelerator.prepare(model, optimizer, device_placement=[False, False])  # placed above
        lora_params = [p for p in model.parameters() if p.requires_grad]
        torch.manual_seed(cfg.seed + rank)  # LoRA dropout masks: independent per process (init above is shared)
        log.info("training on %d processes (%s, rank %d): model wrapped as %s", processes,
                 accelerator.distributed_type.value, rank, type(model).__name__)
    training_step = TrainingStep(model, lora_params, optimizer, scheduler, mixed_precision=cfg.mixed_precision,
                                 max_grad_norm=cfg.max_grad_norm, device=device, dtype=transformer.dtype,
                                 accelerator=accelerator)
    noise_generator = torch.Generator().manual_seed(cfg.seed)  # CPU: identical draws on every device
    # Every validate.validation_step_interval steps (None when unset); the final step is the validate stage's.
    validator = TrainingValidator.for_training(params, root, transformer, device) if main_process else None
    if validator is not None:
        validator.max_steps = max_steps

    if resumed is not None:
        state = resumed.training_state()
        training_step.load_state_dict(state)
        noise_generator.set_state(state["noise_generator"])
        torch.set_rng_state(state.get("torch_rng_per_process", [state["torch_rng"]] * processes)[rank])
        start_step, run_id = resumed.step, resumed.state.get("mlflow_run_id")
        log.info("resuming from checkpoint %s (step %d of %d)", resumed.path.name, start_step, max_steps)

    mlflow = tracking.configure(params, root) if main_process else _NotTracked()
    dataset_hash = tracking.dataset_dvc_hash(root, params.prepare.data_root)
    model_info = describe_model(params.model)
    with mlflow.start_run(run_id=run_id, run_name=None if run_id else params.tracking.run_name,
                          log_system_metrics=params.runtime.log_system_metrics()) as run:
        if run_id is None:
            tracking.log_params_flat(mlflow, params)
            mlflow.set_tags({"git_commit": tracking.git_commit(root),
                             "dataset_dvc_hash": dataset_hash,
                             "flavour": params.model.model_flavour, "base_model": params.model.model_path,
                             "lora_targets": cfg.flux_lora_target, "num_lora_modules": len(targets)})
            log_prepare_report(mlflow, layout)  # images accepted / skipped by reason, beside the losses
        mlflow.set_tag("resumed_from_step", start_step)
        losses, last_loss, step_time = [], float("nan"), 0.0
        progress = tqdm(range(start_step, max_steps), desc="train", unit="step", initial=start_step,
                        total=max_steps, disable=not main_process)
        accumulation = cfg.gradient_accumulation_steps

        def draw_micro_batch(batch, keep: bool = True) -> MicroBatch | None:
            """Cached latents and embeddings of `batch`, with this step's noise, sigmas, guidance and dropout (all
            drawn from the checkpointed generator, in a fixed order). keep=False: another process's micro-batch,
            drawn only so that every process's generator stays in the same state."""
            if not keep:
                # only the draws' shapes are needed: a batch is one bucket (W, H), its latents (128, H/16, W/16)
                width, height = batch[0].bucket
                shape = (len(batch), 128, height // 16, width // 16) if width and height else \
                    torch.stack([latent_store.get(s.latent_key)["latents"] for s in batch]).shape
                torch.rand(len(batch), generator=noise_generator)
                torch.randn(shape, generator=noise_generator)
                sample_sigmas(cfg, len(batch), noise_generator)
                if params.model.flavour.guidance_embeds:
                    guidance_values(cfg, len(batch), noise_generator)
                if any(sample.reference_keys for sample in batch):
                    pick_references([sample.reference_keys for sample in batch],
                                    cfg.conditioning_multidataset_sampling, noise_generator)
                return None
            x0 = torch.stack([latent_store.get(s.latent_key)["latents"] for s in batch]).to(device, torch.float32)
            use_empty = torch.rand(len(batch), generator=noise_generator) < cfg.caption_dropout_probability
            prompt_embeds = torch.stack([text_store.get(empty_key if drop else s.text_key)["prompt_embeds"]
                                         for s, drop in zip(batch, use_empty.tolist())]).to(device)
            noise = torch.randn(x0.shape, generator=noise_generator).to(device)
            sigmas = sample_sigmas(cfg, len(batch), noise_generator).to(device)
            guidance = guidance_values(cfg, len(batch), noise_generator).to(device) \
                if params.model.flavour.guidance_embeds else None
            references = None
            if any(sample.reference_keys for sample in batch):
                picked = pick_references([sample.reference_keys for sample in batch],
                                         cfg.conditioning_multidataset_sampling, noise_generator)
                references = [[latent_store.get(key)["latents"].float() for key in keys] for keys in picked]
            return MicroBatch(x0, prompt_embeds, noise, sigmas, guidance, references)

        for step in progress:
            t0 = time.perf_counter()
            # global micro-batch (step, j, process): every process draws them all in order and keeps its own
            drawn = [draw_micro_batch(batches.at((step * accumulation + j) * processes + p), keep=p == rank)
                     for j in range(accumulation) for p in range(processes)]
            micro_batches = [m for m in drawn if m is not None]
            try:
                last_loss, grad_norm = training_step(micro_batches, routing_generator(cfg.seed, step, rank), step + 1)
            except TrainingDiverged as e:
                raise TrainingDiverged(
                    f"train: {e}; stopped. The last good checkpoint in {layout.checkpoints_dir} is kept: lower "
                    "train.learning_rate or set train.max_grad_norm, then re-run to resume from it") from None
            step_time = time.perf_counter() - t0
            losses.append(last_loss)
            done = step + 1
            progress.set_postfix(loss=f"{last_loss:.4f}")
            if done % cfg.log_every_n_steps == 0 or done == max_steps:
                # asynchronous: a committed sqlite write per step would cost ~10 ms of training time each
                mlflow.log_metrics({"loss": last_loss, "learning_rate": scheduler.get_last_lr()[0],
                                    "grad_norm": float(grad_norm), "step_time_s": step_time}, step=done,
                                   synchronous=False)
            if done % cfg.checkpointing_steps == 0 and done < max_steps:
                # every process: FSDP gathers the LoRA's and the optimizer's shards here
                lora, training_state = lora_state_dict(transformer), training_step.state_dict()
                torch_rng = [torch.get_rng_state()]
                if accelerator is not None:  # each process's own (dropout) RNG, so each resumes exactly
                    torch_rng = [None] * processes
                    torch.distributed.all_gather_object(torch_rng, torch.get_rng_state())
                if main_process:
                    save_checkpoint(layout.checkpoints_dir, done, lora,
                                    {**training_state, "noise_generator": noise_generator.get_state(),
                                     "torch_rng": torch_rng[0], "torch_rng_per_process": torch_rng},
                                    {"fingerprint": run_fingerprint, "mlflow_run_id": run.info.run_id,
                                     "loss": last_loss, "processes": processes},
                                    keep=cfg.checkpoints_total_limit)
            if validator is not None and validator.due(done):
                validator.run(done, mlflow)
            # FLUX2LORA_FAULT=train:step=N fails once here, after step N's checkpoint: the retry resumes from it
            faults.maybe_fail("train", f"step={done}", layout.output_dir)

        if accelerator is not None:
            accelerator.wait_for_everyone()
            if not main_process:
                lora_state_dict(transformer)  # FSDP: take part in gathering the final LoRA
                return {"final_loss": last_loss, "steps": max_steps, "process": rank}
        metadata = {**model_info, "rank": cfg.lora_rank, "alpha": cfg.lora_alpha or cfg.lora_rank,
                    "targets": cfg.flux_lora_target, "steps": max_steps, "processes": processes,
                    "trigger_phrase": params.publish.trigger_phrase,
                    "dataset_dvc_hash": dataset_hash,
                    "mlflow_run_id": run.info.run_id}
        lora_file = save_diffusers_lora(transformer, pipeline_class(params.model), layout.lora_dir, metadata)
        mlflow.log_artifact(str(lora_file), artifact_path="lora")
        metrics = {"final_loss": last_loss, "steps": max_steps, "resumed_from_step": start_step,
                   "processes": processes,
                   "mean_loss_last_10": sum(losses[-10:]) / max(1, len(losses[-10:])),
                   "lora_modules": len(targets), "last_step_time_s": step_time}
        mlflow.flush_async_logging()
        mlflow.log_metrics({"final_loss": last_loss})
        write_json_atomic(layout.train_metrics, metrics)
        tracking.write_run_file(layout.run_file, run)
    log.info("train: LoRA written to %s (final loss %.4f)", lora_file, last_loss)
    return {**metrics, "lora_file": str(lora_file), "mlflow_run_id": run.info.run_id,
            "mean_first_losses": sum(losses[:5]) / max(1, len(losses[:5])) if losses else math.nan}
