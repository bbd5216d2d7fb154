"""Typed `params.yaml`: one section per stage, shared `model` and `tracking` sections.

Keys keep the names of the seed trainer's options wherever one exists (`model_flavour`, `lora_rank`,
`learning_rate`, `validation_resolution`, ...), so its guide reads true for flux2lora. Unknown keys are errors that
name the key and suggest the closest valid one: a typo must never silently fall back to a default.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from .data.config import (DatasetConfig, DatasetOptions, apply_dataset_defaults, check_datasets,
                          text_embeds_write_batch_size)
from .errors import UserError
from .flavours import DEFAULT_FLAVOUR, get_flavour

PARAMS_FILE = "params.yaml"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelParams(Section):
    """Which FLUX.2 model to train on. A hub id or a local diffusers folder (e.g. one from `make-tiny-model`)."""

    model_flavour: str = DEFAULT_FLAVOUR
    pretrained_model_name_or_path: str | None = None  # None: the flavour's default (klein: the *base* repo)
    revision: str | None = None
    # Precision the frozen models run in while caching, training and validating.
    base_model_default_dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    device: str = "auto"  # "auto": cuda when available, else cpu
    # Where the text encoder and its tokenizer come from. None: the base model's text_encoder/ and tokenizer/. dev's
    # encoder may come from mistralai/Mistral-Small-3.1-24B-Instruct-2503 (its own layout: weights at the repo root).
    pretrained_text_encoder_name_or_path: str | None = None
    text_encoder_subfolder: str | None = None  # None: "text_encoder" in the base model, the root of another repo
    text_encoder_revision: str | None = None  # None: `revision` in the base model, the default branch elsewhere
    pretrained_tokenizer_name_or_path: str | None = None
    tokenizer_subfolder: str | None = None  # None: "tokenizer" in the base model, the root of another repo
    tokenizer_revision: str | None = None
    # Train on a step-distilled klein repo anyway (refused by default: LoRAs trained on them come out gray).
    allow_distilled: bool = False
    # The folder relative model paths are read from (the project root); set by load_params, never stored.
    _project_root: Path | None = PrivateAttr(None)

    @field_validator("model_flavour")
    @classmethod
    def _known_flavour(cls, value: str) -> str:
        get_flavour(value)
        return value

    @property
    def flavour(self):
        return get_flavour(self.model_flavour)

    @property
    def model_id(self) -> str:
        """The base model as params.yaml names it (a hub id, or a folder relative to the project): what metadata,
        tags and model cards record, so they do not change when the project moves."""
        return self.pretrained_model_name_or_path or self.flavour.default_repo

    @property
    def model_path(self) -> str:
        """Where to load the base model from: `model_id`, with a relative local folder resolved against the project
        root."""
        return self.local_or_hub(self.model_id)

    @property
    def text_encoder_path(self) -> str | None:
        """`pretrained_text_encoder_name_or_path`, resolved as `model_path` is (None: the base model's)."""
        return self.local_or_hub(self.pretrained_text_encoder_name_or_path)

    @property
    def tokenizer_path(self) -> str | None:
        """`pretrained_tokenizer_name_or_path`, resolved as `model_path` is (None: the base model's)."""
        return self.local_or_hub(self.pretrained_tokenizer_name_or_path)

    def local_or_hub(self, path: str | None) -> str | None:
        """A folder relative to the project root made absolute when it exists there; hub ids unchanged."""
        if path and self._project_root is not None and not Path(path).is_absolute() \
                and (self._project_root / path).is_dir():
            return str(self._project_root / path)
        return path


class PrepareParams(DatasetOptions):
    """Scan the datasets' folders, pair captions and references, assign aspect buckets, report every skipped file.

    One dataset: `instance_data_dir` plus the per-dataset keys (crop, resolution, caption_strategy, ...) right here.
    Several: `datasets`, a list in the seed's multidatabackend.json form; the keys here are then their defaults.
    """

    # The folder DVC watches for this stage (dvc.yaml: deps ${prepare.data_root}); every dataset must be inside it.
    data_root: str = "data"
    instance_data_dir: str | None = None
    datasets: list[DatasetConfig] = []
    image_extensions: list[str] = [".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"]

    @model_validator(mode="after")
    def _datasets_agree(self):
        check_datasets(self)
        apply_dataset_defaults(self)
        return self


class EncodeTextParams(Section):
    """Cache prompt embeddings of every caption, every validation prompt and the empty prompt."""

    max_sequence_length: int = Field(512, ge=1)
    text_encoder_out_layers: list[int] | None = None  # None: the flavour's stacked layers
    text_encoder_batch_size: int = Field(8, ge=1)  # prompts per text-encoder forward
    write_batch_size: int = Field(64, ge=1)  # embeddings per cache shard (a killed run loses at most one shard's)
    cache_dtype: Literal["bf16", "fp32"] = "bf16"
    # Weights of the text encoder: fp32 / bf16 / fp16, or int8-quanto / int4-quanto (optimum-quanto).
    # None: model.base_model_default_dtype.
    text_encoder_1_precision: Literal["fp32", "bf16", "fp16", "int8-quanto", "int4-quanto"] | None = None
    # Load and run only the layers up to the deepest stacked one (outputs are equal; ~25% less memory and time).
    truncate_text_encoder: bool = True
    # Group offload of the text encoder (its layers copied to the accelerator one at a time): FLUX.2 dev's 24B
    # Mistral encoder then fits small GPUs, at the cost of transfer time.
    group_offload_text_encoder: bool = False


class EncodeLatentsParams(Section):
    """Cache normalised, 2x2-patchified VAE latents of every accepted image, each at its aspect bucket's size (the
    bucket and crop are decided by prepare from the dataset's resolution and crop keys)."""

    vae_batch_size: int = Field(4, ge=1)  # images per VAE forward (one bucket per forward)
    write_batch_size: int = Field(64, ge=1)  # latents per cache shard (a killed run loses at most one shard's)
    cache_dtype: Literal["bf16", "fp32"] = "bf16"
    group_offload_vae: bool = False  # the VAE's layers copied to the accelerator as they run


class TreadRoute(Section):
    """One TREAD route: `selection_ratio` of the image tokens skip blocks start_layer_idx..end_layer_idx."""

    selection_ratio: float = Field(ge=0.0, lt=1.0)
    start_layer_idx: int
    end_layer_idx: int


class TreadConfig(Section):
    """The seed's `tread_config`: {"routes": [{"selection_ratio": 0.5, "start_layer_idx": 2, "end_layer_idx": -2}]}."""

    routes: list[TreadRoute] = Field(min_length=1)


class LycorisConfig(Section):
    """LoKr's Kronecker factorisation (train.lora_type lokr), under SimpleTuner's `lycoris_config` names. Its
    linear_dim / linear_alpha are train.lora_rank / lora_alpha here; its algo is train.lora_type."""

    # The left factor's size: w1 is (f, f') with f dividing out / in features where it can (peft's
    # decompose_factor); -1: the most square factorisation.
    factor: int = -1
    decompose_both: bool = False  # w1 low-rank too (w1_a @ w1_b), not only w2
    # w2 a full matrix whatever lora_rank says (LyCORIS's full_matrix): scale 1, lora_rank / lora_alpha unused
    full_matrix: bool = False

    @model_validator(mode="after")
    def _factor_is_valid(self):
        if self.factor == 0 or self.factor < -1:
            raise ValueError(f"train.lycoris_config.factor {self.factor}: a positive factor, or -1 (most square)")
        if self.full_matrix and self.decompose_both:
            raise ValueError("train.lycoris_config: full_matrix and decompose_both contradict each other (full "
                             "matrices vs low-rank factors); set one")
        return self


class TrainParams(Section):
    """LoRA training of the transformer on the cached embeddings and latents."""

    lora_rank: int = Field(16, ge=1)
    lora_alpha: float | None = None  # None: equal to lora_rank (scale 1.0)
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    # LoRA A's initialisation (B starts at 0 either way): default = Kaiming-uniform (peft), gaussian = N(0, 1/rank)
    lora_init_type: Literal["default", "gaussian"] = "gaussian"
    # diffusers-example: the default targets of diffusers' FLUX.2 LoRA training examples (double blocks' to_q/k/v/
    # to_out.0, single blocks' to_qkv_mlp_proj and to_out), to compare a run with that recipe
    flux_lora_target: Literal["all", "attention", "mlp", "tiny", "diffusers-example"] = "all"
    # Module-name patterns replacing the preset (SimpleTuner: peft_lora_target_modules), matched as peft matches
    # target_modules: a list of module paths or dotted suffixes ("attn.to_q", "single_transformer_blocks.3.attn.to_out"),
    # or one regular expression over the whole path. Checked against the flavour's real module names.
    lora_target_modules: list[str] | str | None = None
    # DoRA (peft's use_dora): each adapted weight is m * (W + BA) / ||W + BA|| per output row, with the magnitude m
    # (one number per output feature, starting at ||W||) trained beside A and B
    use_dora: bool = False
    # The adapter kind (peft's tuners): lora (B @ A), lokr (Kronecker product kron(w1, w2), LyCORIS's LoKr; its
    # factorisation in lycoris_config) or loha (Hadamard product (w1_a @ w1_b) * (w2_a @ w2_b), LyCORIS's LoHa).
    # lora_rank / lora_alpha are each kind's rank and alpha (scale alpha / rank; LoKr with only full factors: 1).
    lora_type: Literal["lora", "lokr", "loha"] = "lora"
    lycoris_config: LycorisConfig | None = None  # lokr only; None: the defaults (factor -1)
    learning_rate: float = Field(1e-4, gt=0)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    # constant / constant_with_warmup / linear / cosine / polynomial: diffusers' schedules (cosine: warmup, then half
    # a cosine to 0 at the last step; constant ignores the warmup). cosine_oscillating / sine: SimpleTuner's `cosine`
    # and `sine`, no warmup, periodic with half-period lr_warmup_steps, floor lr_end. See train/schedules.py.
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine", "polynomial", "cosine_oscillating",
                          "sine"] = "constant"
    lr_warmup_steps: int = Field(0, ge=0)
    lr_end: float = Field(1e-7, ge=0)  # polynomial: the final rate; cosine_oscillating / sine: the lowest rate
    lr_power: float = Field(1.0, gt=0)  # polynomial: the decay's exponent (1.0: linear)
    max_train_steps: int = Field(1000, ge=0)  # 0: num_train_epochs decides the length
    # Passes over the dataset (every image x its repeats); used when max_train_steps is 0.
    num_train_epochs: int | None = Field(None, ge=1)
    train_batch_size: int = Field(1, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)  # micro-batches per optimizer step
    use_8bit_adam: bool = False  # bitsandbytes' AdamW8bit: the older name of optimizer: adamw8bit
    # adamw (torch), adamw8bit (bitsandbytes), adamw_bf16 / lion / stableadamw (torch-optimi), prodigy (prodigyopt):
    # train/optimizers.py. All read learning_rate, adam_beta1/2, adam_weight_decay (and adam_epsilon, not lion).
    optimizer: Literal["adamw", "adamw8bit", "adamw_bf16", "lion", "stableadamw", "prodigy"] = "adamw"
    max_grad_norm: float = Field(1.0, ge=0)  # 0 disables clipping
    # norm: gradients scaled so that their total L2 norm is at most max_grad_norm; value: each gradient element
    # clamped to [-max_grad_norm, max_grad_norm] (SimpleTuner's default).
    grad_clip_method: Literal["norm", "value"] = "norm"
    mixed_precision: Literal["bf16", "fp16", "no"] = "bf16"
    gradient_checkpointing: bool = True
    # Checkpoint only the first N blocks (double blocks first, then single); null: all of them. Fewer checkpointed
    # blocks recompute less and keep more activations.
    gradient_checkpointing_blocks: int | None = Field(None, ge=0)
    # Memory-budget mode: checkpoint only as many blocks as the planner predicts are needed for the run's peak to
    # fit this many GiB of accelerator memory (overrides gradient_checkpointing and gradient_checkpointing_blocks).
    vram_budget_gib: float | None = Field(None, gt=0)
    # Regional torch.compile: each transformer block is compiled once per block type (its checkpointing, when on,
    # inside the compiled region). compile_backend: torch.compile's backend (inductor; aot_eager for debugging).
    compile_transformer: bool = False
    compile_backend: str = "inductor"
    seed: int = 42
    # Flow-matching timestep sampling: sigma ~ logit-normal(mean, std), then the shift s*sigma/(1+(s-1)*sigma).
    weighting_scheme: Literal["logit_normal", "uniform", "mode"] = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    # A number: the static shift above. auto: FLUX.2's resolution-dependent shift at inference (diffusers'
    # compute_empirical_mu of the batch's image tokens and timestep_shift_inference_steps; train/timesteps.py).
    timestep_shift: Annotated[float, Field(gt=0)] | Literal["auto"] = 3.0
    timestep_shift_inference_steps: int = Field(50, ge=1)  # auto: the num_steps of compute_empirical_mu
    # Loss weighting per sample: none (plain MSE), or diffusers' compute_loss_weighting_for_sd3 sigma_sqrt / cosmap.
    loss_weighting: Literal["none", "sigma_sqrt", "cosmap"] = "none"
    # Weights of the frozen transformer's blocks: no_change (base_model_default_dtype), optimum-quanto int8/int4,
    # or torchao float8 (GPUs with compute capability 8.9+: Ada, Hopper, Blackwell).
    base_model_precision: Literal["no_change", "int8-quanto", "int4-quanto", "fp8-torchao"] = "no_change"
    quantize_via: Literal["cpu", "accelerator"] = "accelerator"  # cpu: full weights never occupy the GPU
    # Group offload of the frozen transformer (diffusers hooks): its weights live in CPU memory and each group of
    # blocks is copied to the accelerator just before it runs. The LoRA weights always stay on the accelerator.
    enable_group_offload: bool = False
    group_offload_type: Literal["block_level", "leaf_level"] = "block_level"
    group_offload_blocks_per_group: int = Field(1, ge=1)  # block_level: blocks moved together
    group_offload_use_stream: bool = False  # CUDA: prefetch the next group on a side stream (overlaps copy/compute)
    # Load (and quantize) models on the CPU and move each to the accelerator only once it is ready, so loading never
    # holds two copies of weights on the accelerator.
    offload_during_startup: bool = False
    # TREAD token routing (seed: tread_config.routes). selection_ratio is the share of image tokens that SKIP the
    # span start_layer_idx..end_layer_idx (double blocks first, then single; negative = from the end).
    tread_config: TreadConfig | None = None
    # Edit training with several conditioning folders: combined = all of a sample's references at once;
    # random = one reference folder drawn per sample and step.
    conditioning_multidataset_sampling: Literal["combined", "random"] = "combined"
    # Share of samples trained with the empty prompt, so the base model's CFG keeps working with the LoRA.
    caption_dropout_probability: float = Field(0.0, ge=0.0, le=1.0)
    # dev only: the distilled-guidance value fed to the guidance embedder while training.
    flux_guidance_mode: Literal["constant", "random-range"] = "constant"
    flux_guidance_value: float = 1.0
    flux_guidance_min: float = 1.0
    flux_guidance_max: float = 5.0
    checkpointing_steps: int = Field(250, ge=1)
    checkpoints_total_limit: int | None = Field(3, ge=1)
    resume_from_checkpoint: Literal["latest"] | None = "latest"
    log_every_n_steps: int = Field(1, ge=1)
    # Which LoRA the stage writes: the last step's, or the one whose evaluation loss (validate.eval_*) was lowest;
    # that step's checkpoint is kept whatever checkpoints_total_limit says.
    checkpoint_selection: Literal["last", "best_eval"] = "last"
    # Stop once this many evaluations in a row failed to lower the best eval loss by more than min_delta.
    early_stopping_patience: int | None = Field(None, ge=1)
    early_stopping_min_delta: float = Field(0.0, ge=0.0)
    # EMA of the adapter weights (train/ema.py, SimpleTuner's names): diffusers' EMAModel, updated every
    # ema_update_interval optimizer steps. ema_export: which weights the LoRA file, the eval loss and validation use.
    use_ema: bool = False
    ema_decay: float = Field(0.995, gt=0.0, lt=1.0)
    ema_update_interval: int = Field(1, ge=1)
    ema_export: Literal["ema", "raw"] = "ema"
    # Scheduled sampling (rollout; train/rollout.py, SimpleTuner's names): with probability p a sample's input is the
    # model's own k Euler steps (k uniform in 0..max_step_offset, steps of 1/1000 of sigma) from a noisier point.
    # Off while max_step_offset is 0. p: scheduled_sampling_probability, or with ramp_steps > 0 a linear ramp from
    # prob_start to prob_end over that many steps. Rollouts take Euler steps (SimpleTuner's scheduled_sampling_sampler
    # euler; its unipc / dpm / rk4 are not implemented).
    scheduled_sampling_max_step_offset: int = Field(0, ge=0)
    scheduled_sampling_probability: float = Field(0.0, ge=0.0, le=1.0)
    scheduled_sampling_ramp_steps: int = Field(0, ge=0)
    scheduled_sampling_prob_start: float = Field(0.0, ge=0.0, le=1.0)
    scheduled_sampling_prob_end: float = Field(0.5, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _one_training_length(self):
        if self.num_train_epochs is not None and self.max_train_steps and "max_train_steps" in self.model_fields_set:
            raise ValueError("train: set either max_train_steps or num_train_epochs, not both (max_train_steps: 0 "
                             "trains by epochs)")
        if self.num_train_epochs is None and self.max_train_steps == 0:
            raise ValueError("train.max_train_steps is 0: set num_train_epochs, or a number of steps")
        return self

    @model_validator(mode="after")
    def _one_target_choice(self):
        # lora_target_modules replaces the preset (as SimpleTuner's peft_lora_target_modules does); another preset
        # than the default beside it is a contradiction
        if self.lora_target_modules is not None and self.flux_lora_target != "all":
            raise ValueError(f"train: flux_lora_target {self.flux_lora_target!r} and lora_target_modules are both "
                             "set; lora_target_modules replaces the preset: remove one")
        return self

    @model_validator(mode="after")
    def _dora_is_supported(self):
        if self.use_dora and self.base_model_precision != "no_change":
            raise ValueError(f"train.use_dora with base_model_precision {self.base_model_precision}: peft's DoRA "
                             "does not support quanto weights (SimpleTuner switches it off there too) and is not "
                             "tested on torchao float8 here; train DoRA on an unquantized base (no_change) or set "
                             "use_dora: false")
        if self.use_dora and self.enable_group_offload:
            raise ValueError("train.use_dora with enable_group_offload is not supported (not tested: DoRA reads the "
                             "offloaded base weights in every step); switch one off")
        return self

    @model_validator(mode="after")
    def _one_optimizer(self):
        if self.use_8bit_adam and self.optimizer not in ("adamw", "adamw8bit"):
            raise ValueError(f"train: use_8bit_adam (AdamW8bit) and optimizer {self.optimizer!r} are both set: "
                             "remove use_8bit_adam (optimizer: adamw8bit is its name now)")
        return self

    @model_validator(mode="after")
    def _adapter_kind_is_consistent(self):
        kind = self.lora_type
        if kind == "lora":
            if self.lycoris_config is not None:
                raise ValueError("train.lycoris_config is set but train.lora_type is lora: it configures LoKr; set "
                                 "lora_type: lokr or remove it")
            return self
        if self.use_dora:
            raise ValueError(f"train.use_dora with lora_type {kind}: DoRA is a LoRA option (peft has no DoRA "
                             f"{kind}); set lora_type: lora or use_dora: false")
        if self.lycoris_config is not None and kind != "lokr":
            raise ValueError(f"train.lycoris_config configures LoKr's factorisation; lora_type {kind} has none: "
                             "remove it")
        if self.lora_dropout:
            raise ValueError(f"train.lora_dropout with lora_type {kind}: peft's {kind} has no input dropout "
                             "(LyCORIS's rank/module dropout is another thing); set lora_dropout: 0")
        if "lora_init_type" in self.model_fields_set:
            raise ValueError(f"train.lora_init_type with lora_type {kind}: it picks LoRA's A initialisation; "
                             f"{kind} starts from peft's own (the second factor 0, so the adapter adds nothing at "
                             "step 0): remove it")
        return self

    @model_validator(mode="after")
    def _schedule_is_complete(self):
        if self.lr_scheduler in ("cosine_oscillating", "sine") and self.lr_warmup_steps < 1:
            raise ValueError(f"train.lr_scheduler {self.lr_scheduler}: set lr_warmup_steps >= 1, its half-period in "
                             "steps (SimpleTuner's meaning of that key for this schedule)")
        if self.lr_scheduler == "polynomial" and self.lr_end >= self.learning_rate:
            raise ValueError(f"train.lr_end ({self.lr_end}) must be below train.learning_rate ({self.learning_rate}) "
                             "for lr_scheduler polynomial")
        return self


class ValidateParams(Section):
    """Images from the pipeline with the trained LoRA loaded, beside the base model's, for fixed seeds."""

    user_prompt_library: str = "user_prompt_library.json"
    validation_subject: str = ""  # replaces `<subject>` in library prompts
    validation_resolution: str = "1024x1024"  # "WxH" or a comma-separated list of them
    validation_num_inference_steps: int = Field(20, ge=1)
    validation_guidance: float = 4.0  # dev: distilled guidance; klein base: true CFG scale
    validation_seed: int = 42  # the same seed for every prompt, step and run: images are comparable
    validation_lora_scale: float = 1.0
    # Group offload of the validation pipeline (transformer and VAE): for bases that fit the GPU only offloaded
    enable_group_offload: bool = False
    # Validate during training every N steps (grid logged to MLflow at that step). null or 0: only the validate
    # stage, which renders the final LoRA after training; the loop never renders the last step itself.
    validation_step_interval: int | None = Field(None, ge=0)
    # Evaluation loss while training (train/evaluation.py): at step 0, every eval_every_n_steps steps and at the last
    # step, the flow-matching loss of a fixed eval set at each of eval_sigmas with fixed noise (seeded by eval_seed
    # and each image's key). 0: off.
    eval_every_n_steps: int = Field(100, ge=0)
    # Share of the prepared images held out for evaluation and never trained on, chosen by a hash of each image's
    # key (an image stays on its side when others are added). 0: a fixed sample of the training images is scored.
    eval_split: float = Field(0.0, ge=0.0, lt=1.0)
    eval_max_samples: int = Field(8, ge=1)  # at most this many eval images (those with the lowest key hash)
    eval_sigmas: list[float] = Field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9], min_length=1)
    eval_seed: int = 0

    @field_validator("eval_sigmas")
    @classmethod
    def _sigmas_in_range(cls, value: list[float]) -> list[float]:
        if any(not 0.0 < s <= 1.0 for s in value) or len(set(value)) != len(value):
            raise ValueError(f"validate.eval_sigmas {value}: each sigma must be in (0, 1], without repeats")
        return value

    @property
    def resolutions(self) -> list[tuple[int, int]]:
        """Parsed `validation_resolution` as (width, height) pairs, each a multiple of 16."""
        return parse_resolutions(self.validation_resolution)

    @field_validator("validation_resolution")
    @classmethod
    def _resolutions_parse(cls, value: str) -> str:
        # checked here, not first in the validate stage after hours of training
        parse_resolutions(value)
        return value


