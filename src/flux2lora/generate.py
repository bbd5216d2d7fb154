"""Try a LoRA: one image from a text prompt with the flavour's diffusers pipeline and the LoRA loaded.

The base model and flavour are read from the LoRA file's metadata (`flux2lora.base_model`, `flux2lora.revision`,
`flux2lora.flavour`, written by the train stage into both the diffusers and the BFL file), so
`flux2lora generate --lora FILE --prompt ...` needs nothing else; `model_path` / `flavour` override them (and are
required for LoRA files from other trainers). Unlike validation, this loads the text encoder: prompts are free text.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from .flavours import Flavour, get_flavour
from .models import DTYPES, resolve_device

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BaseModel:
    path: str  # hub id or local diffusers folder
    revision: str | None
    flavour: Flavour


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
    rev = revision or (meta.get("flux2lora.revision") if not model_path else None)
    return BaseModel(path=path, revision=None if rev in (None, "", "main") else rev, flavour=get_flavour(name))


def load_pipeline(base: BaseModel, device: torch.device, dtype: torch.dtype):
    """The flavour's full diffusers pipeline (text encoder included) on `device`."""
    import diffusers

    pipe = getattr(diffusers, base.flavour.pipeline_class).from_pretrained(base.path, revision=base.revision,
                                                                           dtype=dtype)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(prompt: str, lora: Path | None = None, *, scale: float = 1.0, seed: int = 0, width: int = 1024,
             height: int = 1024, num_inference_steps: int = 50, guidance: float = 4.0, negative_prompt: str = "",
             model_path: str | None = None, flavour: str | None = None, revision: str | None = None,
             device: str = "auto", dtype: str | None = None) -> Image.Image:
    """One image for `prompt` with the LoRA at strength `scale` (lora=None: the base model alone).

    `guidance`: dev's distilled guidance; klein base's true CFG scale (against `negative_prompt`). The seed fixes the
    initial noise (a CPU generator: the same image on every device). `dtype`: "bf16" | "fp16" | "fp32"; default
    bf16 on GPUs, fp32 on CPUs.
    """
    base = base_model_of(lora, model_path, flavour, revision)
    target = resolve_device(device)
    torch_dtype = DTYPES[dtype or ("bf16" if target.type == "cuda" else "fp32")]
    pipe = load_pipeline(base, target, torch_dtype)
    layers = base.flavour.stacked_layers
    kwargs = dict(width=width, height=height, num_inference_steps=num_inference_steps, guidance_scale=guidance,
                  generator=torch.Generator("cpu").manual_seed(seed), text_encoder_out_layers=layers)
    if negative_prompt:
        if not base.flavour.is_klein:
            raise ValueError("generate: dev uses distilled guidance and takes no negative prompt")
        kwargs["negative_prompt_embeds"] = pipe.encode_prompt(prompt=negative_prompt, device=target,
                                                              text_encoder_out_layers=layers)[0]
    if lora is not None:
        lora = Path(lora)
        pipe.load_lora_weights(str(lora.parent), weight_name=lora.name, adapter_name="lora")
        pipe.set_adapters(["lora"], adapter_weights=[scale])
        pipe.transformer.eval()  # peft adds the adapter's layers (and their dropout) in train mode
    with torch.inference_mode():
        return pipe(prompt=prompt, **kwargs).images[0]
