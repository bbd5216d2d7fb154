"""Import a SimpleTuner (the seed trainer) configuration: the imported params train the run SimpleTuner would have.

`import_simpletuner(DIR, params.yaml)` reads DIR/config.json (or config.toml; flat keys, `--` prefixes optional; the
web UI's saved form `{"_metadata": ..., "config": {...}}` too), the data backends (`data_backend_config`, else
DIR/multidatabackend.json, a list or the web UI's `{"datasets": [...]}`) and the validation prompts
(`user_prompt_library`, else DIR/user_prompt_library.json), and writes params.yaml.

`SEED_KEYS` and `BACKEND_KEYS` are the single source: per SimpleTuner key, its meaning there, its default there, and
what it becomes here. Semantics, not names: SimpleTuner's `cosine` is `cosine_oscillating` here, `constant` with a
warmup is `constant_with_warmup`, `hub_model_id` uploads only with `push_to_hub`, `checkpointing_steps` is the legacy
name of `checkpoint_step_interval`, a key the config leaves unset takes SimpleTuner's default (not ours). What was
learnt from SimpleTuner's code (read, never copied: AGPL-3.0) is written in each entry's meaning.

Every key lands in one list of the report: mapped (with SimpleTuner's meaning), defaulted (our key, the value it
took, why), refused (with the reason; the key's SimpleTuner default is used instead), or no effect (with the reason).
A dataset that cannot be brought over (not a local folder) stops the import; the previous project's datasets never
survive one (`prepare` is rebuilt from the backends). The result is validated exactly as `check-params` does before
anything is written. Sections the seed has no word on (publish's S3 and registry, tracking, runtime) keep their
values, as do the project's own wiring (KEEP_ON_IMPORT).
"""

from __future__ import annotations

import io
import json
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable

from pydantic import TypeAdapter, ValidationError

from .config import PARAMS_FILE, Params, ParamsError, parse_params, parse_resolutions
from .data.config import DatasetConfig

UNSET: Any = object()


class NoEffect(Exception):
    """The key's value changes nothing in flux2lora's run (the reason says why)."""


class Refused(Exception):
    """The key's value cannot be reproduced here (the reason says why and what is used instead)."""


class Stop(ParamsError):
    """The import cannot go on: what it would write would not train SimpleTuner's run."""


@dataclass(frozen=True)
class SeedKey:
    """One SimpleTuner key: what it means there, its default there, and how it maps.

    apply(value, config) -> {our section.key: value}, or raises NoEffect / Refused; `config` is the whole seed
    config (explicitly set keys only). `ours`: our values for SimpleTuner's default, used when the key is unset,
    refused or without effect (a function of the config where that default depends on other keys)."""

    meaning: str
    apply: Callable[[Any, dict], dict[str, Any]]
    st_default: Any = UNSET
    ours: dict[str, Any] | Callable[[dict], dict[str, Any]] = field(default_factory=dict)

    def defaults(self, config: dict) -> dict[str, Any]:
        return self.ours(config) if callable(self.ours) else self.ours


def to(target: str, meaning: str, default: Any = UNSET, convert: Callable[[Any, dict], Any] | None = None,
       ours: dict | None = None) -> SeedKey:
    """A key with a flux2lora equivalent `target`; SimpleTuner's `default` is written there when unset."""
    def apply(value, config):
        return {target: convert(value, config) if convert else value}
    if ours is None:
        ours = {} if default is UNSET else apply(default, {})
    return SeedKey(meaning, apply, default, ours)


def no_effect(meaning: str, reason: str, accept: tuple | None = None, refuse_reason: str | None = None,
              default: Any = UNSET) -> SeedKey:
    """A key whose value changes nothing here (any value, or only those in `accept`; others are refused)."""
    def apply(value, config):
        if accept is None or value in accept:
            raise NoEffect(reason)
        raise Refused(refuse_reason or f"only {', '.join(map(repr, accept))}: {reason}")
    return SeedKey(meaning, apply, default)


def refuse(meaning: str, reason: str, harmless: tuple = (False, None, 0, "none", "")) -> SeedKey:
    """A feature flux2lora does not have: refused, unless its value is the one that switches it off."""
    def apply(value, config):
        if value in harmless:
            raise NoEffect("off, as in flux2lora")
        raise Refused(reason)
    return SeedKey(meaning, apply)


# --------------------------------------------------------------------------------------------------------------
# Conversions that carry SimpleTuner's semantics


def _int(value, default=0) -> int:
    try:
        return int(float(value))
    except (TypeError, ValueError):
        return default


def _truthy(value) -> bool:
    """SimpleTuner's reading of a flag: true/yes/on/1 (any case), non-zero numbers."""
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def normalized_scheduler(config: dict) -> str:
    """SimpleTuner's lr_scheduler after its own normalisation (cli_utils.normalize_lr_scheduler_value):
    cosine_with_warmup is cosine; constant with lr_warmup_steps > 0 is constant_with_warmup."""
    name = str(config.get("lr_scheduler", "constant_with_warmup")).strip().lower()
    name = {"cosine_with_warmup": "cosine"}.get(name, name)
    if name == "constant" and _int(config.get("lr_warmup_steps")) > 0:
        name = "constant_with_warmup"
    return name


def _lr_scheduler(value, config):
    name, warmup = normalized_scheduler({**config, "lr_scheduler": value}), _int(config.get("lr_warmup_steps"))
    if name == "cosine":
        return {"train.lr_scheduler": "cosine_oscillating"}
    if name in ("sine", "cosine_with_restarts") and warmup < 1:
        raise Stop(f"lr_scheduler {name}: SimpleTuner refuses to start without lr_warmup_steps > 0 (its period); "
                   "set lr_warmup_steps")
    if name == "cosine_with_restarts":
        # its class computes T_cur = step % steps_per_epoch with steps_per_epoch left at -1: always 0, the base rate
        # (SimpleTuner's own log warns it "is currently misbehaving")
        return {"train.lr_scheduler": "constant"}
    if name in ("sine", "polynomial", "linear", "constant", "constant_with_warmup"):
        return {"train.lr_scheduler": name}
    raise Refused(f"{value!r} is not one of SimpleTuner's schedules (linear, sine, cosine, cosine_with_restarts, "
                  "polynomial, constant, constant_with_warmup)")


def _lr_warmup_steps(value, config):
    steps = _int(value)
    if normalized_scheduler(config) == "cosine" and steps <= 0:
        return {"train.lr_warmup_steps": 1000}  # its Cosine class replaces a non-positive period by 1000
    return {"train.lr_warmup_steps": steps}


def _max_train_steps(value, config):
    steps = _int(value)
    if steps > 0:
        return {"train.max_train_steps": steps, "train.num_train_epochs": None}
    if _int(config.get("num_train_epochs", 1)) <= 0:
        raise Stop("max_train_steps and num_train_epochs are both 0: SimpleTuner stops with 'You must specify either "
                   "--max_train_steps or --num_train_epochs with a value > 0'; set one")
    raise NoEffect("0: num_train_epochs decides the length, as in SimpleTuner")


def _num_train_epochs(value, config):
    epochs = value
    if _int(config.get("max_train_steps")) > 0:
        if not epochs:
            raise NoEffect("0: unused, max_train_steps decides the length (SimpleTuner's meaning of 0)")
        raise Refused("SimpleTuner's argument check stops when both max_train_steps and num_train_epochs are > 0 "
                      "('set --num_train_epochs to 0'); here max_train_steps decides")
    try:
        epochs = float(epochs)
    except (TypeError, ValueError):
        raise Refused("not a number") from None
    if epochs != int(epochs) or epochs < 1:
        raise Refused("flux2lora trains whole epochs (an integer >= 1)")
    return {"train.max_train_steps": 0, "train.num_train_epochs": int(epochs)}


def megapixel_resolution(value: float) -> int:
    """SimpleTuner's reading of a validation_resolution below 128 as megapixels (its cmd_args): int(value) == 1 is
    1024 px, else int(value) * 1000 floored to a multiple of 8 (so 1.5 is 1024 and 0.5 is 0)."""
    whole = int(value)
    return 1024 if whole == 1 else int(int(whole * 1e3) / 8) * 8