class PublishParams(Section):
    """Where the LoRA, its model card and samples go after training: a folder, S3, the Hub, the MLflow registry."""

    s3_uri: str | None = None  # s3://bucket/prefix ; files go under <prefix>/<run-name>/
    s3_endpoint_url: str | None = None  # MinIO and other S3-compatible stores
    # Files at least this large go up in parts of s3_multipart_chunksize_mb (S3's minimum part is 5 MiB).
    s3_multipart_threshold_mb: float = Field(64, gt=0)
    s3_multipart_chunksize_mb: float = Field(64, ge=5)
    s3_max_attempts: int = Field(8, ge=1)  # per request, exponential backoff with jitter (botocore standard mode)
    hub_repo_id: str | None = None  # "user/name" on the Hugging Face Hub; the token comes from HF_TOKEN / login
    hub_private: bool = True  # only used when the repo is created
    # Each published LoRA becomes a version of this MLflow registered model (alias `candidate`); null: no registry.
    registered_model_name: str | None = "flux2-lora"
    # The words that call up the LoRA, for the model card and the published files' metadata (publish only).
    trigger_phrase: str = ""

    @field_validator("s3_uri")
    @classmethod
    def _s3_folder_uri(cls, value: str | None) -> str | None:
        if value is None:
            return value
        from urllib.parse import urlparse

        parsed = urlparse(value)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise ValueError(f"{value!r} is not of the form s3://bucket/prefix (e.g. s3://my-bucket/loras)")
        if not parsed.path.strip("/"):
            # publishing removes objects of the folder it does not publish: never the whole bucket
            raise ValueError(f"{value!r} is a bucket's root; publish into a folder of it: s3://{parsed.netloc}/loras")
        return value

    @field_validator("s3_endpoint_url")
    @classmethod
    def _endpoint_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError(f"{value!r} is not an http:// or https:// URL (MinIO: http://localhost:9000)")
        return value

    @field_validator("hub_repo_id")
    @classmethod
    def _hub_repo_id(cls, value: str | None) -> str | None:
        if value is None:
            return value
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(value)
        except HFValidationError as e:
            raise ValueError(f"{value!r} is not a Hub repo id (user/name): {e}") from None
        return value


