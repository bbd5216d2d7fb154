"""Loading FLUX.2 components from a hub id or a local diffusers folder, with the same code for both.

Only the components a stage needs are loaded: text encoding loads no transformer or VAE, latent caching only the
VAE, training only the transformer, validation everything but the text encoder (prompts come from the cache).
The Hugging Face token is read by huggingface_hub from the environment or `huggingface-cli login`; it never
passes through our params.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ModelParams
from .errors import BaseModelRefused, DeviceUnavailable, ModelNotFound, UserError

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def torch_dtype(name: str) -> torch.dtype:
    return DTYPES[name]


def resolve_device(name: str = "auto") -> torch.device:
    """`model.device` as a torch device: "auto" is cuda when available, else cpu. DeviceUnavailable when it names
    an accelerator this machine (or this torch build) does not have."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise DeviceUnavailable(f"model.device: {name!r} is not a device name; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceUnavailable(
                f"model.device: {name!r}, but CUDA is not available here (torch {torch.__version__}, "
                f"{'built without CUDA' if torch.version.cuda is None else 'no GPU visible'}); set model.device: auto "
                "(cuda when there is one) or cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceUnavailable(f"model.device: {name!r}, but this machine has {torch.cuda.device_count()} CUDA "
                                    f"device(s) (cuda:0..cuda:{torch.cuda.device_count() - 1}); pick one of them")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceUnavailable(f"model.device: {name!r}, but MPS is not available here; set model.device: auto or cpu")
    return device


@contextlib.contextmanager
def model_errors(model: ModelParams):
    """Turn a stage's failure to load `model.pretrained_model_name_or_path` into ModelNotFound naming the key and
    what to do, when the model is really not there: no such local folder, not in the Hub cache, and the Hub lookup
    fails (no such repo, no access, or no connection). Any other error passes unchanged."""
    try:
        yield
    except (OSError, ValueError) as e:
        # diffusers says ValueError for a path that is no repo id either ("/abs/missing"): only when it names it;
        # a missing file that is not the model's (a stage's input: "run prepare first") keeps its own message
        names_model = str(model.model_path) in str(e)
        if isinstance(e, ModelNotFound) or (not names_model and (isinstance(e, (UserError, FileNotFoundError)) or
                                                                 not isinstance(e, OSError))):
            raise
        lookup = _why_model_unavailable(model)
        if lookup is None:
            raise
        raise ModelNotFound(
            f"model.pretrained_model_name_or_path: {model.model_path!r} is not a local folder (relative to "
            f"params.yaml) and the Hugging Face Hub lookup failed ({lookup}). Point it at a diffusers FLUX.2 folder "
            "(e.g. one written by `flux2lora make-tiny-model`) or a Hub id (e.g. black-forest-labs/FLUX.2-klein-base-4B); "
            "gated repos need `huggingface-cli login`, and with HF_HUB_OFFLINE=1 only models already in the Hub "
            "cache load") from e


def _why_model_unavailable(model: ModelParams) -> str | None:
    """Why the base model cannot be had, or None when it can (a local folder, a Hub-cache copy, or a Hub repo that
    answers): then a loading error has another cause."""
    path = model.model_path
    if Path(path).is_dir():
        return None
    from huggingface_hub import model_info, try_to_load_from_cache

    try:
        if isinstance(try_to_load_from_cache(path, "model_index.json", revision=model.revision), str):
            return None
        model_info(path, revision=model.revision)
    except Exception as lookup:  # HFValidationError, RepositoryNotFoundError, GatedRepoError, OfflineModeIsEnabled
        text = str(lookup).strip().splitlines()
        return f"{type(lookup).__name__}: {text[0]}" if text else type(lookup).__name__
    return None


def pipeline_class(model: ModelParams):
    import diffusers

    return getattr(diffusers, model.flavour.pipeline_class)


def _common(model: ModelParams) -> dict:
    return dict(revision=model.revision, dtype=torch_dtype(model.base_model_default_dtype))


@dataclass(frozen=True)
class Source:
    """Where one component's files are: a hub id or local folder, the subfolder in it ("" = its root), a revision."""

    path: str
    subfolder: str
    revision: str | None

    def __str__(self) -> str:
        where = f"{self.path}/{self.subfolder}" if self.subfolder else self.path
        return f"{where}@{self.revision}" if self.revision else where

    def kwargs(self) -> dict:
        return dict(subfolder=self.subfolder, revision=self.revision)