def _validation_resolution(value, config):
    text = str(value).strip().lower()
    try:
        number = float(text)
    except ValueError:
        number = None
    if number is not None and ("." in text or not isinstance(value, str) or text.isdigit()) and int(number) < 128:
        side = megapixel_resolution(number)
        if side < 16:
            raise Refused(f"{value!r} is megapixels to SimpleTuner, which turns it into {side} px; give WxH")
        text = str(side)
    parts = []
    for part in text.split(","):
        part = part.strip()
        parts.append(f"{part}x{part}" if part.isdigit() else part)  # a bare number: a square, as in SimpleTuner
    resolution = ",".join(parts)
    try:
        parse_resolutions(resolution)
    except ValueError as e:
        raise Refused(str(e)) from None
    return {"validate.validation_resolution": resolution}


def _flavour(config: dict) -> str:
    return str(config.get("model_flavour") or "klein-9b")


def _validation_guidance(value, config):
    real = config.get("validation_guidance_real")
    if _flavour(config).startswith("klein") and real not in (None, 1, 1.0):
        raise NoEffect("klein: SimpleTuner uses validation_guidance_real as the CFG scale when it is not 1.0")
    return {"validate.validation_guidance": value}


def _validation_guidance_real(value, config):
    if float(value) == 1.0:
        raise NoEffect("1.0: no true CFG beyond validation_guidance")
    if _flavour(config).startswith("klein"):
        return {"validate.validation_guidance": value}
    raise Refused("dev validates with distilled guidance only (validate.validation_guidance)")


def normalized_repo_id(repo: str) -> str:
    """A Hub repo id from what SimpleTuner accepts: an id, or a huggingface.co URL."""
    cleaned = str(repo).strip()
    cleaned = re.sub(r"^https?://[^/]+/", "", cleaned).split("?", 1)[0].split("#", 1)[0].lstrip("/")
    return cleaned.split("huggingface.co/", 1)[-1]


def _push_to_hub(value, config):
    if not _truthy(value):
        return {"publish.hub_repo_id": None}
    # its HubManager: repo = hub_model_id, else tracker_project_name
    repo = config.get("hub_model_id") or config.get("tracker_project_name") or "simpletuner"
    return {"publish.hub_repo_id": normalized_repo_id(repo)}


def _hub_model_id(value, config):
    if not _truthy(config.get("push_to_hub", False)):
        raise NoEffect("push_to_hub is false: SimpleTuner uploads nothing (hub_model_id then only names the output "
                       "folder)")
    return {"publish.hub_repo_id": normalized_repo_id(value)}


# SimpleTuner precision -> our nearest (None: refused). Ours: no_change, int8-quanto, int4-quanto, fp8-torchao.
BASE_PRECISIONS = {
    "no_change": "no_change", "int8-quanto": "int8-quanto", "int4-quanto": "int4-quanto",
    "fp8-torchao": "fp8-torchao",
    "int8-torchao": "int8-quanto", "int8dq-torchao": "int8-quanto", "int8-sdnq": "int8-quanto",
    "uint8-sdnq": "int8-quanto",
    "nf4-bnb": "int4-quanto", "int4-torchao": "int4-quanto", "int8dq-int4-torchao": "int4-quanto",
    "fp8-int4-torchao": "int4-quanto", "int4-sdnq": "int4-quanto", "uint4-sdnq": "int4-quanto",
    "fp8wo-torchao": "fp8-torchao", "fp8-quanto": "fp8-torchao", "fp8uz-quanto": "fp8-torchao",
    "fp8-native": "fp8-torchao", "fp8-sdnq": "fp8-torchao", "fp8-transformerengine": "fp8-torchao",
    "fp16-sdnq": "no_change", "int16-sdnq": "no_change", "uint16-sdnq": "no_change",
}
# Text encoder: ours fp32, bf16, fp16, int8-quanto, int4-quanto; None = the base dtype (SimpleTuner's no_change).
TEXT_PRECISIONS = {**{k: v for k, v in BASE_PRECISIONS.items() if v in ("int8-quanto", "int4-quanto")},
                   "no_change": None, "fp8-torchao": "int8-quanto", "fp8wo-torchao": "int8-quanto",
                   "fp8-quanto": "int8-quanto", "fp8uz-quanto": "int8-quanto", "fp8-native": "int8-quanto",
                   "fp8-sdnq": "int8-quanto", "fp16-sdnq": None, "int16-sdnq": None, "uint16-sdnq": None}


def _precision(target: str, table: dict):
    def apply(value, config):
        ours = table.get(str(value))
        if str(value) not in table:
            raise Refused(f"no near equivalent of {value!r} here (we have {sorted({str(v) for v in table.values()})})")
        if ours != value:
            config.setdefault("__notes__", []).append(
                f"{target}: SimpleTuner's {value} is trained as {ours or 'the base dtype'}, the nearest precision "
                "flux2lora has (same bits per weight where possible)")
        return {target: ours}
    return apply


# SimpleTuner's optimizer names (its OPTIONS.md list) -> ours (train/optimizers.py), and why where not the same.
OPTIMIZERS = {
    "adamw_bf16": ("adamw_bf16", "bf16 weights; here torch-optimi's Kahan summation where SimpleTuner rounds "
                   "stochastically"),
    "optimi-adamw": ("adamw", None), "adamw": ("adamw", None), "torch-adamw": ("adamw", None),
    "bnb-adamw": ("adamw", None), "bnb-adamw-paged": ("adamw", None),
    "bnb-adamw8bit": ("adamw8bit", None), "bnb-adamw8bit-paged": ("adamw8bit", None),
    "ao-adamw8bit": ("adamw8bit", "torchao's 8-bit AdamW is trained as bitsandbytes' AdamW8bit, the 8-bit AdamW "
                     "flux2lora has"),
    "optimi-lion": ("lion", None), "bnb-lion": ("lion", None), "bnb-lion-paged": ("lion", None),
    "bnb-lion8bit": ("lion", "bitsandbytes' 8-bit Lion is trained as torch-optimi's Lion (32-bit states)"),
    "bnb-lion8bit-paged": ("lion", "bitsandbytes' 8-bit Lion is trained as torch-optimi's Lion (32-bit states)"),
    "optimi-stableadamw": ("stableadamw", None),
    "prodigy": ("prodigy", None),
}


def _optimizer(value, config):
    name = str(value).strip().lower()
    if name not in OPTIMIZERS:
        raise Refused(f"{value} is not available here (flux2lora has adamw, adamw8bit, adamw_bf16, lion, "
                      "stableadamw, prodigy)")
    ours, note = OPTIMIZERS[name]
    if note:
        config.setdefault("__notes__", []).append(f"train.optimizer: SimpleTuner's {name} is {ours} here: {note}")
    return {"train.optimizer": ours, "train.use_8bit_adam": False}


def _seed(value, config):
    seed = _int(value, -2)
    if seed in (0, -1):
        raise Refused("0 and -1 mean a new random seed each run in SimpleTuner; flux2lora's runs are reproducible: "
                      "the seed is 42")
    return {"train.seed": seed}


def _resume(value, config):
    text = str(value).strip().lower()
    if text == "latest":
        return {"train.resume_from_checkpoint": "latest"}
    if text in ("none", "false", ""):
        return {"train.resume_from_checkpoint": None}
    raise Refused("resuming from a named checkpoint folder: flux2lora resumes its own latest matching checkpoint")