class TrackingParams(Section):
    experiment_name: str = "flux2-lora"
    # None: $MLFLOW_TRACKING_URI, else sqlite:///<project root>/mlflow.db
    tracking_uri: str | None = None
    run_name: str | None = None


class RuntimeParams(Section):
    """How the stages are started and observed, never what they compute: no DVC stage depends on this section, so
    editing it re-runs nothing."""

    # Processes (GPUs of this machine) for the train stage. Above 1, the Prefect train task starts the stage with
    # `accelerate launch --num_processes N`; how the work is split is the train loop's (DDP) business.
    num_processes: int = Field(1, ge=1)
    # accelerate config for that launch, relative to the project; null: `--multi_gpu` with accelerate's defaults.
    accelerate_config: str | None = "infra/accelerate/multi-gpu.yaml"
    # MLflow system metrics (CPU, memory, disk, network; GPUs when pynvml is installed) on training runs.
    # null: on when psutil is installed, unless MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING decides.
    system_metrics: bool | None = None
    # What starts the train stage. local: this process, or `accelerate launch` when num_processes > 1 (as before);
    # accelerate: always `accelerate launch` (also for one process, e.g. to apply accelerate_config); ray: a Ray Train
    # job (TorchTrainer, num_processes workers, accelerate inside each) on the cluster at ray_address (the extra
    # flux2lora[ray]).
    engine: Literal["local", "accelerate", "ray"] = "local"
    # engine ray: the cluster, e.g. "127.0.0.1:6379" or "ray://head:10001"; null: RAY_ADDRESS, else a local cluster.
    # A Ray Jobs API URL ("http://head:8265", the dashboard's address) submits the train stage as a Ray job that runs
    # `flux2lora stage train` in the project folder on the cluster, its output streamed here (flux2lora.ray_jobs).
    ray_address: str | None = None
    # engine ray with a Jobs API address: the project folder's path on the cluster's nodes (a shared volume mounted
    # elsewhere there); null: the same path as here.
    ray_project_dir: str | None = None
    # engine ray: torch.distributed's rendezvous address; null: Ray's choice (the rank-0 worker's node IP, found by
    # a route lookup that picks the default interface); a loopback address keeps a one-machine cluster on lo.
    ray_master_addr: str | None = None
    # engine ray: whole-job restarts after a worker dies (ray.train.FailureConfig); each resumes from the newest
    # checkpoint of the run (train.checkpointing_steps), so the LoRA is the uninterrupted run's.
    ray_max_failures: int = Field(0, ge=-1)
    # engine ray: where the job's data lives for every node (flux2lora.shared_storage): a folder every node mounts
    # (relative: to the project) or s3://bucket/prefix (endpoint from AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL,
    # credentials from each node's own AWS chain). The driver uploads train's caches there, workers train from a
    # node-local copy and keep checkpoints under <storage>/checkpoints, the LoRA and train files come back into the
    # project; Ray Train's run storage is <storage>/ray_runs. null: the project folder (every node must see it;
    # Ray's run storage is <project>/.ray_runs).
    storage: str | None = None

    @field_validator("storage")
    @classmethod
    def _storage_location(cls, value: str | None) -> str | None:
        if value is None:
            return value
        if "://" in value and not value.startswith("s3://"):
            raise ValueError(f"runtime.storage {value!r}: a folder every node mounts or s3://bucket/prefix")
        if value.startswith("s3://"):
            bucket = value[len("s3://"):].split("/", 1)[0]
            if "@" in bucket or ":" in bucket:
                raise ValueError("runtime.storage: credentials do not belong in the URI (it is stored in params and "
                                 "MLflow); give each node its AWS credentials (environment, ~/.aws, instance role)")
            if not bucket:
                raise ValueError(f"runtime.storage {value!r}: no bucket; write s3://bucket/prefix")
        return value

    def log_system_metrics(self) -> bool | None:
        """The value for `mlflow.start_run(log_system_metrics=...)`; None leaves it to MLflow's environment variable."""
        if self.system_metrics is not None:
            return self.system_metrics
        if os.environ.get("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING"):
            return None
        import importlib.util

        return importlib.util.find_spec("psutil") is not None


