"""The model card (README.md) published beside a LoRA. It never contains tokens, keys or environment values."""

from __future__ import annotations

LICENCE_NOTES = {
    "apache-2.0": "The base model is released under Apache-2.0; this LoRA may be used commercially.",
    "flux-non-commercial-license": "The base model is under the FLUX Non-Commercial License: non-commercial use only.",
    "flux-dev-non-commercial-license": "The base model is under the FLUX.1 [dev] Non-Commercial License: "
                                       "non-commercial use only.",
}


def model_card(*, base_model: str, flavour: str, pipeline_class: str, licence: str, trigger_phrase: str,
               rank: int, alpha: float, steps: int, final_loss: float, dataset_hash: str, run_id: str,
               grid_file: str | None) -> str:
    """Markdown with YAML front matter (what the Hugging Face Hub reads) and a diffusers loading example."""
    trigger = trigger_phrase or "(none)"
    prompt = f"{trigger_phrase}, " if trigger_phrase else ""
    sample = f"\n![validation samples]({grid_file})\n" if grid_file else ""
    return f"""---
base_model: {base_model}
library_name: diffusers
license: {licence}
tags:
- flux2
- lora
- text-to-image
- flux2lora
instance_prompt: {trigger_phrase or "null"}
---

# FLUX.2 {flavour} LoRA

Trained with flux2lora on `{base_model}` ({flavour}).

| | |
|---|---|
| trigger phrase | {trigger} |
| rank / alpha | {rank} / {alpha:g} |
| training steps | {steps} |
| final loss | {final_loss:.4f} |
| dataset (DVC hash) | `{dataset_hash}` |
| MLflow run | `{run_id}` |
{sample}
## Use it with diffusers

```python
import torch
from diffusers import {pipeline_class}

pipe = {pipeline_class}.from_pretrained("{base_model}", torch_dtype=torch.bfloat16).to("cuda")
pipe.load_lora_weights("path/or/repo-of-this-lora", weight_name="pytorch_lora_weights.safetensors")
image = pipe("{prompt}a photo", num_inference_steps=28).images[0]
```

## Licence

{LICENCE_NOTES.get(licence, "See the base model's licence.")}
"""