def _peft_target_modules(value, config):
    """SimpleTuner's peft_lora_target_modules: a list of module names, or that list as a JSON string."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise Refused("a path to a JSON file: put its list of module names in the config itself") from None
    if value in (None, [], ""):
        raise NoEffect("empty: SimpleTuner uses its target preset")
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise Refused("must be a list of module-name strings (as SimpleTuner requires)")
    return {"train.lora_target_modules": [v.strip() for v in value if v.strip()]}


def _use_dora(value, config):
    if _truthy(value) and not _dora_on(config):
        raise NoEffect("SimpleTuner switches DoRA off with a quanto base (peft's DoRA does not support it)")
    return {"train.use_dora": _truthy(value)}


def _dora_on(config: dict) -> bool:
    """Whether SimpleTuner trains DoRA: use_dora, unless a quanto base switches it off."""
    return _truthy(config.get("use_dora")) and "quanto" not in str(config.get("base_model_precision", ""))


LYCORIS_ALGOS = {"lokr": "lokr", "loha": "loha"}
# lycoris_config keys (SimpleTuner passes them to LyCORIS's create_lycoris) -> train.* / train.lycoris_config.*
LYCORIS_KEYS = {"linear_dim": "train.lora_rank", "linear_alpha": "train.lora_alpha",
                "factor": "train.lycoris_config.factor", "full_matrix": "train.lycoris_config.full_matrix",
                "decompose_both": "train.lycoris_config.decompose_both"}


def _lycoris(config: dict) -> bool:
    """Whether SimpleTuner trains a LyCORIS adapter (lora_type lycoris; its lycoris_config read by the import)."""
    return str(config.get("lora_type", "standard")).lower() == "lycoris"


def _lora_type(value, config):
    """standard: a peft LoRA, as here; lycoris: the algorithm and its options from the lycoris_config file."""
    if str(value).lower() == "standard":
        raise NoEffect("'standard': a PEFT LoRA, as in flux2lora")
    if not _lycoris(config):
        raise Stop(f"lora_type {value!r}: flux2lora trains standard LoRAs and LyCORIS's lokr / loha")
    lycoris = config.get("lycoris_config")
    if not isinstance(lycoris, dict):
        raise Stop("lora_type lycoris: the lycoris_config file (SimpleTuner's default config/lycoris_config.json) "
                   "was not found beside the config; copy it there")
    algo = str(lycoris.get("algo", "lokr")).lower()
    if algo not in LYCORIS_ALGOS:
        raise Stop(f"lycoris_config algo {algo!r}: flux2lora trains lokr and loha (peft's LoKr / LoHa); other "
                   "LyCORIS algorithms would train a different adapter")
    out = {"train.lora_type": LYCORIS_ALGOS[algo]}
    notes = config.setdefault("__notes__", [])
    for key, item in lycoris.items():
        if key == "algo":
            continue
        target = LYCORIS_KEYS.get(key)
        if target and target.startswith("train.lycoris_config.") and algo == "lokr":
            out.setdefault("train.lycoris_config", {})[target.rsplit(".", 1)[1]] = item
        elif target and not target.startswith("train.lycoris_config."):
            out[target] = item
        elif key == "multiplier" and float(item) == 1.0:
            continue
        else:
            notes.append(f"lycoris_config {key}={item!r}: no flux2lora equivalent, not imported (the targets come "
                         "from train.flux_lora_target / lora_target_modules)")
    return out


def _lycoris_config(value, config):
    if not _lycoris(config):
        raise NoEffect("SimpleTuner reads lycoris_config only with lora_type lycoris")
    raise NoEffect("read with lora_type lycoris (its algo and options are mapped there)")


def _standard_lora_only(entry: SeedKey) -> SeedKey:
    """A standard-LoRA option SimpleTuner ignores under lora_type lycoris (LyCORIS takes linear_dim /
    linear_alpha from lycoris_config and has no such dropout / init)."""
    def apply(value, config):
        if _lycoris(config):
            raise NoEffect("lora_type lycoris: SimpleTuner's LyCORIS adapter does not use it")
        return entry.apply(value, config)

    def ours(config):
        return {} if _lycoris(config) else entry.defaults(config)
    return SeedKey(entry.meaning, apply, entry.st_default, ours)


def _lora_init_type(value, config):
    if _dora_on(config) and value != "default":
        raise NoEffect("use_dora is set: SimpleTuner initialises DoRA's A as peft's default whatever this says")
    return {"train.lora_init_type": value}


def _flux_lora_target(value, config):
    if config.get("peft_lora_target_modules") not in (None, "", "None", []):
        raise NoEffect("peft_lora_target_modules is set and replaces the preset, as in SimpleTuner")
    return {"train.flux_lora_target": value}


def _checkpoint_interval(value, config):
    steps = _int(value)
    if steps <= 0:
        raise NoEffect("0: unset (SimpleTuner then uses checkpointing_steps)")
    return {"train.checkpointing_steps": steps}


def _legacy_checkpointing_steps(value, config):
    if _int(config.get("checkpoint_step_interval")) > 0:
        raise NoEffect("legacy alias: checkpoint_step_interval is set and wins, as in SimpleTuner")
    return _checkpoint_interval(value, config)


def _legacy_validation_steps(value, config):
    if config.get("validation_step_interval") not in (None, ""):
        raise NoEffect("legacy alias: validation_step_interval is set and wins, as in SimpleTuner")
    return {"validate.validation_step_interval": _int(value)}


def _legacy_total_limit(value, config):
    if config.get("checkpoints_total_limit") not in (None, ""):
        raise NoEffect("legacy alias: checkpoints_total_limit is set and wins")
    return {"train.checkpoints_total_limit": _int(value)}


def _only_instance_prompt(value, config):
    if not _truthy(value):
        raise NoEffect("false: captions come from caption_strategy")
    return {"prepare.caption_strategy": "instanceprompt"}


def _auto_shift(value, config):
    if not _truthy(value):
        raise NoEffect("false: the static flow_schedule_shift")
    shift = config.get("flow_schedule_shift")
    if shift is not None and float(shift) > 0:
        raise Stop("flow_schedule_auto_shift with flow_schedule_shift > 0: SimpleTuner refuses to start ('cannot be "
                   "combined with --flow_schedule_shift'); set flow_schedule_shift to 0 or drop auto_shift")
    config.setdefault("__notes__", []).append(
        "train.timestep_shift: auto is FLUX.2's own resolution-dependent shift at inference (diffusers' "
        "compute_empirical_mu of the image tokens); SimpleTuner's auto_shift computes mu with FLUX.1's linear "
        "calculate_shift (0.5 at 256 tokens to 1.15 at 4096), a smaller shift: the nearest flux2lora has")
    return {"train.timestep_shift": "auto"}


def _rollout_offset(value, config):
    offset = _int(value)
    if offset > 0 and str(config.get("scheduled_sampling_sampler", "unipc")).strip().lower() != "euler":
        config.setdefault("__notes__", []).append(
            "train.scheduled_sampling_sampler: SimpleTuner rolls out with unipc unless told otherwise; flux2lora's "
            "rollouts take Euler steps")
    return {"train.scheduled_sampling_max_step_offset": max(0, offset)}


def _rollout_sampler(value, config):
    if str(value).strip().lower() == "euler":
        raise NoEffect("euler: flux2lora's rollouts take Euler steps")
    if _int(config.get("scheduled_sampling_max_step_offset")) <= 0:
        raise NoEffect("scheduled sampling is off (scheduled_sampling_max_step_offset 0)")
    raise Refused(f"{value}: flux2lora's rollouts use Euler steps only; euler is used")


def _flow_schedule_shift(value, config):
    if _truthy(config.get("flow_schedule_auto_shift", False)):
        raise NoEffect("flow_schedule_auto_shift is set: the shift depends on the resolution")
    shift = float(value)
    if shift <= 0:
        return {"train.timestep_shift": 1.0}  # SimpleTuner applies no shift for 0 without auto_shift
    return {"train.timestep_shift": shift}


def _uniform(value, config):
    if _truthy(value):
        return {"train.weighting_scheme": "uniform"}
    raise NoEffect("false: SimpleTuner's default sigmoid-of-normal sampling (weighting_scheme logit_normal)")


def _eval_sigmas(count) -> list[float]:
    """SimpleTuner's eval_timesteps (how many timesteps it scores) as that many evenly spaced sigmas, the middle of
    each of `count` equal bands of (0, 1]."""
    count = _int(count)
    if count < 1:
        raise Refused("eval_timesteps must be at least 1")
    return [round((i + 0.5) / count, 6) for i in range(count)]


def stop_unless(meaning: str, harmless: tuple, why: str) -> SeedKey:
    """A setting that would train a different kind of model: the import stops unless it has a harmless value."""
    def apply(value, config):
        if value in harmless:
            raise NoEffect(f"{value!r}: as in flux2lora")
        raise Stop(f"{meaning} {value!r}: {why}")
    return SeedKey(meaning, apply)


def _model_family(value, config):
    if value != "flux2":
        raise Stop(f"model_family {value!r}: flux2lora trains FLUX.2 only (model_family flux2)")
    raise NoEffect("flux2lora trains FLUX.2 only")


FLUX2_GUIDANCE = "SimpleTuner's FLUX.2 model trains with constant guidance 1.0 whatever is set (its check_user_config)"

# fmt: off
SEED_KEYS: dict[str, SeedKey] = {
    # model
    "model_family": SeedKey("model family", _model_family),
    "model_type": stop_unless("model_type", ("lora",), "flux2lora trains LoRAs only"),
    "lora_type": SeedKey("adapter kind: standard (peft LoRA) or lycoris (lycoris_config's algo: lokr, loha)",
                         _lora_type, "standard"),
    "lycoris_config": SeedKey("LyCORIS options file (algo, linear_dim, linear_alpha, factor, ...)", _lycoris_config),
    "peft_lora_mode": stop_unless("peft_lora_mode", ("standard",), "flux2lora trains standard LoRAs"),
    "controlnet": stop_unless("controlnet", (False, "false", None), "flux2lora does not train ControlNets"),
    "distillation_method": stop_unless("distillation_method", (None, "", "none"),
                                       "flux2lora does not distil models"),
    "init_lora": refuse("start from an existing LoRA", "flux2lora's LoRA starts from its own initialisation"),
    "use_ema": to("train.use_ema", "EMA of the trained weights", False),
    "ema_decay": to("train.ema_decay", "EMA smoothing factor (unset: flux2lora's 0.995)"),
    "ema_update_interval": to("train.ema_update_interval", "update the EMA every N optimizer steps (unset: every "
                              "step)", None, convert=lambda v, c: _int(v, 1) or 1, ours={}),
    "ema_device": no_effect("where the EMA lives", "the adapter's EMA is small and stays beside the LoRA weights"),
    "ema_cpu_only": no_effect("keep the EMA on the CPU", "the adapter's EMA is small and stays beside the LoRA "
                              "weights"),
    "ema_foreach_disable": no_effect("EMA without foreach kernels", "speed only"),
    "model_flavour": to("model.model_flavour", "FLUX.2 variant (klein-4b, klein-9b, dev)", "klein-9b"),
    "pretrained_model_name_or_path": to("model.pretrained_model_name_or_path",
                                        "base model: hub id or local folder (unset: the flavour's repo)", None),
    "revision": to("model.revision", "hub revision of the base model", None),
    "base_model_default_dtype": to("model.base_model_default_dtype", "dtype of the frozen weights", "bf16"),
    "base_model_precision": SeedKey("weight precision of the frozen transformer (quantisation)",
                                    _precision("train.base_model_precision", BASE_PRECISIONS), "no_change",
                                    {"train.base_model_precision": "no_change"}),
    "text_encoder_1_precision": SeedKey("weight precision of the text encoder",
                                        _precision("encode_text.text_encoder_1_precision", TEXT_PRECISIONS),
                                        "no_change", {"encode_text.text_encoder_1_precision": None}),
    **{f"text_encoder_{i}_precision": no_effect("precision of another text encoder", "FLUX.2 has one text encoder")
       for i in (2, 3, 4)},
    "quantize_via": to("train.quantize_via", "where quantisation runs (cpu, accelerator, pipeline)", "accelerator"),
    "offload_during_startup": to("train.offload_during_startup", "load models on the CPU first", False),
    "enable_group_offload": to("train.enable_group_offload", "group offload of the transformer", False),
    "group_offload_type": to("train.group_offload_type", "block_level or leaf_level", "block_level"),
    "group_offload_blocks_per_group": to("train.group_offload_blocks_per_group", "blocks moved together", 1),
    "group_offload_use_stream": to("train.group_offload_use_stream", "prefetch on a CUDA stream", False),
    "group_offload_text_encoder": to("encode_text.group_offload_text_encoder", "group offload of the text encoder",
                                     False),
    "group_offload_vae": to("encode_latents.group_offload_vae", "group offload of the VAE", False),
    # LoRA
    "lora_rank": _standard_lora_only(to("train.lora_rank", "LoRA rank", 16)),
    "lora_alpha": _standard_lora_only(to("train.lora_alpha", "LoRA alpha (unset: the rank, scale 1)", None)),
    "lora_dropout": _standard_lora_only(to("train.lora_dropout", "dropout on the LoRA path", 0.1)),
    "lora_init_type": _standard_lora_only(SeedKey("LoRA A's initialisation (default: PEFT's Kaiming; SimpleTuner "
                                                  "forces it with DoRA)", _lora_init_type, "default",
                                                  {"train.lora_init_type": "default"})),
    "flux_lora_target": SeedKey("LoRA target preset (all, attention, mlp, tiny)", _flux_lora_target, "all",
                                lambda config: {} if config.get("peft_lora_target_modules") not in
                                (None, "", "None", []) else {"train.flux_lora_target": "all"}),
    "use_dora": SeedKey("DoRA (peft use_dora; SimpleTuner then initialises A as peft's default)", _use_dora, False,
                        {"train.use_dora": False}),
    "peft_lora_target_modules": SeedKey("LoRA target module names (peft target_modules; replace the preset)",
                                        _peft_target_modules),
    # optimisation
    "learning_rate": to("train.learning_rate", "peak learning rate", 4e-7),
    "lr_scheduler": SeedKey("LR schedule (its cosine/sine are periodic with half-period lr_warmup_steps)",
                            _lr_scheduler, "constant_with_warmup", {"train.lr_scheduler": "constant_with_warmup"}),
    "lr_warmup_steps": SeedKey("warmup steps; the half-period of cosine and sine", _lr_warmup_steps, 0,
                               lambda config: _lr_warmup_steps(0, config)),
    "lr_end": to("train.lr_end", "floor of cosine/sine, final rate of polynomial", 4e-7),
    "lr_power": to("train.lr_power", "polynomial decay exponent", 0.8),
    "lr_num_cycles": no_effect("cycles of diffusers' cosine_with_restarts",
                               "SimpleTuner's own cosine_with_restarts never reads it"),
    "optimizer": SeedKey("optimizer", _optimizer, "adamw_bf16",
                         {"train.optimizer": "adamw_bf16", "train.use_8bit_adam": False}),
    "adam_beta1": to("train.adam_beta1", "AdamW beta1", 0.9),
    "adam_beta2": to("train.adam_beta2", "AdamW beta2", 0.999),
    "adam_weight_decay": to("train.adam_weight_decay", "AdamW weight decay", 1e-2),
    "adam_epsilon": to("train.adam_epsilon", "AdamW epsilon", 1e-8),
    "max_grad_norm": to("train.max_grad_norm", "clipping threshold (0: none)", 2.0),
    "grad_clip_method": to("train.grad_clip_method", "value: clamp each element; norm: scale the total norm",
                           "value"),
    "train_batch_size": to("train.train_batch_size", "images per micro-batch", 4),
    "gradient_accumulation_steps": to("train.gradient_accumulation_steps", "micro-batches per update", 1),
    "max_train_steps": SeedKey("length in steps (0: num_train_epochs decides)", _max_train_steps, None),
    "num_train_epochs": SeedKey("length in epochs (0: unused, max_train_steps decides)", _num_train_epochs, 1,
                                lambda config: {} if _int(config.get("max_train_steps")) > 0 else
                                {"train.max_train_steps": 0, "train.num_train_epochs": 1}),
    "mixed_precision": to("train.mixed_precision", "autocast precision (bf16, fp16, no)", "bf16"),
    "gradient_checkpointing": to("train.gradient_checkpointing", "activation checkpointing", True),
    "gradient_checkpointing_interval": refuse("checkpoint every n-th block",
                                              "not supported; use train.gradient_checkpointing_blocks"),
    "seed": SeedKey("training seed (unset, 0, -1: random each run)", _seed, None, {"train.seed": 42}),
    "flow_schedule_shift": SeedKey("static sigma shift s*t/(1+(s-1)*t) (0: none, or auto_shift's)",
                                   _flow_schedule_shift, 3.0,
                                   lambda config: {} if _truthy(config.get("flow_schedule_auto_shift", False))
                                   else {"train.timestep_shift": 3.0}),
    "flow_schedule_auto_shift": SeedKey("resolution-dependent shift (larger images: larger shift)", _auto_shift, False),
    "flow_sigmoid_scale": to("train.logit_std", "sigma = sigmoid(scale * N(0,1)): logit-normal with std scale", 1.0,
                             ours={"train.logit_std": 1.0, "train.logit_mean": 0.0,
                                   "train.weighting_scheme": "logit_normal"}),
    "flow_use_uniform_schedule": SeedKey("sigma ~ U(0, 1)", _uniform),
    "flow_use_beta_schedule": refuse("sigma ~ Beta(alpha, beta)", "not supported (logit_normal, uniform, mode)"),
    "flux_fast_schedule": refuse("fast timestep schedule", "not supported"),
    # scheduled sampling (rollout): the same names and meaning (train/rollout.py)
    "scheduled_sampling_max_step_offset": SeedKey("longest rollout in steps (0: off)", _rollout_offset, 0,
                                                  {"train.scheduled_sampling_max_step_offset": 0}),
    "scheduled_sampling_probability": to("train.scheduled_sampling_probability", "share of samples rolled out", 0.0),
    "scheduled_sampling_ramp_steps": to("train.scheduled_sampling_ramp_steps",
                                        "linear ramp of the probability over N steps (0: none)", 0),
    "scheduled_sampling_prob_start": to("train.scheduled_sampling_prob_start", "the ramp's first probability", 0.0),
    "scheduled_sampling_prob_end": to("train.scheduled_sampling_prob_end", "the ramp's last probability", 0.5),
    "scheduled_sampling_sampler": SeedKey("rollout solver (unipc, euler, dpm, rk4)", _rollout_sampler, "unipc"),
    "scheduled_sampling_start_step": refuse("first step of the ramp", "not supported: the ramp starts at step 0",
                                            harmless=(0, None)),
    "scheduled_sampling_ramp_shape": refuse("ramp shape", "not supported: the ramp is linear",
                                            harmless=("linear", None)),
    "scheduled_sampling_strategy": refuse("how rollout lengths are drawn", "not supported: k is uniform",
                                          harmless=("uniform", None)),
    **{key: refuse("ReflexFlow exposure-bias terms", "not supported", harmless=(False, None, "false"))
       for key in ("scheduled_sampling_reflexflow",)},
    "caption_dropout_probability": to("train.caption_dropout_probability", "share trained on the empty prompt",
                                      0.1),
    "conditioning_multidataset_sampling": to("train.conditioning_multidataset_sampling",
                                             "several references: combined or one at random", "random"),
    "tread_config": to("train.tread_config", "TREAD token routing", None),
    "flux_guidance_mode": no_effect("training guidance (dev)", FLUX2_GUIDANCE),
    "flux_guidance_value": no_effect("training guidance value (dev)", FLUX2_GUIDANCE),
    "flux_guidance_min": no_effect("random-range minimum (dev)", FLUX2_GUIDANCE),
    "flux_guidance_max": no_effect("random-range maximum (dev)", FLUX2_GUIDANCE),
    "tokenizer_max_length": no_effect("prompt tokens", "SimpleTuner's FLUX.2 model forces 512"),
    # checkpoints
    "checkpoint_step_interval": SeedKey("checkpoint every N steps", _checkpoint_interval, 500,
                                        {"train.checkpointing_steps": 500}),
    "checkpointing_steps": SeedKey("legacy name of checkpoint_step_interval", _legacy_checkpointing_steps),
    "checkpoints_total_limit": to("train.checkpoints_total_limit", "checkpoints kept", 5),
    "save_total_limit": SeedKey("legacy name of checkpoints_total_limit", _legacy_total_limit),
    "checkpoint_epoch_interval": refuse("checkpoint every N epochs", "not supported: use checkpoint_step_interval"),
    "resume_from_checkpoint": SeedKey("latest, a folder, or none", _resume, "latest",
                                      {"train.resume_from_checkpoint": "latest"}),
    # validation
    "validation_step_interval": to("validate.validation_step_interval", "validate every N steps", 100),
    "validation_steps": SeedKey("legacy name of validation_step_interval", _legacy_validation_steps),
    "validation_num_inference_steps": to("validate.validation_num_inference_steps", "sampling steps", 30),
    "validation_resolution": SeedKey("WxH list, a side, or megapixels (< 128)", _validation_resolution, "256",
                                     {"validate.validation_resolution": "256x256"}),
    "validation_guidance": SeedKey("guidance (dev: distilled; klein: moved to true CFG)", _validation_guidance, 7.5,
                                   {"validate.validation_guidance": 7.5}),
    "validation_guidance_real": SeedKey("true CFG scale", _validation_guidance_real, 1.0),
    "validation_seed": to("validate.validation_seed", "seed of the validation images (unset: random)", None,
                          ours={"validate.validation_seed": 42}),
    "validation_disable": refuse("no validation at all", "the validate stage always renders the final LoRA"),
    "num_validation_images": no_effect("images per prompt", "one image per prompt here", (1,)),
    "validation_negative_prompt": no_effect("negative prompt of CFG", "klein's CFG here uses the empty prompt"),
    "disable_benchmark": no_effect("skip the base-model images", "the base model's images are always rendered "
                                   "beside the LoRA's"),
    # caches and encoders
    "write_batch_size": SeedKey("embeddings / latents per cache write",
                                lambda v, c: {"encode_text.write_batch_size": v, "encode_latents.write_batch_size": v},
                                128, {"encode_text.write_batch_size": 128, "encode_latents.write_batch_size": 128}),
    "vae_batch_size": to("encode_latents.vae_batch_size", "images per VAE forward", 4),
    "text_encoder_batch_size": to("encode_text.text_encoder_batch_size", "prompts per text-encoder forward"),
    "vae_cache_ondemand": no_effect("encode latents while training", "latents are cached by encode-latents first"),
    "cache_dir": no_effect("cache folder", "caches are content-addressed under output_dir (DVC outputs)"),
    "cache_dir_vae": no_effect("VAE cache folder", "caches are content-addressed under output_dir (DVC outputs)"),
    "cache_dir_text": no_effect("text cache folder", "caches are content-addressed under output_dir (DVC outputs)"),
    "hash_filenames": no_effect("hashed cache names", "cache entries are always named by content hash"),
    "output_dir": no_effect("output folder", "flux2lora writes under the project's output_dir, tracked by DVC"),
    "report_to": no_effect("tracker", "flux2lora tracks every run in MLflow"),
    "data_backend_config": SeedKey("the datasets file", lambda v, c: {}),  # READ_BY_IMPORT
    "user_prompt_library": SeedKey("the validation prompts file", lambda v, c: {}),
    "validation_prompt": SeedKey("one validation prompt", lambda v, c: {}),
    "validation_prompt_library": refuse("also validate with SimpleTuner's built-in prompts", "not supported: the "
                                        "project's prompt library is used"),
    "validation_disable_unconditional": no_effect("skip the base model's images", "the base model's images are "
                                                  "always rendered beside the LoRA's"),
    "validation_guidance_rescale": refuse("CFG rescale", "not supported", harmless=(0, 0.0, None)),
    # evaluation loss: unset keeps flux2lora's (on by default, a fixed sample of the training images without a split)
    "num_eval_images": to("validate.eval_max_samples", "images of the evaluation loss"),
    "eval_steps_interval": to("validate.eval_every_n_steps",
                              "evaluation-loss interval (steps)"),
    "eval_timesteps": to("validate.eval_sigmas", "timesteps scored by the evaluation loss (a count)",
                         convert=lambda v, c: _eval_sigmas(v)),
    # SimpleTuner's eval_dataset_id picks the dataset whose images feed validation renders (validation_using_datasets,
    # edit validation), not the evaluation loss's set: that is every `dataset_type: eval` backend, imported as such
    "eval_dataset_id": refuse("take validation input images from this dataset",
                              "not supported: validation renders the prompt library only; the evaluation loss "
                              "scores every dataset_type: eval dataset (imported as prepare.datasets entries)"),
    "fuse_qkv_projections": refuse("fused attention projections", "not supported (speed only)"),
    "disable_bucket_pruning": no_effect("keep images of under-filled buckets", "flux2lora never prunes buckets"),
    **{key: no_effect("SDNQ quantisation tuning", "SDNQ precisions are trained as their nearest quanto precision")
       for key in ("sdnq_compile_mode", "sdnq_group_size", "sdnq_hadamard_group_size", "sdnq_use_hadamard",
                   "sdnq_use_quantized_matmul", "sdnq_use_svd", "sdnq_svd_rank")},
    # publishing and tracking
    "push_to_hub": SeedKey("upload the final LoRA (repo: hub_model_id, else tracker_project_name)", _push_to_hub,
                           False, {"publish.hub_repo_id": None}),
    "hub_model_id": SeedKey("Hub repo name (used only with push_to_hub)", _hub_model_id),
    "model_card_private": to("publish.hub_private", "create the repo private", True),
    "push_checkpoints_to_hub": refuse("upload every checkpoint", "only the final LoRA is published"),
    "tracker_project_name": to("tracking.experiment_name", "tracker project"),
    "tracker_run_name": to("tracking.run_name", "tracker run name"),
    # dataset options given globally: the defaults of every dataset, as in SimpleTuner
    "resolution": to("prepare.resolution", "training size (unit: resolution_type)", 1024),
    "resolution_type": to("prepare.resolution_type", "pixel (shorter side), pixel_area (equal-area square), area",
                          "pixel_area"),
    "caption_strategy": to("prepare.caption_strategy", "where captions come from", "filename"),
    "minimum_image_size": to("prepare.minimum_image_size", "smaller images are skipped", None),
    "maximum_image_size": no_effect("downsample larger images", "every image is resized to cover its bucket anyway"),
    "target_downsample_size": no_effect("downsample target", "every image is resized to cover its bucket anyway"),
    "instance_prompt": to("prepare.instance_prompt", "caption of instanceprompt datasets, or the prefix", None),
    "prepend_instance_prompt": to("prepare.prepend_instance_prompt", "put instance_prompt before each caption",
                                  False),
    "only_instance_prompt": SeedKey("train every image on instance_prompt", _only_instance_prompt),
    "repeats": no_effect("global repeats", "SimpleTuner ignores it outside a dataset (its legacy handler)"),
    "aspect_bucket_rounding": no_effect("bucket rounding", "buckets are multiples of 16, as FLUX.2 needs"),
    "metadata_backend": no_effect("metadata store", "prepare reads sizes from the images themselves"),
}
# fmt: on

# Keys naming files the import reads itself, and what becomes of their content.
READ_BY_IMPORT = {"data_backend_config": "prepare.datasets (its backends)",
                  "user_prompt_library": "the project's prompt library (validate.user_prompt_library)",
                  "validation_prompt": "the project's prompt library, as 'validation_prompt'"}

# Keys of a data backend (multidatabackend.json entry), beyond DatasetConfig's own names, with their fate.
BACKEND_NO_EFFECT = {
    "default": "one text cache serves every dataset",
    "cache_dir": "the text cache is content-addressed under output_dir/text_embeds (a DVC output)",
    "cache_dir_vae": "latents are content-addressed under output_dir/latents (a DVC output)",
    "text_embeds": "one text cache serves every dataset",
    "image_embeds": "latents are content-addressed under output_dir/latents (a DVC output)",
    "hash_filenames": "cache entries are always named by content hash",
    "preserve_data_backend_cache": "prepare remembers each file by path, size and mtime",
    "skip_file_discovery": "prepare remembers each file by path, size and mtime, so discovery is cheap",
    "vae_cache_clear_each_epoch": "latents are cached once; crops are fixed per image",
    "metadata_backend": "prepare reads sizes from the images themselves (parquet captions: the `parquet` block)",
    "maximum_image_size": "every image is resized to cover its bucket anyway",
    "target_downsample_size": "every image is resized to cover its bucket anyway",
}
BACKEND_REFUSED = {
    "caption_filter_list": "caption filters are not supported: edit the captions",
    "conditioning": "generated conditioning (canny, ...) is not supported: give a conditioning dataset",
}
# a parquet table's image size columns: SimpleTuner's metadata shortcut; prepare reads each image's size itself
PARQUET_SIZE_COLUMNS = {"width_column", "height_column"}
BACKEND_DATASET_KEYS = set(DatasetConfig.model_fields) - {"type", "default", "cache_dir", "write_batch_size"}

# Sections a SimpleTuner config describes entirely: what it does not set takes SimpleTuner's default there, or ours
# where SimpleTuner has no such key ...
RESET_SECTIONS = ("model", "encode_text", "encode_latents", "train", "validate")
# ... except the project's own wiring, which a SimpleTuner config has no word on.
KEEP_ON_IMPORT = {"validate.user_prompt_library", "validate.validation_subject", "model.device"}
# Always so in SimpleTuner's FLUX.2 model, whatever the config says (its check_user_config).
FORCED = {"train.flux_guidance_mode": ("constant", FLUX2_GUIDANCE),
          "train.flux_guidance_value": (1.0, FLUX2_GUIDANCE),
          "encode_text.max_sequence_length": (512, "SimpleTuner's FLUX.2 model forces tokenizer_max_length 512")}


# Our own defaults kept although SimpleTuner has a key: they change speed, not what is computed.
OWN_DEFAULT_REASONS = {
    "encode_text.text_encoder_batch_size": "speed only (each prompt's embedding does not depend on it): flux2lora's "
                                           "default, not SimpleTuner's 1",
    "train.flux_guidance_min": "unused: training guidance is constant (SimpleTuner's FLUX.2)",
    "train.flux_guidance_max": "unused: training guidance is constant (SimpleTuner's FLUX.2)",
    "train.mode_scale": "flux2lora's default; unused with weighting_scheme logit_normal or uniform",
}
# What each backend key means in SimpleTuner (its DATALOADER.md); the same name is the same option here.
BACKEND_MEANINGS = {
    "id": "the dataset's name", "instance_data_dir": "its folder",
    "dataset_type": "image, eval (scored by the evaluation loss, never trained on) or conditioning",
    "crop": "crop to the bucket (false: keep the aspect)", "crop_aspect": "square, preserve, closest, random",
    "crop_aspect_buckets": "aspect ratios offered", "crop_style": "center, random, corner",
    "resolution": "training size (unit: resolution_type)", "resolution_type": "pixel, pixel_area, area",
    "minimum_image_size": "smaller images are skipped", "repeats": "extra passes per epoch",
    "caption_strategy": "where captions come from", "instance_prompt": "caption or prefix",
    "prepend_instance_prompt": "instance_prompt before each caption", "parquet": "caption table",
    "conditioning_data": "its reference (or mask) datasets",
    "conditioning_type": "reference_strict, reference_loose or mask (a loss mask)",
    "probability": "its weight when a batch's dataset is drawn (SimpleTuner's auto-weighting: x its size)",
    "disable_multiline_split": "a multi-line caption file is one caption",
}


@dataclass
class ImportReport:
    """What became of every SimpleTuner key, and every value the import wrote."""

    mapped: list[dict] = field(default_factory=list)      # source, target, value, meaning
    defaulted: list[dict] = field(default_factory=list)   # target, value, reason
    refused: list[dict] = field(default_factory=list)     # source, value, reason
    no_effect: list[dict] = field(default_factory=list)   # source, value, reason
    notes: list[str] = field(default_factory=list)
    files_written: list[str] = field(default_factory=list)
    params: dict = field(default_factory=dict)

    def status(self) -> dict[str, str]:
        """source -> mapped / refused / no effect (a source may map to several targets)."""
        out = {}
        for kind, rows in (("mapped", self.mapped), ("refused", self.refused), ("no effect", self.no_effect)):
            for row in rows:
                out[row["source"]] = kind
        return out

    def to_json(self) -> dict:
        return {"mapped": self.mapped, "defaulted": self.defaulted, "refused": self.refused,
                "no_effect": self.no_effect, "notes": self.notes, "files_written": self.files_written}


# --------------------------------------------------------------------------------------------------------------
# Reading SimpleTuner's files


def read_seed_config(folder: Path) -> tuple[dict[str, Any], str]:
    """The flat key -> value config of a SimpleTuner config folder (config.json or config.toml; the web UI's saved
    `{"_metadata", "config": {...}}` form too), `--` prefixes removed."""
    for name in ("config.json", "config.toml"):
        path = folder / name
        if path.is_file():
            try:
                raw = json.loads(path.read_text()) if name.endswith(".json") else tomllib.loads(path.read_text())
            except (ValueError, tomllib.TOMLDecodeError) as e:
                raise ParamsError(f"{path}: cannot be parsed ({e})") from None
            if not isinstance(raw, dict):
                raise ParamsError(f"{path}: expected an object of options")
            if "_metadata" in raw:  # the web UI's saved form: the options under "config", or beside _metadata
                raw = raw["config"] if isinstance(raw.get("config"), dict) else {
                    k: v for k, v in raw.items() if k != "_metadata"}
            return {str(k).lstrip("-"): v for k, v in raw.items()}, name
    raise FileNotFoundError(f"{folder}: no config.json or config.toml (SimpleTuner's config folder)")


def read_backends(path: Path) -> list[dict]:
    """The data backends of a multidatabackend.json: a list, or the web UI's `{"_metadata", "datasets": [...]}`."""
    try:
        raw = json.loads(path.read_text())
    except ValueError as e:
        raise ParamsError(f"{path}: cannot be parsed ({e})") from None
    if isinstance(raw, dict) and isinstance(raw.get("datasets"), list):
        raw = raw["datasets"]
    if not isinstance(raw, list) or not all(isinstance(b, dict) for b in raw):
        raise ParamsError(f"{path}: expected a JSON list of data backends")
    return raw


