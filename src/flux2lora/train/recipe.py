"""The `train` stage as a recipe: LoRA on the FLUX.2 transformer from cached latents and prompt embeddings.

Read it in the order it runs: `setup` (accelerator, data, model with LoRA, optimizer), `resume` (the newest
checkpoint of this run's fingerprint), `train` (the steps, with checkpoints and validation), `save` (the LoRA file,
metrics, the MLflow run file). One Accelerator path serves one process and many (`accelerate launch`): with one,
it wraps nothing.

Flow matching: x_t = (1 - sigma) * x0 + sigma * noise, the model predicts noise - x0, MSE loss. Everything random
comes from checkpointed generators (`draws.StepDraws`), so a resumed run ends with the same LoRA as one that never
stopped.
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
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import faults, tracking
from ..cache.store import TensorStore
from ..config import Params, TrainParams
from ..errors import UserError
from ..data.prepare import log_prepare_report
from ..data.sampling import batches_for
from ..io import write_json_atomic
from ..layout import layout_for
from ..models import check_not_distilled, component_identity, describe_model, load_training_transformer, pipeline_class, resolve_device
from ..params_table import stage_inputs
from ..validate.during_training import TrainingValidator
from .checkpoint import TrainingState, latest_matching, list_checkpoints
from .ema import AdapterEMA
from .draws import StepDraws, load_samples, routing_generator, total_steps
from .evaluation import EvaluationLoss, split_for_evaluation
from .lora import add_lora, lora_state_dict, save_diffusers_lora, targets_description, training_targets
from .model import build_training_model
from .rollout import apply_rollouts, rollout_model
from .schedules import build_lr_scheduler
from .step import TrainingDiverged, TrainingStep, make_optimizer

log = logging.getLogger(__name__)


def make_accelerator(device: torch.device):
    """accelerate's Accelerator for this process: one of several when `accelerate launch` started it, else alone
    (then `prepare` wraps nothing). Precision is the step's own autocast (train.mixed_precision), not accelerate's."""
    from accelerate import Accelerator

    accelerator = Accelerator(mixed_precision="no", cpu=device.type == "cpu")
    if accelerator.distributed_type.value == "DEEPSPEED":
        # DeepSpeed's engine owns backward, accumulation and clipping, which this loop does itself; for a LoRA
        # ZeRO-2 would shard only the small adapter's optimizer state, and FSDP2 shards the large frozen base.
        raise ValueError("runtime.accelerate_config: DeepSpeed is not supported by the train loop; use "
                         "infra/accelerate/multi-gpu.yaml (DDP) or infra/accelerate/fsdp2.yaml (sharded base)")
    return accelerator


def fingerprint(params: Params, layout) -> str:
    """Identity of what this run computes: the values of the keys that compute train (flux2lora.params_table, paths
    as written), the transformer's weights and the exact cached inputs. Keys that only change how the run executes
    (memory, speed, logging, checkpoint cadence, processes) are not part of it: a run resumes across them."""
    identity = {"train": stage_inputs(params)["train"],
                "transformer": component_identity(params.model, "transformer")}
    h = hashlib.sha256(json.dumps(identity, sort_keys=True).encode())
    h.update((layout.latents_dir / "index.json").read_bytes())
    h.update((layout.text_embeds_dir / "index.json").read_bytes())
    return h.hexdigest()[:20]


def warn_if_guidance_ignored(params: Params) -> None:
    cfg, defaults = params.train, TrainParams()
    keys = ("flux_guidance_mode", "flux_guidance_value", "flux_guidance_min", "flux_guidance_max")
    changed = [k for k in keys if getattr(cfg, k) != getattr(defaults, k)]
    if changed and not params.model.flavour.guidance_embeds:
        warnings.warn(f"{params.model.model_flavour} has no guidance embedder: {', '.join(changed)} "
                      "is ignored (only dev trains with distilled guidance)", UserWarning, stacklevel=2)


class RunLog:
    """The training run in MLflow, written by the main process only (the others train and log nothing).

    `active_file` names the run while it is open: a process killed before it could end its run leaves it there,
    and the next start ends that run as KILLED unless it resumes it. Steps re-trained after a resume (those after
    the checkpoint that an earlier attempt had already logged) are not logged twice."""

    def __init__(self, params: Params, root: Path, main_process: bool, active_file: Path | None = None):
        self.params, self.root, self.enabled = params, root, main_process
        self.mlflow = tracking.configure(params, root) if main_process else None
        self.run = None
        self.active_file = active_file
        self.logged_until = -1  # the last step whose metrics the run already holds (step 0: the base's eval loss)

    def start(self, run_id: str | None, layout, num_lora_modules: int, start_step: int) -> None:
        """Open (or, resuming, reopen) the run; a new run gets the params, tags and prepare's report."""
        if not self.enabled:
            return
        params, mlflow = self.params, self.mlflow
        if run_id is not None and not self._exists(run_id):
            # a checkpoint from a clone whose MLflow store did not come along: the resumed run is a new MLflow run
            log.info("MLflow run %s of the checkpoint is not in %s: resuming into a new run", run_id,
                     mlflow.get_tracking_uri())
            run_id = None
        self._end_killed_run(except_run=run_id)
        # a new run is named tracking.run_name, else after the Prefect flow run it trains in (the flow names
        # itself after the MLflow run too: tasks/report.py), else by MLflow
        run_name = None if run_id else params.tracking.run_name or tracking.prefect_flow_run_name()
        self.run = mlflow.start_run(run_id=run_id, run_name=run_name,
                                    log_system_metrics=params.runtime.log_system_metrics())
        if run_id is None:
            tracking.log_params_flat(mlflow, params)
            mlflow.set_tags({"git_commit": tracking.git_commit(self.root),
                             "dataset_dvc_hash": tracking.dataset_dvc_hash(self.root, params.prepare.data_root),
                             "flavour": params.model.model_flavour, "base_model": params.model.model_id,
                             "lora_targets": targets_description(params.train), "num_lora_modules": num_lora_modules})
            log_prepare_report(mlflow, layout)  # images accepted / skipped by reason, beside the losses
        mlflow.set_tag("resumed_from_step", start_step)
        if run_id is not None:
            client = mlflow.tracking.MlflowClient()
            self.logged_until = max((m.step for key in (tracking.LOSS_METRIC, tracking.EVAL_LOSS_METRIC)
                                     for m in client.get_metric_history(run_id, key)), default=-1)
        if self.active_file is not None:
            write_json_atomic(self.active_file, {"run_id": self.run_id})

    def _end_killed_run(self, except_run: str | None) -> None:
        if self.active_file is None or not self.active_file.exists():
            return
        stale = json.loads(self.active_file.read_text()).get("run_id")
        if stale and stale != except_run and self._exists(stale):
            client = self.mlflow.tracking.MlflowClient()
            if client.get_run(stale).info.status == "RUNNING":
                client.set_terminated(stale, status="KILLED")
                log.info("MLflow run %s of a training that was killed is now marked KILLED", stale)
        self.active_file.unlink(missing_ok=True)

    def _exists(self, run_id: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            self.mlflow.get_run(run_id)
            return True
        except MlflowException:
            return False

    @property
    def run_id(self) -> str | None:
        return self.run.info.run_id if self.run is not None else None

    def step(self, step: int, metrics: dict[str, float]) -> None:
        if self.enabled and step > self.logged_until:  # asynchronous: a committed sqlite write per step would cost ~10 ms of training time each
            self.mlflow.log_metrics(metrics, step=step, synchronous=False)

    def tags(self, tags: dict[str, str]) -> None:
        if self.enabled:
            self.mlflow.set_tags(tags)

    def finish(self, lora_file: Path, final_loss: float) -> None:
        self.mlflow.log_artifact(str(lora_file), artifact_path="lora")
        self.mlflow.flush_async_logging()
        self.mlflow.log_metrics({"final_loss": final_loss})

    def close(self, failed: bool) -> None:
        if self.run is not None:
            self.mlflow.end_run(status="FAILED" if failed else "FINISHED")
            self.run = None
            if self.active_file is not None:
                self.active_file.unlink(missing_ok=True)


class LoRATrainingRecipe:
    """setup -> resume -> train -> save (see the module docstring)."""

    def __init__(self, params: Params, root: Path, layout=None, checkpoint_mirror=None):
        self.params, self.root, self.cfg = params, root, params.train
        # runtime.storage (shared_storage.py): a worker's node-local layout, and the checkpoints' shared copy
        self.layout = layout if layout is not None else layout_for(root, params.output_dir)
        self.checkpoint_mirror = checkpoint_mirror
        self.start_step, self.run_id = 0, None
        self.last_step = 0  # the last step trained (below max_steps when early stopping ended the run)
        self.losses: list[float] = []
        self.last_loss, self.step_time = float("nan"), 0.0

    # -- setup

    def setup(self) -> None:
        """The accelerator, the samples and their draws, the frozen transformer with its LoRA, the optimizer and
        schedule, the training step, checkpoint state and the validator."""
        params, cfg, layout = self.params, self.cfg, self.layout
        check_not_distilled(params.model)  # before anything loads: the most reported klein failure
        self.accelerator = make_accelerator(resolve_device(params.model.device))
        self.processes, self.rank = self.accelerator.num_processes, self.accelerator.process_index
        self.main_process = self.accelerator.is_main_process
        self.device = self.accelerator.device if self.processes > 1 else resolve_device(params.model.device)
        warn_if_guidance_ignored(params)
        samples, empty_key = load_samples(layout)
        # validate.eval_split: the held-out images never reach the batches
        samples, eval_samples, eval_source = split_for_evaluation(samples, params)
        # one aspect bucket per batch; datasets by their `probability` when any sets one
        batches = batches_for(samples, cfg.train_batch_size, cfg.seed)
        self.max_steps = total_steps(cfg, batches, self.processes)
        self.fingerprint = fingerprint(params, layout)
        self._setup_model()
        self.draws = StepDraws(cfg, batches, TensorStore(layout.latents_dir), TensorStore(layout.text_embeds_dir),
                               empty_key, params.model.flavour.guidance_embeds, self.device, self.processes,
                               self.rank)
        self.evaluation = EvaluationLoss.for_training(
            params, eval_samples, eval_source, self.draws.latent_store, self.draws.text_store,
            params.model.flavour.guidance_embeds, self.transformer, self.device, self.training_step.autocast_dtype)
        # the best eval loss so far (best_eval, early stopping) travels in every checkpoint
        self.selection = self.evaluation.selection if self.evaluation is not None else None
        self.ema = AdapterEMA.for_training(self.training_step.lora_params, cfg)  # train.use_ema
        self.rollout_model = rollout_model(self.transformer, cfg, self.accelerator)  # scheduled sampling
        self.state = TrainingState(self.transformer, self.training_step, self.draws, self.accelerator,
                                   extras=tuple(x for x in (self.selection, self.ema) if x is not None))
        # Every validate.validation_step_interval steps (None when unset); the final step is the validate stage's.
        self.validator = TrainingValidator.for_training(params, self.root, self.transformer, self.device) \
            if self.main_process else None
        if self.validator is not None:
            self.validator.max_steps = self.max_steps

    def _setup_model(self) -> None:
        params, cfg = self.params, self.cfg
        torch.manual_seed(cfg.seed)  # the LoRA's initialisation: the same on every process
        group_offload = dict(offload_type=cfg.group_offload_type, blocks_per_group=cfg.group_offload_blocks_per_group,
                             use_stream=cfg.group_offload_use_stream) if cfg.enable_group_offload else None
        transformer = load_training_transformer(params.model, self.device, cfg.base_model_precision,
                                                cfg.quantize_via, group_offload=group_offload,
                                                offload_during_startup=cfg.offload_during_startup)
        self.targets = training_targets(transformer, cfg)
        lora_params = add_lora(transformer, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, self.targets,
                               cfg.lora_init_type, use_dora=cfg.use_dora, kind=cfg.lora_type,
                               lycoris=cfg.lycoris_config)
        if group_offload is not None:
            for p in lora_params:  # the offload hooks move only the frozen weights; the adapter lives on the device
                p.data = p.data.to(self.device)
        self.transformer = transformer
        # resume's LoRA weights go in before any wrapping (FSDP shards them)
        if self.checkpoint_mirror is not None and cfg.resume_from_checkpoint:
            self.checkpoint_mirror.pull(self.layout.checkpoints_dir)
        self.checkpoint = latest_matching(self.layout.checkpoints_dir, self.fingerprint) \
            if cfg.resume_from_checkpoint else None
        if self.checkpoint is not None:
            TrainingState.restore_lora(transformer, self.checkpoint)
        model = build_training_model(params, transformer)
        transformer.train()
        optimizer = make_optimizer(lora_params, cfg, self.device)
        scheduler = build_lr_scheduler(optimizer, cfg, self.max_steps)
        if self.processes > 1:
            # DDP synchronises only the LoRA gradients; the frozen base is loaded identically by every process and
            # is not broadcast (quantized weights could not be)
            frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
            torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
                model, frozen + [name for name, _ in model.named_buffers()])
        model, optimizer = self.accelerator.prepare(model, optimizer, device_placement=[False, False])  # placed
        if self.processes > 1:
            lora_params = [p for p in model.parameters() if p.requires_grad]
            torch.manual_seed(cfg.seed + self.rank)  # LoRA dropout masks: independent per process
            log.info("training on %d processes (%s, rank %d): model wrapped as %s", self.processes,
                     self.accelerator.distributed_type.value, self.rank, type(model).__name__)
        self.scheduler = scheduler
        self.training_step = TrainingStep(model, lora_params, optimizer, scheduler,
                                          mixed_precision=cfg.mixed_precision, max_grad_norm=cfg.max_grad_norm,
                                          device=self.device, dtype=transformer.dtype, accelerator=self.accelerator,
                                          grad_clip_method=cfg.grad_clip_method, loss_weighting=cfg.loss_weighting)

    # -- resume

    def resume(self) -> None:
        """Continue from the newest checkpoint of this run's fingerprint, if any (its LoRA is in since setup)."""
        if self.checkpoint is None:
            return
        self.state.restore(self.checkpoint)
        self.start_step, self.run_id = self.checkpoint.step, self.checkpoint.state.get("mlflow_run_id")
        self.last_step = self.start_step
        log.info("resuming from checkpoint %s (step %d of %d)", self.checkpoint.path.name, self.start_step,
                 self.max_steps)

    # -- train

    def train(self, run_log: RunLog) -> None:
        """The steps from start_step to max_steps: one optimizer step each, then metrics, checkpoint, validation."""
        cfg = self.cfg
        progress = tqdm(range(self.start_step, self.max_steps), desc="train", unit="step", initial=self.start_step,
                        total=self.max_steps, disable=not self.main_process)
        if self.evaluation is not None:
            run_log.tags(self.evaluation.describe())
            if self._evaluate(0, run_log):  # the base model: where the curve starts
                self._checkpoint(0, run_log)
        for step in progress:
            t0 = time.perf_counter()
            micro_batches = self.draws.micro_batches(step)
            if self.rollout_model is not None:  # scheduled sampling: the model's own inputs (train/rollout.py)
                apply_rollouts(micro_batches, self.rollout_model, self.training_step.autocast_dtype,
                               self.transformer.dtype)
            try:
                loss, grad_norm = self.training_step(micro_batches, routing_generator(cfg.seed, step, self.rank),
                                                     step + 1)
            except TrainingDiverged as e:
                raise TrainingDiverged(
                    f"train: {e}; stopped. The last good checkpoint in {self.layout.checkpoints_dir} is kept: lower "
                    "train.learning_rate or set train.max_grad_norm, then re-run to resume from it") from None
            self.step_time, self.last_loss = time.perf_counter() - t0, loss
            self.losses.append(loss)
            progress.set_postfix(loss=f"{loss:.4f}")
            self.last_step = step + 1
            self._after_step(step + 1, grad_norm, run_log)
            if self.stop_reason is not None:
                break
        if self.stop_reason is not None:
            log.warning("train: %s; stopped after step %d of %d", self.stop_reason, self.last_step, self.max_steps)
            run_log.tags({"stop_reason": self.stop_reason, "stopped_at_step": str(self.last_step)})

    @property
    def stop_reason(self) -> str | None:
        """Why training ends before max_steps (early stopping), or None."""
        return self.selection.stop_reason if self.selection is not None else None

    def _evaluate(self, step: int, run_log: RunLog) -> bool:
        """The evaluation loss at `step` when due, logged beside the training loss (every process scores it: the
        forward of a sharded model needs them all). True when it is a new best that best_eval keeps."""
        if self.evaluation is None or not self.evaluation.due(step, self.max_steps):
            return False
        with self._exported_weights():
            metrics = self.evaluation.evaluate(step)
        run_log.step(step, metrics)
        log.info("eval loss at step %d: %.6f", step, metrics[tracking.EVAL_LOSS_METRIC])
        return self.selection.keep_best and self.selection.best_step == step

    def _exported_weights(self):
        """The weights the LoRA file will hold, for evaluation and validation: the EMA's with ema_export: ema."""
        return self.ema.exported_weights() if self.ema is not None else contextlib.nullcontext()

    def _checkpoint(self, step: int, run_log: RunLog) -> None:
        """Checkpoint `step`; best_eval's best checkpoint is never deleted by checkpoints_total_limit."""
        keep_best = self.selection is not None and self.selection.keep_best
        saved = self.state.capture(self.layout.checkpoints_dir, step,
                                   {"fingerprint": self.fingerprint, "mlflow_run_id": run_log.run_id,
                                    "loss": self.last_loss}, keep=self.cfg.checkpoints_total_limit,
                                   protect=self.selection.best_step if keep_best else None)
        if self.checkpoint_mirror is not None:
            if saved is not None:
                self.checkpoint_mirror.push(self.layout.checkpoints_dir)
            # a checkpoint counts once it is in the shared storage: no process goes on (or fails) before that
            self.accelerator.wait_for_everyone()

    def _after_step(self, done: int, grad_norm: float, run_log: RunLog) -> None:
        cfg = self.cfg
        if self.ema is not None:
            self.ema.after_step(done)
        if done % cfg.log_every_n_steps == 0 or done == self.max_steps:
            run_log.step(done, {tracking.LOSS_METRIC: self.last_loss, "learning_rate": self.scheduler.get_last_lr()[0],
                                "grad_norm": float(grad_norm), "step_time_s": self.step_time})
        new_best = self._evaluate(done, run_log)
        if (done % cfg.checkpointing_steps == 0 or new_best) and done < self.max_steps:
            self._checkpoint(done, run_log)
        if self.validator is not None and self.validator.due(done):
            with self._exported_weights():
                self.validator.run(done, run_log.mlflow)
        # FLUX2LORA_FAULT=train:step=N fails once here, after step N's checkpoint: the retry resumes from it
        faults.maybe_fail("train", f"step={done}", self.layout.output_dir)

    # -- save

    def save(self, run_log: RunLog) -> dict:
        """The LoRA in the diffusers format, train/metrics.json and the MLflow run file (main process)."""
        self.accelerator.wait_for_everyone()
        selected = self._select_lora()
        if self.ema is not None:
            self.ema.export()  # ema_export: ema writes the EMA's weights
        if not self.main_process:
            lora_state_dict(self.transformer)  # FSDP: take part in gathering the final LoRA
            return {"final_loss": self.last_loss, "steps": self.last_step, "process": self.rank}
        cfg, layout, losses = self.cfg, self.layout, self.losses
        metadata = {**describe_model(self.params.model), "rank": cfg.lora_rank,
                    "alpha": cfg.lora_alpha or cfg.lora_rank, "targets": targets_description(cfg),
                    "kind": "dora" if cfg.use_dora else cfg.lora_type,
                    "steps": self.last_step, "processes": self.processes,
                    # the LoRA file is train's output: only train's declared inputs may shape it (not dvc.lock)
                    "training_data_sha256": tracking.training_data_sha256(layout.text_embeds_dir, layout.latents_dir),
                    **({"selected_step": selected} if cfg.checkpoint_selection == "best_eval" else {}),
                    **({"ema_export": cfg.ema_export, "ema_decay": cfg.ema_decay} if cfg.use_ema else {})}
        # no MLflow run id (train/mlflow_run.json has it): identical inputs give a byte-identical LoRA file
        lora_file = save_diffusers_lora(self.transformer, pipeline_class(self.params.model), layout.lora_dir,
                                        metadata)
        run_log.finish(lora_file, self.last_loss)
        metrics = {"final_loss": self.last_loss, "steps": self.last_step, "resumed_from_step": self.start_step,
                   "processes": self.processes,
                   "mean_loss_last_10": sum(losses[-10:]) / max(1, len(losses[-10:])),
                   "lora_modules": len(self.targets), "last_step_time_s": self.step_time,
                   **self._selection_summary(selected)}
        run_log.tags({"selected_step": str(selected)})
        write_json_atomic(layout.train_metrics, metrics)
        tracking.write_run_file(layout.run_file, run_log.run)
        log.info("train: LoRA written to %s (final loss %.4f)", lora_file, self.last_loss)
        return {**metrics, "lora_file": str(lora_file), "mlflow_run_id": run_log.run_id,
                "mean_first_losses": sum(losses[:5]) / max(1, len(losses[:5])) if losses else math.nan}


    def _select_lora(self) -> int:
        """The step whose LoRA the stage writes: the last, or with best_eval the lowest eval loss's (its
        checkpoint's LoRA is loaded into the transformer)."""
        selection = self.selection
        if selection is None or not selection.keep_best or selection.best_step in (None, self.last_step):
            return self.last_step
        best = next((c for c in list_checkpoints(self.layout.checkpoints_dir) if c.step == selection.best_step), None)
        if best is None:
            raise UserError(f"train.checkpoint_selection best_eval: the checkpoint of step {selection.best_step} "
                            f"(lowest eval loss) is missing from {self.layout.checkpoints_dir}; re-run training "
                            "with train.resume_from_checkpoint: null")
        TrainingState.restore_lora(self.transformer, best)
        if self.ema is not None:
            self.ema.load_state_dict(best.training_state())  # that step's average
        log.info("train: writing the LoRA of step %d (lowest eval loss %.6f) instead of the last step's (%d)",
                 best.step, selection.best_loss, self.last_step)
        return best.step

    def _selection_summary(self, selected: int) -> dict:
        summary = {"selected_step": selected, "checkpoint_selection": self.cfg.checkpoint_selection,
                   "stop_reason": self.stop_reason}
        if self.evaluation is not None and self.evaluation.last:
            summary.update(eval_loss=self.evaluation.last[tracking.EVAL_LOSS_METRIC], best_eval_loss=self.selection.best_loss,
                           best_eval_step=self.selection.best_step)
        return summary