def text_encoder_source(model: ModelParams) -> Source:
    """The text encoder's files: `model.pretrained_text_encoder_name_or_path` (root unless `text_encoder_subfolder`)
    or the base model's text_encoder/."""
    if model.pretrained_text_encoder_name_or_path:
        return Source(model.text_encoder_path, model.text_encoder_subfolder or "",
                      model.text_encoder_revision)
    return Source(model.model_path, model.text_encoder_subfolder or "text_encoder",
                  model.text_encoder_revision or model.revision)


def tokenizer_source(model: ModelParams) -> Source:
    """The tokenizer's files: `model.pretrained_tokenizer_name_or_path` (root unless `tokenizer_subfolder`) or the
    base model's tokenizer/."""
    if model.pretrained_tokenizer_name_or_path:
        return Source(model.tokenizer_path, model.tokenizer_subfolder or "",
                      model.tokenizer_revision)
    return Source(model.model_path, model.tokenizer_subfolder or "tokenizer",
                  model.tokenizer_revision or model.revision)


def optional_file(source: Source, filename: str) -> Path | None:
    """`filename` in `source` (a local folder, or the hub through huggingface_hub's cache), None when absent."""
    from transformers.utils import cached_file

    resolved = cached_file(source.path, filename, subfolder=source.subfolder, revision=source.revision,
                           _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False)
    return Path(resolved) if resolved else None


def load_text_pipeline(model: ModelParams, device: torch.device, tokenizer=None):
    """The flavour's diffusers pipeline with only its tokenizer and full text encoder (every layer; the vision tower
    for dev), from `text_encoder_source` / `tokenizer_source`: its `encode_prompt` is the reference for ours.

    tokenizer: default AutoTokenizer on the tokenizer folder. dev's is a PixtralProcessor, which transformers 5
    builds only with torchvision: pass a processor (or an equivalent) for dev."""
    import transformers

    src = text_encoder_source(model)
    text_encoder = getattr(transformers, model.flavour.text_encoder_class).from_pretrained(
        src.path, **src.kwargs(), dtype=torch_dtype(model.base_model_default_dtype)).eval()
    if tokenizer is None:
        tok = tokenizer_source(model)
        tokenizer = transformers.AutoTokenizer.from_pretrained(tok.path, **tok.kwargs())
    # Built from its components rather than from_pretrained: diffusers checks each passed component against
    # model_index.json's class, and PixtralProcessor without torchvision is a placeholder that check rejects.
    pipe = pipeline_class(model)(scheduler=None, vae=None, text_encoder=text_encoder.to(device), tokenizer=tokenizer,
                                 transformer=None)
    return pipe


def load_vae(model: ModelParams, device: torch.device, group_offload: bool = False):
    """The VAE on `device`; group_offload: its weights stay in CPU memory and each layer is copied to `device` as
    it runs (leaf level: the VAE's encoder is one module, not a list of blocks)."""
    from diffusers import AutoencoderKLFlux2

    vae = AutoencoderKLFlux2.from_pretrained(model.model_path, subfolder="vae", **_common(model)).eval()
    if group_offload:
        apply_group_offload(vae, device, "leaf_level", use_stream=device.type == "cuda")
        return vae
    return vae.to(device)


def load_transformer(model: ModelParams, device: torch.device):
    from diffusers import Flux2Transformer2DModel

    return Flux2Transformer2DModel.from_pretrained(model.model_path, subfolder="transformer", **_common(model)).to(device)


def load_generation_pipeline(model: ModelParams, device: torch.device | None = None, transformer=None):
    """The flavour's pipeline for rendering from prompt embeddings, the one builder of validation, validation during
    training and `generate`: no text encoder or tokenizer (prompts come encoded), the given `transformer` (the one
    being trained) or the base model's. On `device` when given; else in CPU memory, for `place_pipeline`."""
    extra = {} if transformer is None else dict(transformer=transformer)
    pipe = pipeline_class(model).from_pretrained(model.model_path, text_encoder=None, tokenizer=None, **extra,
                                                 **_common(model))
    if device is not None:
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# What generation needs on the GPU beyond the weights it holds at once: activations at 1024x1024 (a few GiB for dev's
# 8+48 blocks in bf16), the CUDA context (~0.5 GiB) and the caching allocator's reserve. An estimate, not a
# measurement: issue 11's planner work calibrates headroom on the anchors.
GENERATION_HEADROOM_BYTES = 6 * 2**30
PLACEMENTS = ("device", "model_cpu_offload", "group_offload")