def _find(folder: Path, given: str | None, default: str) -> Path | None:
    """A file the config names (relative to the config folder or SimpleTuner's working folder above it), or the
    default name in the config folder."""
    candidates = []
    if given:
        given_path = Path(given)
        candidates += [given_path] if given_path.is_absolute() else [folder / given_path, folder.parent / given_path,
                                                                     folder.parent.parent / given_path,
                                                                     folder / given_path.name]
    candidates.append(folder / default)
    return next((p for p in candidates if p.is_file()), None)


# --------------------------------------------------------------------------------------------------------------
# Validation of single values against our fields


def _section_model(section: str):
    return Params.model_fields["validate_" if section == "validate" else section].annotation


def coerce(target: str, value: Any) -> Any:
    """`value` as our field `target` (section.key) holds it: numeric strings become numbers, "true" a bool; raises
    Refused with pydantic's message when the type or a bound does not fit. Rules over several keys and field
    validators are checked on the whole result (as check-params does)."""
    section, key = target.split(".", 1)
    info = _section_model(section).model_fields[key]
    try:
        typed = TypeAdapter(Annotated[info.annotation, info]).validate_python(value)
    except ValidationError as e:
        raise Refused(f"{target}: {'; '.join(err['msg'] for err in e.errors())}") from None
    return TypeAdapter(Annotated[info.annotation, info]).dump_python(typed, mode="json")


