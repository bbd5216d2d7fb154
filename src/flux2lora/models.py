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
from pathlib import Path

import torch

from .config import ModelParams
from .errors import DeviceUnavailable, ModelNotFound, UserError

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
        # diffusers says ValueError for a path that is no repo id either ("/abs/missing"): only when it names it
        if isinstance(e, UserError) or (not isinstance(e, OSError) and str(model.model_path) not in str(e)):
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


def load_text_pipeline(model: ModelParams, device: torch.device):
    """The flavour's pipeline with only tokenizer + text encoder loaded (its `encode_prompt` is the reference)."""
    pipe = pipeline_class(model).from_pretrained(model.model_path, transformer=None, vae=None, **_common(model))
    pipe.text_encoder.to(device)
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


def load_generation_pipeline(model: ModelParams, device: torch.device, with_text_encoder: bool = False,
                             move: bool = True):
    """The full pipeline for image generation; without the text encoder unless asked (validation uses cached prompts).
    move=False leaves it in CPU memory (for offloading)."""
    extra = {} if with_text_encoder else dict(text_encoder=None, tokenizer=None)
    pipe = pipeline_class(model).from_pretrained(model.model_path, **extra, **_common(model))
    if move:
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def component_identity(model: ModelParams, component: str) -> str:
    """A short string that changes whenever the weights of `component` change, for cache keys.

    Hub ids: repo + revision + component. Local folders: the component's config plus the size and first MiB of each
    weight file (different random seeds or fine-tunes differ there; hashing whole multi-GB files would cost minutes).
    """
    local = Path(model.model_path)
    if not local.is_dir():
        return f"{model.model_path}@{model.revision or 'main'}/{component}"
    folder = local / component
    h = hashlib.sha256()
    for path in sorted(folder.glob("*")):
        if path.suffix in (".json", ".safetensors", ".bin"):
            h.update(path.name.encode())
            h.update(str(path.stat().st_size).encode())
            with open(path, "rb") as f:
                h.update(f.read(1 << 20))
    return f"local:{component}:{h.hexdigest()[:16]}"


def describe_model(model: ModelParams) -> dict:
    """The base model's identity for metadata and model cards."""
    info = {"base_model": model.model_path, "revision": model.revision or "main", "flavour": model.model_flavour}
    tiny_marker = Path(model.model_path) / "flux2lora_tiny.json"
    if tiny_marker.exists():
        info["tiny"] = json.loads(tiny_marker.read_text())
    return info


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