def gpu_memory_bytes(device: torch.device) -> int | None:
    """Total memory of `device` if it is a CUDA GPU (None on the CPU)."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).total_memory


def choose_placement(component_bytes: dict[str, int], gpu_bytes: int | None,
                     headroom: int = GENERATION_HEADROOM_BYTES) -> str:
    """Where a generation pipeline's weights live while it runs.

    "device": everything on the device (it fits, or there is no GPU: gpu_bytes None). "model_cpu_offload": each
    component moves to the GPU while it runs (the largest one fits alone). "group_offload": the transformer's blocks
    move one at a time (not even the largest component fits)."""
    if gpu_bytes is None or sum(component_bytes.values()) + headroom <= gpu_bytes:
        return "device"
    if max(component_bytes.values()) + headroom <= gpu_bytes:
        return "model_cpu_offload"
    return "group_offload"


def place_pipeline(pipe, device: torch.device, gpu_bytes: int | None = None, placement: str | None = None) -> str:
    """Put a pipeline loaded in CPU memory where it fits (`choose_placement`) and return the placement chosen.

    gpu_bytes: the GPU's memory (default: the device's total memory; injectable so a CPU test can say "the GPU is
    smaller than the pipeline"). Group offload stays on the CPU device too (the hooks then copy nothing, and a test
    shows the hooks produce the same image). Call after loading LoRAs: offload hooks move only the weights that
    exist when they are installed."""
    components = {name: parameter_bytes(module) for name, module in pipe.components.items()
                  if isinstance(module, torch.nn.Module)}
    if gpu_bytes is None:
        gpu_bytes = gpu_memory_bytes(device)
    placement = placement or choose_placement(components, gpu_bytes)
    if placement == "device":
        pipe.to(device)
    elif placement == "model_cpu_offload":
        pipe.enable_model_cpu_offload(device=device)
    elif placement == "group_offload":
        pipe.enable_group_offload(onload_device=device, offload_device=torch.device("cpu"),
                                  offload_type="block_level", num_blocks_per_group=1,
                                  use_stream=device.type == "cuda")
    else:
        raise ValueError(f"placement {placement!r} is not one of {', '.join(PLACEMENTS)}")
    log.info("pipeline placement: %s (weights %.2f GiB, GPU %s)", placement, sum(components.values()) / 2**30,
             "none" if gpu_bytes is None else f"{gpu_bytes / 2**30:.1f} GiB")
    return placement


def component_identity(model: ModelParams, component: str) -> str:
    """A short string that changes whenever the weights of `component` change, for cache keys.

    Hub ids: repo + revision + component. Local folders: the component's config plus the size and first MiB of each
    weight file (different random seeds or fine-tunes differ there; hashing whole multi-GB files would cost minutes).
    """
    if component == "text_encoder" and (model.pretrained_text_encoder_name_or_path or model.text_encoder_subfolder
                                        or model.text_encoder_revision or model.pretrained_tokenizer_name_or_path
                                        or model.tokenizer_subfolder or model.tokenizer_revision):
        # the text encoder or tokenizer come from elsewhere: both shape the embeddings
        return f"{_source_identity(text_encoder_source(model))}+tokenizer:{_source_identity(tokenizer_source(model))}"
    return _source_identity(Source(model.model_path, component, model.revision), component)


def _source_identity(source: Source, label: str | None = None) -> str:
    local = Path(source.path)
    if not local.is_dir():
        if label is not None:  # the historical form for base model components (keeps existing cache keys)
            return f"{source.path}@{source.revision or 'main'}/{label}"
        return f"{source.path}@{source.revision or 'main'}/{source.subfolder}"
    folder = local / source.subfolder if source.subfolder else local
    h = hashlib.sha256()
    for path in sorted(folder.glob("*")):
        if path.suffix in (".json", ".safetensors", ".bin", ".txt", ".jinja"):
            h.update(path.name.encode())
            h.update(str(path.stat().st_size).encode())
            with open(path, "rb") as f:
                h.update(f.read(1 << 20))
    return f"local:{label or source.subfolder or 'root'}:{h.hexdigest()[:16]}"


def describe_model(model: ModelParams) -> dict:
    """The base model's identity for metadata and model cards.

    A step-distilled klein base trained on with `model.allow_distilled` adds "distilled": "true" and
    "distilled_warning" (a sentence for the model card); a separate text encoder or tokenizer adds "text_encoder",
    "tokenizer" and their subfolder / revision when set."""
    info = {"base_model": model.model_id, "revision": model.revision or "main", "flavour": model.model_flavour}
    tiny_marker = Path(model.model_path) / "flux2lora_tiny.json"
    if tiny_marker.exists():
        info["tiny"] = json.loads(tiny_marker.read_text())
    # as written (no local absolute path): `flux2lora generate` loads the same encoder and tokenizer from them
    for key, value in (("text_encoder", model.pretrained_text_encoder_name_or_path),
                       ("text_encoder_subfolder", model.text_encoder_subfolder),
                       ("text_encoder_revision", model.text_encoder_revision),
                       ("tokenizer", model.pretrained_tokenizer_name_or_path),
                       ("tokenizer_subfolder", model.tokenizer_subfolder),
                       ("tokenizer_revision", model.tokenizer_revision)):
        if value:
            info[key] = value
    if model.flavour.is_klein and is_distilled(model):
        info["distilled"] = "true"
        info["distilled_warning"] = (
            f"Trained on the step-distilled {model.model_id} (model.allow_distilled): LoRAs trained on distilled "
            f"klein often come out gray or need strength 1.5-2; {base_repo_for(model)} is the base repo to train on.")
    return info


# The step-distilled klein repos (4-step inference, no CFG) and the undistilled base repos LoRAs are trained on.
DISTILLED_REPOS = {
    "black-forest-labs/FLUX.2-klein-4B": "black-forest-labs/FLUX.2-klein-base-4B",
    "black-forest-labs/FLUX.2-klein-9B": "black-forest-labs/FLUX.2-klein-base-9B",
}


def model_index(model: ModelParams) -> dict | None:
    """The base model's model_index.json (None if it cannot be read: not downloaded and offline)."""
    path = optional_file(Source(model.model_path, "", model.revision), "model_index.json")
    return json.loads(path.read_text()) if path is not None else None