# --------------------------------------------------------------------------------------------------------------
# The mapping


def map_config(config: dict[str, Any], source: str, report: ImportReport) -> dict[str, Any]:
    """SimpleTuner options -> {our section.key: value}: set keys, then SimpleTuner's defaults, then forced values."""
    config = {k: v for k, v in config.items()}
    context = {k: v for k, v in config.items() if v not in (None, "")}
    out: dict[str, Any] = {}
    mapped_keys = set()
    for key, value in config.items():
        where = f"{source} {key}"
        if value in (None, ""):
            report.no_effect.append({"source": where, "value": value,
                                     "reason": "null: unset (SimpleTuner skips null options); its default applies"})
            continue
        entry = SEED_KEYS.get(key)
        if key in READ_BY_IMPORT:
            report.mapped.append({"source": where, "target": READ_BY_IMPORT[key], "value": value,
                                  "meaning": entry.meaning})
            continue
        if entry is None:
            report.refused.append({"source": where, "value": value,
                                   "reason": "not a SimpleTuner key flux2lora knows: no equivalent, ignored"})
            continue
        try:
            assignments = entry.apply(value, context)
            typed = {target: coerce(target, v) for target, v in assignments.items()}
        except NoEffect as e:
            report.no_effect.append({"source": where, "value": value, "reason": str(e)})
            continue
        except Refused as e:
            default = "" if entry.st_default is UNSET else f"; SimpleTuner's default ({entry.st_default!r}) is used"
            report.refused.append({"source": where, "value": value, "reason": f"{e}{default}"})
            continue
        mapped_keys.add(key)
        for target, v in typed.items():
            out[target] = v
            report.mapped.append({"source": where, "target": target, "value": v, "meaning": entry.meaning})
    report.notes += context.pop("__notes__", [])
    # SimpleTuner's defaults for what the config leaves unset (or refused, or without effect)
    for key, entry in SEED_KEYS.items():
        if key in mapped_keys:
            continue
        for target, v in entry.defaults(context).items():
            if target not in out:
                out[target] = coerce(target, v)
                why = f"SimpleTuner's default {key}={entry.st_default!r}" if entry.st_default is not UNSET else \
                    f"SimpleTuner's behaviour without {key}"
                if key == "seed" or (key == "validation_seed" and "validation_seed" not in mapped_keys):
                    why += " (a new random seed each run there; a fixed one here keeps runs reproducible)"
                report.defaulted.append({"target": target, "value": out[target], "reason": why})
    for target, (value, why) in FORCED.items():
        out[target] = value
        report.defaulted.append({"target": target, "value": value, "reason": why})
    return out


