"""The model card (README.md) published beside a LoRA, on S3 and on the Hugging Face Hub.

Its YAML front matter is what the Hub reads (base_model, licence, tags, instance_prompt); the body says what the
LoRA is, how it was trained, and how to load it in diffusers and ComfyUI. It is built only from the arguments
below: never from the environment, so tokens and keys cannot end up in it.
"""

from __future__ import annotations

from dataclasses import dataclass

import yaml


@dataclass(frozen=True)
class Licence:
    hub_id: str  # the Hub's `license:` value; "other" with a name for licences the Hub does not list
    name: str
    note: str


LICENCES = {
    "apache-2.0": Licence("apache-2.0", "apache-2.0",
                          "The base model is released under Apache-2.0; this LoRA may be used commercially."),
    "flux-non-commercial-license": Licence(
        "other", "flux-non-commercial-license",
        "The base model is under the FLUX Non-Commercial License: this LoRA and its outputs are for "
        "non-commercial use only."),
    "flux-dev-non-commercial-license": Licence(
        "other", "flux-dev-non-commercial-license",
        "The base model is under the FLUX [dev] Non-Commercial License: this LoRA and its outputs are for "
        "non-commercial use only."),
}


def yaml_scalar(value: str | None) -> str:
    """A value for the front matter, quoted only when YAML needs it (a trigger phrase like "sks: dog")."""
    if value is None:
        return "null"
    return yaml.safe_dump(value, default_flow_style=True, width=1 << 30).removesuffix("\n...\n").strip()


def licence_of(licence: str) -> Licence:
    return LICENCES.get(licence, Licence("other", licence, "See the base model's licence."))


# LoKr / LoHa: (first tensor name, who loads the diffusers file, the ComfyUI file's layout)
LYCORIS_FILES = {
    "lokr": ("lokr_w1", "diffusers `load_lora_weights` (FLUX.2 pipelines; tested with diffusers 0.42.1 and peft "
             "0.21.2)", "SimpleTuner's LyCORIS layout (`lycoris_<module>.lokr_w1`, `.alpha`): q/k/v stay separate, "
             "ComfyUI applies each to its rows of the fused qkv"),
    "loha": ("hada_w1_a", "peft (diffusers 0.42.1 refuses LoHa keys): `flux2lora generate --lora`, or diffusers' "
             "`transformer.add_adapter(LoHaConfig(**config))` then peft's `set_peft_model_state_dict`",
             "BFL (`diffusion_model.double_blocks.N.img_attn.qkv.hada_w1_a`, `.alpha`; q/k/v fused exactly, rank "
             "3r)"),
}