def is_distilled(model: ModelParams) -> bool:
    """Whether the base model is a step-distilled klein repo: a known id, or `is_distilled: true` in its
    model_index.json."""
    if model.model_path.rstrip("/") in DISTILLED_REPOS:
        return True
    index = model_index(model) or {}
    return bool(index.get("is_distilled", False))


def base_repo_for(model: ModelParams) -> str:
    """The undistilled base repo of the model's flavour (the real flavour's for tiny-*)."""
    from .flavours import get_flavour

    return DISTILLED_REPOS.get(model.model_path.rstrip("/")) or \
        get_flavour(model.model_flavour.removeprefix("tiny-")).default_repo


def check_not_distilled(model: ModelParams) -> None:
    """Refuse to train (or cache for training) on a step-distilled klein repo unless `model.allow_distilled`.

    Raises BaseModelRefused (a ValueError) naming the base repo to use; with allow_distilled it logs a warning and returns."""
    if not model.flavour.is_klein or not is_distilled(model):
        return
    if model.allow_distilled:
        log.warning("model.allow_distilled: training on the step-distilled %s; LoRAs trained on distilled klein "
                    "often come out gray or need strength 1.5-2 (the base repo is %s)", model.model_path,
                    base_repo_for(model))
        return
    raise BaseModelRefused(
        f"model.pretrained_model_name_or_path: {model.model_path} is a step-distilled klein repo (is_distilled in "
        f"its model_index.json): LoRAs trained on it come out gray or need strength 1.5-2. Train on the base repo "
        f"{base_repo_for(model)} instead, or set model.allow_distilled: true to train on it anyway")


QUANTO_PRECISIONS = {"int8-quanto": "qint8", "int4-quanto": "qint4"}
BASE_PRECISIONS = ("no_change", *QUANTO_PRECISIONS, "fp8-torchao")
# Only the transformer blocks are quantized: the embedders, modulation and output projection are a small share of
# the weights and the most precision-sensitive (the anchors' int8 numbers were measured the same way).
QUANTIZED_MODULES = ["transformer_blocks.*", "single_transformer_blocks.*"]