def map_backends(backends: list[dict], source: str, report: ImportReport, out: dict[str, Any]) -> list[dict]:
    """SimpleTuner's data backends -> `prepare.datasets` entries (a text_embeds backend -> encode_text); every key
    reported. A backend that is not a local folder stops the import."""
    datasets = []
    # SimpleTuner's global only_instance_prompt turns captions off in every backend, whatever its caption_strategy
    # (its data backend factory: a backend's own flag, else the global one)
    every_instance_prompt = any(m["source"].split()[-1] == "only_instance_prompt" and
                                m["target"] == "prepare.caption_strategy" for m in report.mapped)
    for index, backend in enumerate(backends):
        name = backend.get("id", f"#{index}")
        where = f"{source}[{name}]"
        kind = backend.get("dataset_type", "image")
        if _truthy(backend.get("disabled", False)) or _truthy(backend.get("disable", False)):
            report.no_effect.append({"source": where, "value": "disabled", "reason": "a disabled backend trains "
                                     "nothing in SimpleTuner; not imported"})
            continue
        if kind == "text_embeds":
            for key, value in backend.items():
                if key == "write_batch_size":
                    out["encode_text.write_batch_size"] = coerce("encode_text.write_batch_size", value)
                    report.mapped.append({"source": f"{where} {key}", "target": "encode_text.write_batch_size",
                                          "value": out["encode_text.write_batch_size"],
                                          "meaning": "text embeddings per cache write"})
                elif key in ("id", "type", "dataset_type"):
                    report.no_effect.append({"source": f"{where} {key}", "value": value,
                                             "reason": "one text cache serves every dataset"})
                else:
                    reason = BACKEND_NO_EFFECT.get(key)
                    (report.no_effect if reason else report.refused).append(
                        {"source": f"{where} {key}", "value": value,
                         "reason": reason or "no flux2lora equivalent for a text_embeds backend"})
            continue
        if backend.get("type", "local") != "local":
            raise Stop(f"{where}: type {backend.get('type')!r}: flux2lora reads datasets from local folders only, and "
                       "an import must not leave the previous project's dataset in place. Copy the dataset into a "
                       "folder (images with .txt captions beside them, e.g. from `datasets.load_dataset(...)` with "
                       "each row's image saved and its caption written to <name>.txt) and give that backend "
                       "`type: local` and `instance_data_dir`")
        if kind not in ("image", "conditioning", "eval"):
            raise Stop(f"{where}: dataset_type {kind!r}: flux2lora reads image, eval and conditioning datasets only")
        entry: dict[str, Any] = {}
        for key, value in backend.items():
            here = f"{where} {key}"
            if key == "parquet" and isinstance(value, dict):
                for column in PARQUET_SIZE_COLUMNS & set(value):
                    report.no_effect.append({"source": f"{here}.{column}", "value": value[column],
                                             "reason": "prepare reads sizes from the images themselves"})
                value = {k: v for k, v in value.items() if k not in PARQUET_SIZE_COLUMNS}
            if key in ("disabled", "disable"):
                report.no_effect.append({"source": here, "value": value, "reason": "false: the dataset is used"})
            elif key == "only_instance_prompt":
                if _truthy(value):
                    entry["caption_strategy"] = "instanceprompt"
                    report.mapped.append({"source": here, "target": f"prepare.datasets[{name}].caption_strategy",
                                          "value": "instanceprompt", "meaning": "train every image on instance_prompt"})
                else:
                    report.no_effect.append({"source": here, "value": value, "reason": "false: caption_strategy "
                                             "decides"})
            elif key in BACKEND_NO_EFFECT:
                report.no_effect.append({"source": here, "value": value, "reason": BACKEND_NO_EFFECT[key]})
            elif key in BACKEND_REFUSED:
                report.refused.append({"source": here, "value": value, "reason": BACKEND_REFUSED[key]})
            elif key in ("is_regularisation_data", "is_regularization_data", "probability") and kind != "image":
                report.no_effect.append({"source": here, "value": value, "reason": "applies to image datasets only"})
            elif key in ("is_regularisation_data", "is_regularization_data"):  # SimpleTuner takes both spellings
                entry["is_regularisation_data"] = _truthy(value)
                report.mapped.append({"source": here, "target": f"prepare.datasets[{name}].is_regularisation_data",
                                      "value": entry["is_regularisation_data"],
                                      "meaning": "the target is the base model's prediction, adapter disabled"})
            elif key == "type":
                report.no_effect.append({"source": here, "value": value, "reason": "a local folder, as here"})
            elif key == "caption_strategy" and value not in ("textfile", "filename", "instanceprompt", "parquet"):
                raise Stop(f"{here}: caption_strategy {value!r}: flux2lora reads captions from text files, file "
                           "names, instance_prompt or a parquet/jsonl table only")
            elif key in BACKEND_DATASET_KEYS:
                try:
                    entry[key] = _dataset_value(key, value)
                except Refused as e:
                    report.refused.append({"source": here, "value": value, "reason": str(e)})
                    continue
                report.mapped.append({"source": here, "target": f"prepare.datasets[{name}].{key}",
                                      "value": entry[key], "meaning": BACKEND_MEANINGS.get(key, "the same option")})
            else:
                report.refused.append({"source": here, "value": value,
                                       "reason": "no flux2lora dataset option of that name: ignored"})
        if every_instance_prompt and entry.get("caption_strategy") != "instanceprompt":
            entry["caption_strategy"] = "instanceprompt"
            report.mapped.append({"source": f"{where} (global only_instance_prompt)",
                                  "target": f"prepare.datasets[{name}].caption_strategy", "value": "instanceprompt",
                                  "meaning": "train every image on instance_prompt, as SimpleTuner does"})
        try:
            DatasetConfig.model_validate(entry)
        except ValidationError as e:
            raise Stop(f"{where}: " + "; ".join(f"{'.'.join(map(str, err['loc'])) or 'dataset'}: {err['msg']}"
                                                 for err in e.errors())) from None
        datasets.append(entry)
    return datasets