class Params(Section):
    """The whole of `params.yaml`."""

    output_dir: str = "outputs"
    model: ModelParams = ModelParams()
    prepare: PrepareParams = PrepareParams()
    encode_text: EncodeTextParams = EncodeTextParams()
    encode_latents: EncodeLatentsParams = EncodeLatentsParams()
    train: TrainParams = TrainParams()
    validate_: ValidateParams = Field(ValidateParams(), alias="validate")
    publish: PublishParams = PublishParams()
    tracking: TrackingParams = TrackingParams()
    runtime: RuntimeParams = RuntimeParams()

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @model_validator(mode="after")
    def _text_embeds_backend(self):
        # The seed sets the text cache's write_batch_size on its `dataset_type: text_embeds` backend; encode-text
        # reads only its own section, so the value is carried over here, once, at load time.
        size = text_embeds_write_batch_size(self.prepare)
        if size is not None and size != self.encode_text.write_batch_size:
            if "write_batch_size" in self.encode_text.model_fields_set:
                raise ValueError(f"encode_text.write_batch_size={self.encode_text.write_batch_size} disagrees with "
                                 f"write_batch_size={size} of the text_embeds entry in prepare.datasets; keep one")
            self.encode_text.write_batch_size = size
        return self

    @model_validator(mode="after")
    def _targets_exist(self):
        # against the flavour's real module names (its transformer built on the meta device: no weights needed)
        if self.train.lora_target_modules is not None:
            from .train.lora import flavour_modules, resolve_target_patterns

            resolve_target_patterns(flavour_modules(self.model.model_flavour), self.train.lora_target_modules,
                                    f"{self.model.model_flavour}'s transformer")
        return self

    @model_validator(mode="after")
    def _selection_needs_eval(self):
        cfg = self.train
        if (cfg.checkpoint_selection == "best_eval" or cfg.early_stopping_patience) and \
                not self.validate_.eval_every_n_steps:
            raise ValueError("train.checkpoint_selection: best_eval and train.early_stopping_patience need the "
                             "evaluation loss: set validate.eval_every_n_steps > 0")
        return self

    @model_validator(mode="after")
    def _one_eval_set_source(self):
        # the eval set comes from one place: two would make the curve's images depend on both, and silently
        # take images out of training twice
        evals = [d.id for d in self.prepare.datasets if d.dataset_type == "eval" and not d.disabled]
        if evals and self.validate_.eval_split > 0:
            raise ValueError(f"validate.eval_split={self.validate_.eval_split} and prepare.datasets {evals} "
                             "(dataset_type: eval) both choose the evaluation loss's images: set "
                             "validate.eval_split to 0 to score the eval dataset(s), or drop their dataset_type: eval")
        return self

    @model_validator(mode="after")
    def _outputs_outside_data_root(self):
        # prepare refuses this too, but only once it runs; relative paths (the usual case) are checked here already,
        # absolute ones against each other (a mix needs the project folder, which prepare has)
        data_root, output_dir = Path(os.path.normpath(self.prepare.data_root)), Path(os.path.normpath(self.output_dir))
        if data_root.is_absolute() == output_dir.is_absolute() and \
                (output_dir == data_root or data_root in output_dir.parents or str(data_root) == "."):
            raise ValueError(f"prepare.data_root {self.prepare.data_root!r} contains output_dir {self.output_dir!r}: "
                             "DVC would see the pipeline's own outputs as prepare's input; keep output_dir outside "
                             "data_root (e.g. data_root: data, output_dir: outputs)")
        return self

    def flat(self) -> dict[str, Any]:
        """All params as `section.key` -> value, for MLflow."""
        return flatten(self.model_dump(by_alias=True, mode="json"))


