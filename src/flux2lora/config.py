"""Typed `params.yaml`: one section per stage, shared `model` and `tracking` sections.

Keys keep the names of the seed trainer's options wherever one exists (`model_flavour`, `lora_rank`,
`learning_rate`, `validation_resolution`, ...), so its guide reads true for flux2lora. Unknown keys are errors that
name the key and suggest the closest valid one: a typo must never silently fall back to a default.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

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

    @field_validator("model_flavour")
    @classmethod
    def _known_flavour(cls, value: str) -> str:
        get_flavour(value)
        return value

    @property
    def flavour(self):
        return get_flavour(self.model_flavour)

    @property
    def model_path(self) -> str:
        return self.pretrained_model_name_or_path or self.flavour.default_repo


class PrepareParams(Section):
    """Scan a local image folder; captions come from files beside the images."""

    instance_data_dir: str = "data/images"
    caption_extension: str = ".txt"
    minimum_image_size: int = Field(64, ge=1)  # shorter side, pixels; smaller images are skipped with a reason
    image_extensions: list[str] = [".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"]


class EncodeTextParams(Section):
    """Cache prompt embeddings of every caption, every validation prompt and the empty prompt."""

    max_sequence_length: int = Field(512, ge=1)
    text_encoder_out_layers: list[int] | None = None  # None: the flavour's stacked layers
    write_batch_size: int = Field(8, ge=1)
    cache_dtype: Literal["bf16", "fp32"] = "bf16"
    # Weights of the text encoder: fp32 / bf16 / fp16, or int8-quanto / int4-quanto (optimum-quanto).
    # None: model.base_model_default_dtype.
    text_encoder_1_precision: Literal["fp32", "bf16", "fp16", "int8-quanto", "int4-quanto"] | None = None
    # Load and run only the layers up to the deepest stacked one (outputs are equal; ~25% less memory and time).
    truncate_text_encoder: bool = True


class EncodeLatentsParams(Section):
    """Cache normalised, 2x2-patchified VAE latents of every accepted image."""

    resolution: int = Field(1024, ge=16)  # side of the square training crop, pixels (multiple of 16)
    vae_batch_size: int = Field(4, ge=1)
    cache_dtype: Literal["bf16", "fp32"] = "bf16"

    @field_validator("resolution")
    @classmethod
    def _multiple_of_16(cls, value: int) -> int:
        if value % 16:
            raise ValueError(f"resolution must be a multiple of 16 (VAE /8 and 2x2 patches), got {value}")
        return value


class TrainParams(Section):
    """LoRA training of the transformer on the cached embeddings and latents."""

    lora_rank: int = Field(16, ge=1)
    lora_alpha: float | None = None  # None: equal to lora_rank (scale 1.0)
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    flux_lora_target: Literal["all", "attention", "mlp", "tiny"] = "all"
    learning_rate: float = Field(1e-4, gt=0)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine", "polynomial"] = "constant"
    lr_warmup_steps: int = Field(0, ge=0)
    max_train_steps: int = Field(1000, ge=1)
    train_batch_size: int = Field(1, ge=1)
    max_grad_norm: float = Field(1.0, ge=0)  # 0 disables clipping
    mixed_precision: Literal["bf16", "fp16", "no"] = "bf16"
    gradient_checkpointing: bool = True
    seed: int = 42
    # Flow-matching timestep sampling: sigma ~ logit-normal(mean, std), then the shift s*sigma/(1+(s-1)*sigma).
    weighting_scheme: Literal["logit_normal", "uniform", "mode"] = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    timestep_shift: float = Field(3.0, gt=0)
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


class ValidateParams(Section):
    """Images from the pipeline with the trained LoRA loaded, beside the base model's, for fixed seeds."""

    user_prompt_library: str = "user_prompt_library.json"
    validation_subject: str = ""  # replaces `<subject>` in library prompts (the trigger phrase)
    validation_resolution: str = "1024x1024"  # "WxH" or a comma-separated list of them
    validation_num_inference_steps: int = Field(20, ge=1)
    validation_guidance: float = 4.0  # dev: distilled guidance; klein base: true CFG scale
    validation_seed: int = 42
    validation_lora_scale: float = 1.0

    @property
    def resolutions(self) -> list[tuple[int, int]]:
        """Parsed `validation_resolution` as (width, height) pairs, each a multiple of 16."""
        return parse_resolutions(self.validation_resolution)


class PublishParams(Section):
    """Where the LoRA, its model card and samples go after training."""

    s3_uri: str | None = None  # s3://bucket/prefix ; files go under <prefix>/<run-name>/
    s3_endpoint_url: str | None = None  # MinIO and other S3-compatible stores
    trigger_phrase: str = ""


class TrackingParams(Section):
    experiment_name: str = "flux2-lora"
    # None: $MLFLOW_TRACKING_URI, else sqlite:///<project root>/mlflow.db
    tracking_uri: str | None = None
    run_name: str | None = None


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

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

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
        else:
            out[name] = value
    return out


class ParamsError(ValueError):
    """params.yaml is not valid; the message names the file, the key and what to do."""


def _valid_keys(model: type[BaseModel]) -> list[str]:
    return [f.alias or name for name, f in model.model_fields.items()]


def _section_model(loc: tuple) -> type[BaseModel]:
    model: type[BaseModel] = Params
    for part in loc[:-1]:
        for name, f in model.model_fields.items():
            if part in (name, f.alias):
                ann = f.annotation
                if isinstance(ann, type) and issubclass(ann, BaseModel):
                    model = ann
                break
    return model


def _explain(error: ValidationError, source: str) -> str:
    lines = []
    for err in error.errors():
        loc = tuple(str(p) for p in err["loc"])
        where = ".".join(loc)
        if err["type"] == "extra_forbidden":
            valid = _valid_keys(_section_model(loc))
            close = difflib.get_close_matches(loc[-1], valid, n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys here: {', '.join(valid)}"
            lines.append(f"unknown key {where!r}{hint}")
        else:
            lines.append(f"{where}: {err['msg']} (got {err.get('input')!r})")
    return f"{source}: invalid params:\n  " + "\n  ".join(lines)


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


def read_raw_params(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"{path}: no such params file (run from the project root, or pass --params)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of sections at the top level")
    return raw


def load_params(path: str | Path = PARAMS_FILE, overrides: dict[str, Any] | None = None) -> Params:
    """Read and validate `params.yaml` (plus dotted-key overrides).

    A relative local model folder (`models/tiny-klein-4b`) is made absolute against the params file's folder, so
    stages behave the same whatever the working directory; hub ids are left alone.
    """
    params = parse_params(apply_overrides(read_raw_params(path), overrides), source=str(path))
    model_path = params.model.pretrained_model_name_or_path
    if model_path and not Path(model_path).is_absolute() and (project_root(path) / model_path).is_dir():
        params.model.pretrained_model_name_or_path = str(project_root(path) / model_path)
    return params


def project_root(params_path: str | Path = PARAMS_FILE) -> Path:
    """The folder holding params.yaml: relative paths in params are relative to it."""
    return Path(params_path).resolve().parent


def default_tracking_uri(root: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root / 'mlflow.db'}"