def _quantize_fp8(transformer, device: torch.device) -> None:
    """torchao float8 (e4m3, per-row scales) weights in the blocks' Linear layers; activations stay bf16.

    Weight-only: the frozen base halves in size against bf16 and its backward (input gradients for the LoRA below
    it) is the plain bf16 one. CUDA needs compute capability 8.9+ (Ada, Hopper, Blackwell) for float8 tensors; on
    the CPU torchao emulates them (correct, slow: for tests)."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        major, minor = torch.cuda.get_device_capability(device)
        raise ValueError(f"train.base_model_precision: fp8-torchao needs a GPU with compute capability 8.9 or newer "
                         f"(Ada, Hopper, Blackwell); {torch.cuda.get_device_name(device)} has {major}.{minor}. "
                         "Use int8-quanto instead")
    try:
        from torchao.quantization import Float8WeightOnlyConfig, quantize_
    except ImportError:
        raise ValueError("train.base_model_precision: fp8-torchao needs torchao: pip install torchao") from None
    for module_list in (transformer.transformer_blocks, transformer.single_transformer_blocks):
        quantize_(module_list, Float8WeightOnlyConfig(),
                  filter_fn=lambda module, name: isinstance(module, torch.nn.Linear))


def load_training_transformer(model: ModelParams, device: torch.device, base_model_precision: str | None = None,
                              quantize_via: str = "accelerator", *, group_offload: dict | None = None,
                              offload_during_startup: bool = False):
    """The frozen transformer to train a LoRA on: its blocks' weights optionally quantized (optimum-quanto int8 /
    int4, torchao fp8) and optionally group-offloaded.

    quantize_via: "cpu" quantizes before moving to the device (the full-precision weights never occupy the GPU);
    "accelerator" moves first and quantizes there (faster on a GPU that has the room).
    offload_during_startup: everything is loaded and quantized on the CPU; the model reaches the device once ready.
    group_offload: keyword arguments of `apply_group_offload` (type, blocks_per_group, use_stream): the weights stay
    in CPU memory and the hooks copy each group to `device` when it runs. The caller attaches the LoRA afterwards
    and keeps it on `device` (the hooks only move the weights that existed when they were installed).
    """
    precision = None if base_model_precision in (None, "no_change", model.base_model_default_dtype) \
        else base_model_precision
    if precision is not None and precision not in BASE_PRECISIONS:
        raise ValueError(f"train.base_model_precision: {base_model_precision!r} is not supported; choose one of "
                         f"{', '.join(BASE_PRECISIONS)}")
    check_not_distilled(model)
    on_cpu_first = offload_during_startup or group_offload is not None or quantize_via == "cpu"
    staging = torch.device("cpu") if on_cpu_first else device
    transformer = load_transformer(model, staging).requires_grad_(False)
    if precision in QUANTO_PRECISIONS:
        from optimum import quanto

        quanto.quantize(transformer, weights=getattr(quanto, QUANTO_PRECISIONS[precision]),
                        include=QUANTIZED_MODULES)
        quanto.freeze(transformer)
    elif precision == "fp8-torchao":
        _quantize_fp8(transformer, device)
    if group_offload is not None:
        apply_group_offload(transformer, device, **group_offload)
        return transformer
    return transformer.to(device)


def apply_group_offload(module: torch.nn.Module, device: torch.device, offload_type: str = "block_level",
                        blocks_per_group: int = 1, use_stream: bool = False) -> None:
    """diffusers' group offloading: `module`'s weights go to (pinned) CPU memory and are copied to `device` one
    group at a time, just before the group runs. use_stream (CUDA only) prefetches the next group on a side stream;
    elsewhere it is ignored with a warning, as there is no stream to overlap with."""
    import warnings

    from diffusers.hooks import apply_group_offloading

    if use_stream and device.type != "cuda":
        warnings.warn(f"group_offload_use_stream is ignored on {device.type}: streams need CUDA", UserWarning,
                      stacklevel=2)
        use_stream = False
    apply_group_offloading(module.to("cpu"), onload_device=device, offload_device=torch.device("cpu"),
                           offload_type=offload_type,
                           num_blocks_per_group=blocks_per_group if offload_type == "block_level" else None,
                           use_stream=use_stream)


def parameter_bytes(module: torch.nn.Module) -> int:
    """Bytes actually held by a module's parameters (quantized weights count their packed data and scales)."""
    total = 0
    for param in module.parameters():
        data = getattr(param, "data", param)
        inner_names = data.__tensor_flatten__()[0] if hasattr(data, "__tensor_flatten__") else None
        if inner_names:
            stack = [getattr(data, name) for name in inner_names]
            while stack:
                t = stack.pop()
                names = t.__tensor_flatten__()[0] if hasattr(t, "__tensor_flatten__") else None
                if names:
                    stack += [getattr(t, n) for n in names]
                else:
                    total += t.numel() * t.element_size()
        else:
            total += param.numel() * param.element_size()
    return total