def parse_resolutions(text: str) -> list[tuple[int, int]]:
    """`"1024x1024,768x1344"` -> [(1024, 1024), (768, 1344)]; a bare `"512"` means 512x512."""
    out = []
    for part in str(text).split(","):
        part = part.strip().lower()
        if not part:
            continue
        w, _, h = part.partition("x")
        try:
            width, height = int(w), int(h or w)
        except ValueError:
            raise ValueError(f"validation_resolution: {part!r} is not WIDTHxHEIGHT (e.g. 1024x1024)") from None
        if width % 16 or height % 16:
            raise ValueError(f"validation_resolution: {part!r} must be multiples of 16")
        out.append((width, height))
    if not out:
        raise ValueError("validation_resolution is empty")
    return out


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            # lists of sections (prepare.datasets): one param per key, not one long string MLflow may refuse
            for i, item in enumerate(value):
                out.update(flatten(item, f"{name}.{i}."))
        else:
            out[name] = value
    return out


class ParamsError(UserError, ValueError):
    """params.yaml is not valid; the message names the file, the key and what to do."""


def _valid_keys(model: type[BaseModel]) -> list[str]:
    return [f.alias or name for name, f in model.model_fields.items()]


def _model_in(annotation) -> type[BaseModel] | None:
    """The pydantic model inside an annotation: `X`, `list[X]`, `X | None`."""
    import typing

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _section_model(loc: tuple) -> type[BaseModel]:
    model: type[BaseModel] = Params
    for part in loc[:-1]:  # list indices (prepare.datasets.0.crop) match no field and are passed over
        for name, f in model.model_fields.items():
            if part in (name, f.alias):
                model = _model_in(f.annotation) or model
                break
    return model