def _dataset_value(key: str, value: Any) -> Any:
    info = DatasetConfig.model_fields[key]
    if key == "conditioning_data" and isinstance(value, str):  # one id, as SimpleTuner allows (and DatasetConfig)
        value = [value]
    try:
        typed = TypeAdapter(Annotated[info.annotation, info]).validate_python(value)
    except ValidationError as e:
        raise Refused("; ".join(err["msg"] for err in e.errors())) from None
    return TypeAdapter(Annotated[info.annotation, info]).dump_python(typed, mode="json")


def data_root_for(datasets: list[dict], report: ImportReport) -> str:
    """The deepest folder holding every dataset folder: the one DVC dependency of prepare."""
    folders = [d["instance_data_dir"] for d in datasets if d.get("instance_data_dir")]
    if not folders:
        return "data"
    absolute = {os.path.isabs(f) for f in folders}
    if len(absolute) > 1:
        report.notes.append("datasets mix absolute and relative folders; prepare.data_root must hold all of them: "
                            "move them under one folder")
        return "data"
    common = os.path.commonpath([os.path.normpath(f) for f in folders])
    if common in ("", ".", os.sep):
        report.notes.append(f"the dataset folders {folders} share no folder but {common or '.'}: move them under one "
                            "folder (e.g. data/) and set prepare.data_root to it (it must not contain output_dir)")
    if any(os.path.isabs(f) for f in folders):
        report.notes.append("dataset folders are absolute paths outside the project: DVC tracks them as external "
                            "dependencies; copying them under the project (e.g. data/) makes the project portable")
    return common or "."


