"""What every params.yaml key does: the one table from which DVC's view, the train fingerprint and the nightly
comparison are derived.

Each key is one of three kinds:

- it **computes** the output of one or more stages (`Computes("train")`): changing it re-runs those stages (and,
  through their changed outputs, the stages downstream);
- it only changes how a stage **runs** (memory, speed, batching, logging, checkpoint cadence, where runs are
  recorded, how processes start): changing it re-runs nothing, and a run resumes its checkpoints across it;
- it **publishes** (where and how the finished LoRA is published): changing it re-runs publish only.

The `params` stage writes, for every stage, the values of the keys that compute it (defaults filled in, paths as
written) to `outputs/params/<stage>.json`; each stage depends on its own file in dvc.yaml. So DVC re-runs a stage
when, and only when, a key of that stage changed its value, whether params.yaml names it or it is a default.
A key in a list of sections (`prepare.datasets.0.crop`) has the kind of its list (`prepare.datasets`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

# The stages in pipeline order, after `params` (which writes the files below). flux2lora.stages runs them.
PIPELINE_STAGES = ("prepare", "encode-text", "encode-latents", "train", "validate", "publish")


@dataclass(frozen=True)
class Computes:
    """The key's value shapes the outputs of these stages."""

    stages: tuple[str, ...]

    def __init__(self, *stages: str):
        unknown = [s for s in stages if s not in PIPELINE_STAGES]
        if unknown or not stages:
            raise ValueError(f"Computes: unknown stage(s) {unknown}")
        object.__setattr__(self, "stages", tuple(stages))


RUNS = "runs"  # how a stage runs; not an input of any stage's result
PUBLISHES = "publishes"  # where the finished LoRA goes: an input of publish only

# The base model is read by every stage after prepare (publish names it in the model card and the LoRA's metadata).
_MODEL = Computes("encode-text", "encode-latents", "train", "validate", "publish")
_TEXT_SOURCE = Computes("encode-text", "train")
_PREPARE = Computes("prepare")
_TEXT = Computes("encode-text")
_LATENTS = Computes("encode-latents")
_TRAIN = Computes("train")
_VALIDATE = Computes("validate")