# Keys that moved: the error says where they went instead of only suggesting a near name.
MOVED_KEYS = {
    "encode_latents.resolution": "prepare.resolution (with resolution_type, crop, crop_aspect: the training size is a "
                                 "property of each dataset, as in the seed's multidatabackend.json)",
    "runtime.ray_storage": "runtime.storage (Ray's run storage is <storage>/ray_runs; the caches and checkpoints "
                           "live there too)",
}


# The seed's dataset keys that would change nothing here, by name (wherever they appear): refused with the reason
# rather than accepted silently. `flux2lora import-simpletuner` reports them as having no effect and leaves them out.
REFUSED_KEYS = {
    "maximum_image_size": "flux2lora resizes every image to cover its aspect bucket before cropping, so there is "
                          "nothing to downsample first; set the training size with resolution / resolution_type",
    "metadata_backend": "image sizes are always read from the images; captions come from caption_strategy "
                        "(parquet for a metadata table)",
    "cache_dir_vae": "latents live in one content-addressed store, output_dir/latents (a DVC output)",
    "cache_dir": "prompt embeddings live in one content-addressed store, output_dir/text_embeds (a DVC output)",
    "width_column": "image sizes are always read from the images themselves (each image is validated anyway)",
    "height_column": "image sizes are always read from the images themselves (each image is validated anyway)",
}