def read_prompt_library(path: Path | None, extra: str | None, report: ImportReport) -> dict[str, str]:
    """SimpleTuner's prompt library ({shortname: prompt}; entries that are objects give their "prompt"), plus the
    config's single `validation_prompt` if it has one."""
    library = json.loads(path.read_text()) if path else {}
    if not isinstance(library, dict):
        raise ParamsError(f"{path}: expected a JSON object {{shortname: prompt}}")
    prompts = {}
    for name, value in library.items():
        if isinstance(value, dict) and isinstance(value.get("prompt"), str):
            prompts[name] = value["prompt"]
            report.notes.append(f"{path.name} {name}: only its prompt is used")
        elif isinstance(value, str):
            prompts[name] = value
        else:
            report.refused.append({"source": f"{path.name} {name}", "value": value,
                                   "reason": "a prompt must be a string"})
    if extra:
        prompts.setdefault("validation_prompt", extra)
    return prompts


def _yaml():
    from ruamel.yaml import YAML

    yaml = YAML()  # round-trip: comments and key order of params.yaml survive the import
    yaml.width = 4096
    yaml.indent(mapping=2, sequence=4, offset=2)
    yaml.representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    return yaml


def yaml_safe(value: Any) -> Any:
    """`value` with every string that a YAML 1.1 reader (PyYAML, DVC) would take for a bool, null or number quoted:
    the round-trip writer emits YAML 1.2, where `no` is a string."""
    from ruamel.yaml.scalarstring import DoubleQuotedScalarString

    if isinstance(value, str):
        import yaml as pyyaml

        return DoubleQuotedScalarString(value) if pyyaml.safe_load(value or "''") != value else value
    if isinstance(value, dict):
        return {k: yaml_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [yaml_safe(v) for v in value]
    return value


def write_sections(tree, values: dict[str, Any], report: ImportReport) -> None:
    """Write the imported values into the params tree; in RESET_SECTIONS every other key takes flux2lora's default
    (SimpleTuner has no such key), reported as defaulted."""
    for target, value in values.items():
        section, key = target.split(".", 1)
        if section != "prepare":
            tree.setdefault(section, {})[key] = yaml_safe(value)
    for section in RESET_SECTIONS:
        node = tree.setdefault(section, {})
        defaults = _section_model(section)().model_dump(mode="json")
        for key, default in defaults.items():
            target = f"{section}.{key}"
            if target in values or target in KEEP_ON_IMPORT:
                continue
            if key in node:
                node[key] = yaml_safe(default)
            report.defaulted.append({"target": target, "value": default, "reason": OWN_DEFAULT_REASONS.get(
                target, "no SimpleTuner counterpart: flux2lora's default")})


def import_simpletuner(source: Path, params_path: Path = Path(PARAMS_FILE), write: bool = True) -> ImportReport:
    """Map a SimpleTuner config folder onto `params_path` (written unless write=False) and copy its prompt library.

    Raises FileNotFoundError when the folder has no config, ParamsError (Stop) when the import cannot reproduce
    SimpleTuner's run (a non-local dataset, no datasets) or the result would not pass check-params."""
    source, params_path = Path(source), Path(params_path)
    report = ImportReport()
    config, config_name = read_seed_config(source)
    if _lycoris(config):  # the LyCORIS options live in their own JSON file, read here
        lycoris_path = _find(source, config.get("lycoris_config"), "lycoris_config.json")
        if lycoris_path is not None:
            try:
                config["lycoris_config"] = json.loads(lycoris_path.read_text())
            except ValueError as e:
                raise Stop(f"{lycoris_path}: not valid JSON ({e})") from None
    values = map_config(config, config_name, report)

    backends_path = _find(source, config.get("data_backend_config"), "multidatabackend.json")
    if backends_path is None:
        raise Stop(f"{source}: no multidatabackend.json (nor the file data_backend_config names): SimpleTuner cannot "
                   "train without data backends, and the import must not keep the previous project's dataset")
    datasets = map_backends(read_backends(backends_path), backends_path.name, report, values)
    if not datasets:
        raise Stop(f"{backends_path}: no enabled image dataset to import")

    yaml = _yaml()
    tree = yaml.load(params_path.read_text()) if params_path.exists() else None
    if tree is None:
        from ruamel.yaml.comments import CommentedMap

        tree = CommentedMap()
    write_sections(tree, values, report)
    prepare = {"data_root": data_root_for(datasets, report)}
    kept = tree.get("prepare") or {}
    if "image_extensions" in kept:
        prepare["image_extensions"] = kept["image_extensions"]
    # SimpleTuner's global dataset options (set or defaulted) are the defaults of every dataset, as there
    prepare.update({k.split(".", 1)[1]: v for k, v in values.items() if k.startswith("prepare.")})
    prepare["datasets"] = datasets
    tree["prepare"] = yaml_safe(prepare)

    prompts_path = _find(source, config.get("user_prompt_library"), "user_prompt_library.json")
    library = read_prompt_library(prompts_path, config.get("validation_prompt"), report)
    if not library:
        report.notes.append("no user_prompt_library.json and no validation_prompt: the current prompt library is kept")

    buffer = io.StringIO()
    yaml.dump(tree, buffer)
    text = buffer.getvalue()
    import yaml as pyyaml

    parse_params(pyyaml.safe_load(text), source=f"{params_path} (after importing {source})")
    report.params = pyyaml.safe_load(text)
    if write:
        params_path.write_text(text)
        report.files_written.append(str(params_path))
        if library:
            library_path = params_path.parent / (tree.get("validate") or {}).get("user_prompt_library",
                                                                                  "user_prompt_library.json")
            library_path.write_text(json.dumps(library, indent=2, ensure_ascii=False) + "\n")
            report.files_written.append(str(library_path))
    return report