def model_card(*, base_model: str, flavour: str, pipeline_class: str, licence: str, trigger_phrase: str,
               rank: int, alpha: float, steps: int, final_loss: float, dataset_hash: str, run_id: str,
               grid_file: str | None, diffusers_file: str = "pytorch_lora_weights.safetensors",
               bfl_file: str | None = None, repo_id: str | None = None, base_model_url: str | None = None,
               git_commit: str | None = None, warning: str | None = None, dora: bool = False, kind: str = "lora",
               selected_step: int | None = None, eval_loss: float | None = None) -> str:
    """Markdown with YAML front matter and loading examples.

    `repo_id`: where the card will live on the Hub (the examples load from it), else a local folder is assumed.
    `base_model_url`: a link to the base model's page (its licence text); omitted for local base models.
    `warning`: shown at the top (e.g. a LoRA trained on a step-distilled klein with model.allow_distilled).
    `dora`: a DoRA adapter, which ComfyUI does not apply as trained (its row says diffusers / peft only).
    `selected_step`: with train.checkpoint_selection best_eval, the step whose LoRA this is (lowest eval loss);
    `eval_loss`: that LoRA's evaluation loss.
    """
    lic = licence_of(licence)
    trigger = trigger_phrase or "(none)"
    prompt = f"{trigger_phrase}, " if trigger_phrase else ""
    source = repo_id or "path/to/this/folder"
    licence_front = f"license: {lic.hub_id}"
    if lic.hub_id == "other":
        licence_front += f"\nlicense_name: {lic.name}" + (f"\nlicense_link: {base_model_url}" if base_model_url else "")
    sample = f"\n![validation samples: base model and with the LoRA]({grid_file})\n" if grid_file else ""
    if warning:
        sample = f"\n> **Warning:** {warning}\n" + sample
    # Which file for which tool. Both hold the trained strength in their weights (alpha / rank multiplied into B),
    # so every reader applies the trained delta at strength 1.0, whether it reads the peft metadata or not.
    files = (f"| `{diffusers_file}` | diffusers (`transformer.<module>.lora_A/B.weight`, peft config in "
             "`lora_adapter_metadata`) | diffusers `load_lora_weights` (FLUX.2 pipelines; tested with diffusers "
             "0.42.1 and peft 0.21.2); ComfyUI's LoRA loaders (they read this layout; the scale is in the weights, "
             "so the strength is right without `.alpha` tensors) |\n")
    if dora:
        files = (f"| `{diffusers_file}` | diffusers (`transformer.<module>.lora_A/B.weight` and "
                 "`.lora_magnitude_vector`, peft config with `use_dora` in `lora_adapter_metadata`) | diffusers "
                 "`load_lora_weights` (FLUX.2 pipelines; tested with diffusers 0.42.1 and peft 0.21.2) and peft |\n")
    if kind in LYCORIS_FILES:
        files = (f"| `{diffusers_file}` | diffusers / peft (`transformer.<module>.{LYCORIS_FILES[kind][0]}`..., "
                 f"peft's {kind} config in `lora_adapter_metadata`) | {LYCORIS_FILES[kind][1]} |\n")
        if bfl_file:
            files += f"| `{bfl_file}` | {LYCORIS_FILES[kind][2]} | ComfyUI's LoRA loaders (LyCORIS names) |\n"
    elif bfl_file:
        files += (f"| `{bfl_file}` | BFL (`diffusion_model.double_blocks.N.img_attn.qkv...`, q/k/v fused) | "
                  "ComfyUI's native FLUX.2 model (the layout ComfyUI v0.29 documents), ai-toolkit and BFL's "
                  "reference code; diffusers converts it on load |\n")
    comfy_diffusers = (f"`{diffusers_file}` works there too, at\nthe same strength." if kind not in LYCORIS_FILES
                       else f"Not `{diffusers_file}`: its scale is in its peft config, which ComfyUI\ndoes not read.")
    comfy = (f"""
## Use it in ComfyUI

Copy `{bfl_file}` into `ComfyUI/models/loras/` and apply it to the FLUX.2 {flavour} model with a
*LoraLoaderModelOnly* node at strength 1.0 (lower it to weaken the effect). {comfy_diffusers}
""" if bfl_file else "")
    load_line = (f'pipe.load_lora_weights("{source}", weight_name="{diffusers_file}", adapter_name="lora")'
                 if kind != "loha" else "from flux2lora.train.lora import load_adapter_weights  # LoHa: diffusers "
                 f"refuses its keys; peft loads it\nload_adapter_weights(pipe, \"{diffusers_file}\", \"lora\")")
    same = (f"Both files give the same weight change at strength 1.0 (alpha / rank = {alpha / rank:g} is already "
            "applied in B)." if kind not in LYCORIS_FILES else
            f"A {kind} adapter (train.lora_type {kind}). Both files give the same weight change at strength 1.0: "
            "the diffusers file through its peft config's alpha, the ComfyUI file with the scale in its weights.")
    commit_row = f"| git commit | `{git_commit}` |\n" if git_commit else ""
    if selected_step is not None:
        commit_row = f"| published checkpoint | step {selected_step} (lowest eval loss) |\n" + commit_row
    if eval_loss is not None:
        commit_row = f"| eval loss | {eval_loss:.4f} |\n" + commit_row
    return f"""---
base_model: {yaml_scalar(base_model)}
library_name: diffusers
{licence_front}
pipeline_tag: text-to-image
tags:
- flux2
- flux2-{flavour.removeprefix("tiny-")}
- lora
- text-to-image
- flux2lora
instance_prompt: {yaml_scalar(trigger_phrase or None)}
---

# FLUX.2 {flavour} LoRA

A LoRA for `{base_model}` (FLUX.2 {flavour}), trained with flux2lora.

| | |
|---|---|
| base model | `{base_model}` ({flavour}) |
| trigger phrase | {trigger} |
| rank / alpha | {rank} / {alpha:g} |
| training steps | {steps} |
| final loss | {final_loss:.4f} |
| dataset (DVC hash) | `{dataset_hash}` |
| MLflow run | `{run_id}` |
{commit_row}{sample}
## Files

{same}

| file | format | load it with |
|---|---|---|
{files}
## Use it with diffusers

```python
import torch
from diffusers import {pipeline_class}

pipe = {pipeline_class}.from_pretrained("{base_model}", torch_dtype=torch.bfloat16).to("cuda")
{load_line}
pipe.set_adapters(["lora"], adapter_weights=[1.0])  # LoRA strength
image = pipe("{prompt}a photo", num_inference_steps=50, guidance_scale=4.0).images[0]
image.save("lora.png")
```

Or from the command line: `flux2lora generate --lora {diffusers_file} --prompt "{prompt}a photo" --scale 1.0`.
{comfy}
## Licence

{lic.note}
"""
