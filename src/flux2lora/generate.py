"""Try a LoRA: one image from a text prompt with the flavour's diffusers pipeline and the LoRA loaded.

The base model and flavour are read from the LoRA file's metadata (`flux2lora.base_model`, `flux2lora.revision`,
`flux2lora.flavour`, written by the train stage into both the diffusers and the BFL file), so
`flux2lora generate --lora FILE --prompt ...` needs nothing else; `model_path` / `flavour` override them (and are
required for LoRA files from other trainers). Unlike validation, this encodes the prompt: prompts are free text.

It fits the GPU the model card sends users to: the prompt is encoded first with our `PromptEncoder` (tokenizer
checked before any weight, dev without torchvision, the encoder cut after its deepest stacked layer and freed
before the pipeline loads), then the pipeline without its text encoder is placed where it fits
(`models.place_pipeline`: on the device, model CPU offload, or group offload). One log line says model, flavour,
device, dtype and LoRA scale; a progress bar follows the denoising steps (diffusers' own), or, given a
`progress` callback, that callback is told each phase, each denoising step and each finished image instead.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import torch
from PIL import Image

from .config import ModelParams
from .flavours import Flavour, get_flavour
from .models import DTYPES, GENERATION_HEADROOM_BYTES, load_generation_pipeline, place_pipeline, resolve_device
from .models import gpu_memory_bytes as device_memory_bytes

log = logging.getLogger(__name__)


# The ModelParams fields naming a separate text encoder / tokenizer, by their key in the LoRA's flux2lora metadata.
ENCODER_METADATA = {"text_encoder": "pretrained_text_encoder_name_or_path",
                    "text_encoder_subfolder": "text_encoder_subfolder",
                    "text_encoder_revision": "text_encoder_revision",
                    "tokenizer": "pretrained_tokenizer_name_or_path", "tokenizer_subfolder": "tokenizer_subfolder",
                    "tokenizer_revision": "tokenizer_revision"}


@dataclass(frozen=True)
class BaseModel:
    path: str  # hub id or local diffusers folder
    revision: str | None
    flavour: Flavour
    # ModelParams fields of a separate text encoder / tokenizer the LoRA was trained with (dev's Mistral repo)
    encoder: dict[str, str] = field(default_factory=dict)


def base_model_of(lora: Path | None, model_path: str | None = None, flavour: str | None = None,
                  revision: str | None = None) -> BaseModel:
    """The base model a LoRA was trained on, from its metadata; explicit arguments win."""
    meta: dict[str, str] = {}
    if lora is not None:
        from .train.lora import read_lora_metadata

        meta = read_lora_metadata(Path(lora))
    path = model_path or meta.get("flux2lora.base_model")
    name = flavour or meta.get("flux2lora.flavour")
    if not path or not name:
        raise ValueError("generate: the LoRA file does not name its base model (no flux2lora metadata); pass "
                         "--model (hub id or folder) and --flavour (klein-4b | klein-9b | dev)")
    if not model_path and lora is not None:
        path = _project_folder(path, Path(lora))
    rev = revision or (meta.get("flux2lora.revision") if not model_path else None)
    encoder = {}
    if not model_path and lora is not None:  # another base model given: its own text encoder, not the recorded one
        encoder = {field_name: meta[f"flux2lora.{key}"] for key, field_name in ENCODER_METADATA.items()
                   if meta.get(f"flux2lora.{key}")}
        for field_name in ("pretrained_text_encoder_name_or_path", "pretrained_tokenizer_name_or_path"):
            if field_name in encoder:
                encoder[field_name] = _project_folder(encoder[field_name], Path(lora))
    return BaseModel(path=path, revision=None if rev in (None, "", "main") else rev, flavour=get_flavour(name),
                     encoder=encoder)


def _project_folder(path: str, lora: Path) -> str:
    """The metadata names a local base model as the training project's params.yaml did (relative to the project,
    so that a moved project's files stay true): resolve it against the working directory, else against the LoRA
    file's enclosing project (the nearest folder above it with a params.yaml). Hub ids are returned unchanged."""
    if Path(path).is_absolute() or Path(path).is_dir():
        return path
    for folder in lora.resolve().parents:
        if (folder / "params.yaml").is_file() and (folder / path).is_dir():
            return str(folder / path)
    return path


def encode_prompts(model: ModelParams, prompts: list[str], device: torch.device,
                   gpu_bytes: int | None) -> list[torch.Tensor]:
    """Prompt embeddings (1, 512, 3*D) per prompt, equal to the pipeline's `encode_prompt`; the encoder is group
    offloaded when it does not fit the GPU, and freed before returning."""
    import gc

    from .text_encoding import PromptEncoder

    encoder = PromptEncoder.from_pretrained(model, device=torch.device("cpu"))
    if device.type != "cpu":
        fits = gpu_bytes is None or encoder.parameter_bytes() + GENERATION_HEADROOM_BYTES <= gpu_bytes
        encoder.move_to(device, group_offload=not fits)
    embeds = [encoder.encode([p]) for p in prompts]
    del encoder
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return embeds