_URL_CREDENTIALS = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s'\"]+@")


def redact_url_credentials(text: str) -> str:
    """`text` with the user:password part of every URL in it replaced by ***: a refused value is echoed back in
    messages, which reach logs and Prefect's task log, and a URL may carry a key."""
    return _URL_CREDENTIALS.sub(r"\g<scheme>***@", text)


def _explain(error: ValidationError, source: str) -> str:
    lines = []
    for err in error.errors():
        loc = tuple(str(p) for p in err["loc"])
        where = ".".join(loc)
        if err["type"] == "extra_forbidden" and where in MOVED_KEYS:
            lines.append(f"unknown key {where!r}: it moved to {MOVED_KEYS[where]}")
        elif err["type"] == "extra_forbidden" and loc[-1] in REFUSED_KEYS:
            lines.append(f"{where!r} has no effect in flux2lora: {REFUSED_KEYS[loc[-1]]}; remove it")
        elif err["type"] == "extra_forbidden":
            valid = _valid_keys(_section_model(loc))
            close = difflib.get_close_matches(loc[-1], valid, n=1, cutoff=0.5)
            near = ".".join((*loc[:-1], close[0])) if close else None
            hint = f"; did you mean {near!r}?" if close else f"; valid keys here: {', '.join(valid)}"
            lines.append(f"unknown key {where!r}{hint}")
        else:
            lines.append(f"{where}: {err['msg']} (got {err.get('input')!r})" if where else err["msg"])
    return redact_url_credentials(f"{source}: invalid params:\n  " + "\n  ".join(lines))