def train(params: Params, root: Path, layout=None, checkpoint_mirror=None) -> dict:
    """Train the LoRA; writes lora/pytorch_lora_weights.safetensors, train/metrics.json and train/mlflow_run.json.

    One training per project at a time: the main process holds `TrainingLock` from setup to the end. `layout` and
    `checkpoint_mirror`: a Ray worker's with runtime.storage (flux2lora.shared_storage)."""
    layout = layout if layout is not None else layout_for(root, params.output_dir)
    with TrainingLock(layout.state_dir / "training.lock", enabled=_is_main_process()):
        recipe = LoRATrainingRecipe(params, root, layout, checkpoint_mirror)
        recipe.setup()
        recipe.resume()
        run_log = RunLog(params, root, recipe.main_process, layout.state_dir / "training_mlflow_run.json")
        run_log.start(recipe.run_id, recipe.layout, len(recipe.targets), recipe.start_step)
        failed = True
        try:
            recipe.train(run_log)
            summary = recipe.save(run_log)
            failed = False
        finally:
            run_log.close(failed)
    return summary


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0  # set by accelerate launch / torchrun for each process


class TrainingLocked(UserError, RuntimeError):
    """Another training of this project is running; a retry once it has finished succeeds (not permanent)."""

    permanent = False


class TrainingLock:
    """An exclusive lock on the project's training, held by the main process: a second `flux2lora stage train`
    (or flow) refuses with the holder's pid and host instead of racing it for the checkpoints. The lock is the
    operating system's (flock): a killed holder releases it, so a stale lock never blocks the next run."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path, self.enabled, self._file = path, enabled, None

    def __enter__(self) -> "TrainingLock":
        if not self.enabled:
            return self
        import fcntl
        import socket

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a+")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            holder = self._file.read().strip() or "unknown"
            self._file.close()
            raise TrainingLocked(f"train: another training of this project is running ({holder}; lock "
                                 f"{self.path}); wait for it to finish or stop it, then re-run (it resumes from its "
                                 "checkpoints)") from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"pid {os.getpid()} on {socket.gethostname()}")
        self._file.flush()
        return self

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            self._file.close()  # releases the lock
            self._file = None