TABLE: dict[str, Computes | str] = {
    # where every stage writes; templated into dvc.yaml's paths, so a new value moves every output
    "output_dir": RUNS,

    "model.model_flavour": _MODEL,
    "model.pretrained_model_name_or_path": _MODEL,
    "model.revision": _MODEL,
    "model.base_model_default_dtype": _MODEL,
    "model.device": RUNS,
    # a separate text encoder / tokenizer (dev's from Mistral-Small's repo): the embeddings, and the LoRA's metadata
    "model.pretrained_text_encoder_name_or_path": _TEXT_SOURCE,
    "model.text_encoder_subfolder": _TEXT_SOURCE,
    "model.text_encoder_revision": _TEXT_SOURCE,
    "model.pretrained_tokenizer_name_or_path": _TEXT_SOURCE,
    "model.tokenizer_subfolder": _TEXT_SOURCE,
    "model.tokenizer_revision": _TEXT_SOURCE,
    # the distilled-klein guard: whether the caching and training stages run at all, and the model card's warning
    "model.allow_distilled": Computes("encode-text", "encode-latents", "train"),

    "prepare.data_root": _PREPARE,
    "prepare.instance_data_dir": _PREPARE,
    "prepare.datasets": _PREPARE,
    "prepare.image_extensions": _PREPARE,
    "prepare.crop": _PREPARE,
    "prepare.crop_aspect": _PREPARE,
    "prepare.crop_aspect_buckets": _PREPARE,
    "prepare.crop_style": _PREPARE,
    "prepare.resolution": _PREPARE,
    "prepare.resolution_type": _PREPARE,
    "prepare.minimum_image_size": _PREPARE,
    "prepare.repeats": _PREPARE,
    "prepare.caption_strategy": _PREPARE,
    "prepare.caption_extension": _PREPARE,
    "prepare.instance_prompt": _PREPARE,
    "prepare.prepend_instance_prompt": _PREPARE,
    "prepare.parquet": _PREPARE,
    "prepare.conditioning_data": _PREPARE,
    "prepare.conditioning_type": _PREPARE,
    "prepare.disabled": _PREPARE,
    "prepare.disable_multiline_split": _PREPARE,

    "encode_text.max_sequence_length": _TEXT,
    "encode_text.text_encoder_out_layers": _TEXT,
    "encode_text.cache_dtype": _TEXT,
    "encode_text.text_encoder_1_precision": _TEXT,
    # the outputs are equal with and without these (tests/test_text_encoding.py); only memory and time differ
    "encode_text.truncate_text_encoder": RUNS,
    "encode_text.group_offload_text_encoder": RUNS,
    "encode_text.text_encoder_batch_size": RUNS,
    # shard size: how many entries share a file, not what they hold (a killed run loses at most one shard)
    "encode_text.write_batch_size": RUNS,

    "encode_latents.cache_dtype": _LATENTS,
    "encode_latents.vae_batch_size": RUNS,
    "encode_latents.write_batch_size": RUNS,
    "encode_latents.group_offload_vae": RUNS,

    "train.lora_rank": _TRAIN,
    "train.lora_alpha": _TRAIN,
    "train.lora_dropout": _TRAIN,
    "train.lora_init_type": _TRAIN,
    "train.flux_lora_target": _TRAIN,
    "train.lora_target_modules": _TRAIN,
    "train.use_dora": _TRAIN,
    "train.lora_type": _TRAIN,
    "train.lycoris_config": _TRAIN,
    "train.learning_rate": _TRAIN,
    "train.adam_beta1": _TRAIN,
    "train.adam_beta2": _TRAIN,
    "train.adam_weight_decay": _TRAIN,
    "train.adam_epsilon": _TRAIN,
    "train.lr_scheduler": _TRAIN,
    "train.lr_warmup_steps": _TRAIN,
    "train.lr_end": _TRAIN,
    "train.lr_power": _TRAIN,
    "train.max_train_steps": _TRAIN,
    "train.num_train_epochs": _TRAIN,
    "train.train_batch_size": _TRAIN,
    "train.gradient_accumulation_steps": _TRAIN,
    "train.use_8bit_adam": _TRAIN,
    "train.optimizer": _TRAIN,
    "train.max_grad_norm": _TRAIN,
    "train.grad_clip_method": _TRAIN,
    "train.mixed_precision": _TRAIN,
    "train.seed": _TRAIN,
    "train.weighting_scheme": _TRAIN,
    "train.logit_mean": _TRAIN,
    "train.logit_std": _TRAIN,
    "train.mode_scale": _TRAIN,
    "train.timestep_shift": _TRAIN,
    "train.timestep_shift_inference_steps": _TRAIN,
    "train.loss_weighting": _TRAIN,
    # quantized weights change the forward's numbers (the LoRA learns against them)
    "train.base_model_precision": _TRAIN,
    "train.tread_config": _TRAIN,
    "train.conditioning_multidataset_sampling": _TRAIN,
    "train.caption_dropout_probability": _TRAIN,
    "train.flux_guidance_mode": _TRAIN,
    "train.flux_guidance_value": _TRAIN,
    "train.flux_guidance_min": _TRAIN,
    "train.flux_guidance_max": _TRAIN,
    # memory and speed: the same LoRA with or without them (tests/test_memory_options.py), so a run that ran out of
    # memory resumes its checkpoints with checkpointing or offload switched on
    "train.gradient_checkpointing": RUNS,
    "train.gradient_checkpointing_blocks": RUNS,
    "train.vram_budget_gib": RUNS,
    "train.compile_transformer": RUNS,
    "train.compile_backend": RUNS,
    "train.quantize_via": RUNS,
    "train.enable_group_offload": RUNS,
    "train.group_offload_type": RUNS,
    "train.group_offload_blocks_per_group": RUNS,
    "train.group_offload_use_stream": RUNS,
    "train.offload_during_startup": RUNS,
    # observing and saving the run
    "train.checkpointing_steps": RUNS,
    "train.checkpoints_total_limit": RUNS,
    "train.resume_from_checkpoint": RUNS,
    "train.log_every_n_steps": RUNS,
    # which step's LoRA is written, and when training ends
    "train.checkpoint_selection": _TRAIN,
    "train.early_stopping_patience": _TRAIN,
    "train.early_stopping_min_delta": _TRAIN,
    # the EMA's weights are what the LoRA file (ema_export: ema), the eval loss and in-training validation use
    "train.use_ema": _TRAIN,
    "train.ema_decay": _TRAIN,
    "train.ema_update_interval": _TRAIN,
    "train.ema_export": _TRAIN,
    # scheduled sampling changes the inputs the LoRA trains on
    "train.scheduled_sampling_max_step_offset": _TRAIN,
    "train.scheduled_sampling_probability": _TRAIN,
    "train.scheduled_sampling_ramp_steps": _TRAIN,
    "train.scheduled_sampling_prob_start": _TRAIN,
    "train.scheduled_sampling_prob_end": _TRAIN,

    # the prompt library's texts and the subject put into them are encoded by encode-text into prompt_embeds/,
    # which validate reads; the library file itself is a dependency of encode-text in dvc.yaml
    "validate.user_prompt_library": _TEXT,
    "validate.validation_subject": _TEXT,
    "validate.validation_resolution": _VALIDATE,
    "validate.validation_num_inference_steps": _VALIDATE,
    "validate.validation_guidance": _VALIDATE,
    "validate.validation_seed": _VALIDATE,
    "validate.validation_lora_scale": _VALIDATE,
    "validate.enable_group_offload": RUNS,
    # images logged to MLflow while training: they observe the run and never change the LoRA
    "validate.validation_step_interval": RUNS,
    # the evaluation loss is computed by train (its curve in MLflow, metrics.json, best_eval and early stopping):
    # the eval set and its noise are part of the run's identity; eval_split also changes what is trained on
    "validate.eval_every_n_steps": _TRAIN,
    "validate.eval_split": _TRAIN,
    "validate.eval_max_samples": _TRAIN,
    "validate.eval_sigmas": _TRAIN,
    "validate.eval_seed": _TRAIN,

    "publish.s3_uri": PUBLISHES,
    "publish.s3_endpoint_url": PUBLISHES,
    "publish.s3_multipart_threshold_mb": RUNS,
    "publish.s3_multipart_chunksize_mb": RUNS,
    "publish.s3_max_attempts": RUNS,
    "publish.hub_repo_id": PUBLISHES,
    "publish.hub_private": PUBLISHES,
    "publish.registered_model_name": PUBLISHES,
    "publish.trigger_phrase": PUBLISHES,

    "tracking.experiment_name": RUNS,
    "tracking.tracking_uri": RUNS,
    "tracking.run_name": RUNS,

    "runtime.num_processes": RUNS,
    "runtime.accelerate_config": RUNS,
    "runtime.system_metrics": RUNS,
    "runtime.engine": RUNS,
    "runtime.ray_address": RUNS,
    "runtime.ray_project_dir": RUNS,
    "runtime.ray_master_addr": RUNS,
    "runtime.ray_max_failures": RUNS,
    "runtime.storage": RUNS,  # where a Ray job's caches and checkpoints live: the same bytes, wherever they are
}