def parse_params(raw: dict[str, Any] | None, source: str = PARAMS_FILE) -> Params:
    try:
        return Params.model_validate(raw or {})
    except ValidationError as e:
        raise ParamsError(_explain(e, source)) from None


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any] | None) -> dict[str, Any]:
    """Set dotted keys (`train.learning_rate`) in a raw params tree; returns a new tree."""
    import copy

    tree = copy.deepcopy(raw)
    for dotted, value in (overrides or {}).items():
        node = tree
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ParamsError(f"override {dotted!r}: {part!r} is not a section")
        node[leaf] = value
    return tree


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping: YAML parsers keep the last value silently, and DVC
    refuses the file, so the pipeline and this checker must agree."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *defaults` may be overridden by the keys beside it
            key = key_node.value
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one section (lines {seen[key] + 1} and "
                    f"{key_node.start_mark.line + 1}); keep one of them", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def read_raw_params(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"{path}: no such params file (run from the project root, or pass --params)")
    try:
        raw = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of sections at the top level")
    return raw


def load_params(path: str | Path = PARAMS_FILE, overrides: dict[str, Any] | None = None) -> Params:
    """Read and validate `params.yaml` (plus dotted-key overrides).

    A relative local model folder (`models/tiny-klein-4b`; also a separate text encoder's or tokenizer's) is loaded from the params file's folder
    (`ModelParams.model_path`), so stages behave the same whatever the working directory, while the params keep the
    path as written (nothing stored depends on where the project lies).
    """
    params = parse_params(apply_overrides(read_raw_params(path), overrides), source=str(path))
    params.model._project_root = project_root(path)
    return params


def project_root(params_path: str | Path = PARAMS_FILE) -> Path:
    """The folder holding params.yaml: relative paths in params are relative to it."""
    return Path(params_path).resolve().parent


def default_tracking_uri(root: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root / 'mlflow.db'}"