class GenerationProgress(Protocol):
    """What `generate_images` reports while it works (the CLI draws it as progress bars)."""

    def phase(self, description: str) -> None:
        """A step before denoising starts: encoding the prompt, loading the pipeline."""

    def step(self, image: int, step: int, total_steps: int) -> None:
        """Denoising step `step` (1-based) of `total_steps` of image `image` (0-based) finished."""

    def image_done(self, image: int, total_images: int) -> None:
        """Image `image` (0-based) of `total_images` decoded."""


def generate(prompt: str, lora: Path | None = None, *, seed: int = 0, **kwargs) -> Image.Image:
    """One image for `prompt` with the LoRA (see `generate_images` for the arguments)."""
    return generate_images(prompt, lora, seeds=[seed], **kwargs)[0]


def generate_images(prompt: str, lora: Path | None = None, *, seeds: list[int] = (0,), scale: float = 1.0, seed: int = 0, width: int = 1024,
             height: int = 1024, num_inference_steps: int = 50, guidance: float = 4.0, negative_prompt: str = "",
             model_path: str | None = None, flavour: str | None = None, revision: str | None = None,
             device: str = "auto", dtype: str | None = None, text_encoder_path: str | None = None,
             text_encoder_subfolder: str | None = None, gpu_memory_bytes: int | None = None,
             placement: str | None = None, progress: GenerationProgress | None = None) -> list[Image.Image]:
    """One image per seed for `prompt` with the LoRA at strength `scale` (lora=None: the base model alone); the
    prompt is encoded and the pipeline loaded once for all of them.

    `guidance`: dev's distilled guidance; klein base's true CFG scale (against `negative_prompt`, default the empty
    prompt, as the pipeline does). The seed fixes the initial noise (a CPU generator: the same image on every device).
    `dtype`: "bf16" | "fp16" | "fp32"; default bf16 on GPUs, fp32 on CPUs. text_encoder_path / _subfolder: dev's
    encoder from another repo (e.g. mistralai/Mistral-Small-3.1-24B-Instruct-2503); default: the text encoder and
    tokenizer the LoRA's metadata records (the ones it was trained with), else the base model's. gpu_memory_bytes: the GPU's
    size for placement decisions (default: the device's; a test can claim a small GPU). placement: force
    "device" | "model_cpu_offload" | "group_offload" (default: what fits). progress: told each phase, denoising
    step and finished image (diffusers' own progress bar is then off).
    """
    base = base_model_of(lora, model_path, flavour, revision)
    if negative_prompt and not base.flavour.is_klein:
        raise ValueError("generate: dev uses distilled guidance and takes no negative prompt")
    target = resolve_device(device)
    dtype_name = dtype or ("bf16" if target.type == "cuda" else "fp32")
    torch_dtype = DTYPES[dtype_name]
    gpu_bytes = gpu_memory_bytes if gpu_memory_bytes is not None else device_memory_bytes(target)
    log.info("generate: model %s, flavour %s, device %s, dtype %s, LoRA %s at scale %g", base.path, base.flavour.name,
             target, dtype_name, lora.name if lora is not None else "none", scale)
    encoder = base.encoder if text_encoder_path is None else {
        "pretrained_text_encoder_name_or_path": text_encoder_path, "text_encoder_subfolder": text_encoder_subfolder}
    model = ModelParams(model_flavour=base.flavour.name, pretrained_model_name_or_path=base.path,
                        revision=base.revision, base_model_default_dtype=dtype_name, **encoder)
    prompts = [prompt, negative_prompt] if base.flavour.is_klein else [prompt]
    if progress is not None:
        progress.phase("encoding the prompt")
    embeds = encode_prompts(model, prompts, target, gpu_bytes)

    if progress is not None:
        progress.phase("loading the pipeline")
    pipe = load_generation_pipeline(model)
    if lora is not None:
        lora = Path(lora)
        from .train.lora import load_adapter_weights

        load_adapter_weights(pipe, lora, "lora")  # LoRA, DoRA, LoKr: load_lora_weights; LoHa: peft
        pipe.set_adapters(["lora"], adapter_weights=[scale])
        pipe.transformer.eval()  # peft adds the adapter's layers (and their dropout) in train mode
    place_pipeline(pipe, target, gpu_bytes, placement)
    pipe.set_progress_bar_config(desc=f"generate {width}x{height}", disable=progress is not None)
    images = []
    for index, seed in enumerate(seeds):
        kwargs = dict(width=width, height=height, num_inference_steps=num_inference_steps, guidance_scale=guidance,
                      generator=torch.Generator("cpu").manual_seed(seed), prompt_embeds=embeds[0].to(torch_dtype))
        if base.flavour.is_klein:
            kwargs["negative_prompt_embeds"] = embeds[1].to(torch_dtype)
        if progress is not None:
            kwargs["callback_on_step_end"] = _step_callback(progress, index, num_inference_steps)
        with torch.inference_mode():
            images.append(pipe(**kwargs).images[0])
        if progress is not None:
            progress.image_done(index, len(seeds))
    return images


def _step_callback(progress: GenerationProgress, image: int, total_steps: int) -> Callable:
    """diffusers' callback_on_step_end: called after each denoising step with the step's index; returns the
    tensors it may replace (none)."""
    def on_step_end(pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        progress.step(image, step + 1, total_steps)
        return {}

    return on_step_end