def kind_of(key: str) -> Computes | str:
    """The table's entry for a dotted key; keys inside a list of sections take their list's entry."""
    if key in TABLE:
        return TABLE[key]
    parts = key.split(".")
    for end in range(len(parts) - 1, 0, -1):
        if ".".join(parts[:end]) in TABLE:
            return TABLE[".".join(parts[:end])]
    raise KeyError(f"{key!r} is not in flux2lora.params_table.TABLE: every params key must say what it changes")


def stage_inputs(params) -> dict[str, dict[str, Any]]:
    """For every pipeline stage, the keys that compute it and their values (validated, defaults filled in, as
    written: a relative model folder stays relative, so a moved project has the same inputs). Publish also gets
    the publishing keys."""
    tree = params.model_dump(by_alias=True, mode="json")
    inputs: dict[str, dict[str, Any]] = {stage: {} for stage in PIPELINE_STAGES}
    for key, kind in TABLE.items():
        value = _lookup(tree, key)
        if kind == PUBLISHES:
            inputs["publish"][key] = value
        elif isinstance(kind, Computes):
            for stage in kind.stages:
                inputs[stage][key] = value
    return inputs


def write_stage_inputs(params, root) -> dict:
    """The `params` stage: `outputs/params/<stage>.json` for every pipeline stage (sorted JSON, rewritten only
    when its content changes, so DVC sees a stage's file change exactly when one of its inputs did)."""
    from .io import write_text_atomic
    from .layout import layout_for

    layout = layout_for(root, params.output_dir)
    changed = []
    for stage, values in stage_inputs(params).items():
        path = layout.stage_params(stage)
        text = json.dumps(values, indent=2, sort_keys=True) + "\n"
        if not path.exists() or path.read_text() != text:
            write_text_atomic(path, text)
            changed.append(stage)
    return {"changed": changed}


def compared(params) -> dict[str, Any]:
    """Every key that computes a stage or publishes, with its value: what a nightly run compares."""
    return {key: value for stage in stage_inputs(params).values() for key, value in stage.items()}


def _lookup(tree: dict, dotted: str):
    node: Any = tree
    for part in dotted.split("."):
        node = node[part]
    return node


def unclassified(params_cls=None) -> list[str]:
    """Schema fields that have no entry in TABLE, and entries that name no field: both must be empty."""
    from .config import Params

    schema = set(_schema_keys(params_cls or Params))
    return sorted((schema - set(TABLE)) | (set(TABLE) - schema))


def _schema_keys(model, prefix: str = "") -> list[str]:
    """Dotted field names of a pydantic model; nested sections are recursed into, lists of sections are not."""
    from pydantic import BaseModel

    keys = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{field.alias or name}"
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel) and not prefix:
            keys += _schema_keys(annotation, key + ".")
        else:
            keys.append(key)
    return keys
