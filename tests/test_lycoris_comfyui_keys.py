"""Our ComfyUI-layout adapter files (LoRA, LoKr, LoHa) against ComfyUI's own LoRA key map for FLUX.2.

The rule is ComfyUI's, read (not copied: GPL-3.0) from comfy/lora.py `model_lora_keys_unet` and
comfy/utils.py `flux_to_diffusers`, and re-written here in our own code:

- every weight `diffusion_model.<BFL module>.weight` of the model is reachable under the generic key
  `diffusion_model.<BFL module>` (and `lora_unet_<BFL module, dots as _>`);
- for `comfy.model_base.Flux` and its subclass `Flux2`, every diffusers module name that `flux_to_diffusers` knows
  is reachable as `lycoris_<diffusers module, dots as _>` (SimpleTuner's LyCORIS layout), `transformer.<module>` and
  `lora_transformer_<module, dots as _>`; `attn.to_q/to_k/to_v` (and `add_q/k/v_proj`) reach rows
  [0, h), [h, 2h), [2h, 3h) of the fused `img_attn.qkv` (`txt_attn.qkv`), h = hidden_size; FLUX.2's
  `attn.to_qkv_mlp_proj` / `attn.to_out` of single blocks reach `linear1` / `linear2`, and its `ff.linear_in/out`,
  `ff_context.linear_in/out` reach `img_mlp.0/2`, `txt_mlp.0/2` (these four were added after ComfyUI issue #12084,
  "Flux 2 Klein LoKR doesn't load", where SimpleTuner's `lycoris_transformer_blocks_N_ff_linear_in` keys were not
  loaded);
- `load_lora` reads, per mapped key: `.alpha`, `.dora_scale`, `.lora_up/down.weight`, `.lora_B/A.weight`,
  `.hada_w1_a/w1_b/w2_a/w2_b` (+ `hada_t1/t2`), `.lokr_w1/w2/w1_a/w1_b/w2_a/w2_b/t2`; any other key is logged as
  "lora key not loaded".

Which ComfyUI version: the Flux branch of `model_lora_keys_unet` with the `lycoris_` entry is in the stored
comfyanonymous/ComfyUI comfy/lora.py at commit 41444b5236c613ee5ff7d09aa620f94b702f30eb; the FLUX.2 entries of
`flux_to_diffusers` (to_qkv_mlp_proj, single-block to_out, ff.linear_in/out) were read from a later version of
the function (2026, after issue #12084) whose commit the reference store does not name; `model_base.Flux2`
subclasses `model_base.Flux` there. No ComfyUI could be installed here to run its loader itself.

The BFL state dict of each tiny flavour is built from the architecture and checked against diffusers' own
converter (`convert_flux2_transformer_checkpoint_to_diffusers`): converted, it has exactly the tiny model's Linear
weights and shapes. Each file key must then be accepted by the map, every key part must be one `load_lora` reads,
and the delta each module implies must have the shape of its (sliced) target weight.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

FLAVOURS = ("klein-4b", "klein-9b", "dev")
KINDS = ("lora", "lokr", "loha")
READ_PARTS = {"alpha", "dora_scale", "lora_up.weight", "lora_down.weight", "lora_B.weight", "lora_A.weight",
              "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
              "lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t2"}
# flux_to_diffusers' FLUX.2-relevant entries: diffusers module (in a block) -> (BFL module, row slice index or None)
DOUBLE = {"attn.to_q": ("img_attn.qkv", 0), "attn.to_k": ("img_attn.qkv", 1), "attn.to_v": ("img_attn.qkv", 2),
          "attn.add_q_proj": ("txt_attn.qkv", 0), "attn.add_k_proj": ("txt_attn.qkv", 1),
          "attn.add_v_proj": ("txt_attn.qkv", 2), "attn.to_out.0": ("img_attn.proj", None),
          "attn.to_add_out": ("txt_attn.proj", None), "ff.linear_in": ("img_mlp.0", None),
          "ff.linear_out": ("img_mlp.2", None), "ff_context.linear_in": ("txt_mlp.0", None),
          "ff_context.linear_out": ("txt_mlp.2", None)}
SINGLE = {"attn.to_qkv_mlp_proj": ("linear1", None), "attn.to_out": ("linear2", None)}


def bfl_linear_shapes(config: dict) -> dict[str, tuple[int, int]]:
    """{BFL block Linear weight key (without diffusion_model.): (out, in)} of a FLUX.2 transformer config."""
    h = config["num_attention_heads"] * config["attention_head_dim"]
    mlp = int(h * config.get("mlp_ratio", 3.0))
    out = {}
    for i in range(config["num_layers"]):
        for stream in ("img", "txt"):
            out[f"double_blocks.{i}.{stream}_attn.qkv.weight"] = (3 * h, h)
            out[f"double_blocks.{i}.{stream}_attn.proj.weight"] = (h, h)
            out[f"double_blocks.{i}.{stream}_mlp.0.weight"] = (2 * mlp, h)
            out[f"double_blocks.{i}.{stream}_mlp.2.weight"] = (h, mlp)
    for i in range(config["num_single_layers"]):
        out[f"single_blocks.{i}.linear1.weight"] = (3 * h + 2 * mlp, h)
        out[f"single_blocks.{i}.linear2.weight"] = (h, h + mlp)
    return out


def comfyui_key_map(config: dict, bfl: dict[str, tuple[int, int]]) -> dict[str, tuple[str, tuple[int, int] | None]]:
    """{adapter module key ComfyUI accepts: (BFL weight key, (first row, rows) or None for the whole weight)}."""
    h = config["num_attention_heads"] * config["attention_head_dim"]
    accepted = {}
    for key in bfl:
        module = key.removesuffix(".weight")
        accepted[f"diffusion_model.{module}"] = (f"diffusion_model.{key}", None)
        accepted["lora_unet_" + module.replace(".", "_")] = (f"diffusion_model.{key}", None)
    blocks = [("transformer_blocks", "double_blocks", config["num_layers"], DOUBLE),
              ("single_transformer_blocks", "single_blocks", config["num_single_layers"], SINGLE)]
    for diffusers_blocks, bfl_blocks, count, table in blocks:
        for i in range(count):
            for name, (bfl_module, part) in table.items():
                target = f"diffusion_model.{bfl_blocks}.{i}.{bfl_module}.weight"
                rows = None if part is None else (part * h, h)
                diffusers = f"{diffusers_blocks}.{i}.{name}"
                for key in ("lycoris_" + diffusers.replace(".", "_"), f"transformer.{diffusers}",
                            "lora_transformer_" + diffusers.replace(".", "_")):
                    accepted[key] = (target, rows)
    return accepted


def implied_delta_shape(parts: dict[str, torch.Tensor]) -> tuple[int, int]:
    """The (out, in) shape of the weight change one module's tensors make, by LoRA's / LyCORIS's formulas."""
    if "lora_B.weight" in parts:
        return parts["lora_B.weight"].shape[0], parts["lora_A.weight"].shape[1]
    if "hada_w1_a" in parts:
        return parts["hada_w1_a"].shape[0], parts["hada_w1_b"].shape[1]
    w1 = parts["lokr_w1"].shape if "lokr_w1" in parts else (parts["lokr_w1_a"].shape[0], parts["lokr_w1_b"].shape[1])
    w2 = parts["lokr_w2"].shape if "lokr_w2" in parts else (parts["lokr_w2_a"].shape[0], parts["lokr_w2_b"].shape[1])
    return w1[0] * w2[0], w1[1] * w2[1]


@pytest.fixture(scope="module", params=FLAVOURS)
def flavour(request):
    """(flavour, its tiny transformer, its transformer config, the BFL Linear shapes)."""
    from diffusers import Flux2Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

    from flux2lora.flavours import get_flavour

    config = dict(get_flavour(f"tiny-{request.param}").full_transformer_config)
    torch.manual_seed(0)
    transformer = Flux2Transformer2DModel(**config)
    bfl = bfl_linear_shapes(config)
    # diffusers' own converter agrees that these are the BFL names and shapes of this model's block Linears
    converted = convert_flux2_transformer_checkpoint_to_diffusers({k: torch.empty(s) for k, s in bfl.items()})
    blocks = {k: tuple(v.shape) for k, v in transformer.state_dict().items()
              if k.startswith(("transformer_blocks.", "single_transformer_blocks.")) and v.ndim == 2}
    assert {k: tuple(v.shape) for k, v in converted.items()} == blocks
    return request.param, transformer, config, bfl


@pytest.mark.parametrize("kind", KINDS)
def test_every_key_of_our_comfyui_file_is_one_comfyuis_flux2_key_map_loads(flavour, kind, tmp_path):
    from diffusers import Flux2KleinPipeline, Flux2Pipeline

    from flux2lora.export import export_bfl
    from flux2lora.train.lora import add_lora, save_diffusers_lora, target_modules

    name, transformer, config, bfl = flavour
    transformer = type(transformer)(**config)  # a fresh copy per kind (peft adds its layers in place)
    targets = target_modules(transformer, "all")
    params = add_lora(transformer, 2, 4, 0.0, targets, kind=kind)
    g = torch.Generator().manual_seed(1)
    for p in params:  # as after training: no factor left at zero
        p.data = torch.randn(p.shape, generator=g) * 0.1
    pipeline_cls = Flux2Pipeline if name == "dev" else Flux2KleinPipeline
    diffusers_file = save_diffusers_lora(transformer, pipeline_cls, tmp_path, {"flavour": f"tiny-{name}"})
    state = load_file(str(export_bfl(diffusers_file, tmp_path / "comfy.safetensors")))

    accepted = comfyui_key_map(config, bfl)
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        part = next((p for p in READ_PARTS if key.endswith("." + p)), None)
        assert part is not None, f"{key}: no part ComfyUI's load_lora reads ('lora key not loaded')"
        modules.setdefault(key.removesuffix("." + part), {})[part] = value
    reached: dict[str, list[tuple[int, int] | None]] = {}
    for module, parts in modules.items():
        assert module in accepted, f"{module}: not in ComfyUI's FLUX.2 key map ('lora key not loaded')"
        target, rows = accepted[module]
        out_features, in_features = bfl[target.removeprefix("diffusion_model.")]
        expected = (rows[1] if rows else out_features, in_features)
        assert implied_delta_shape(parts) == expected, module
        reached.setdefault(target, []).append(rows)
    # every adapted diffusers Linear is reached once (q/k/v as their three row slices or as one fused module)
    n_double, n_single = config["num_layers"], config["num_single_layers"]
    assert len(targets) == 12 * n_double + 2 * n_single
    covered = sum(3 if rows == [None] and ".qkv." in t else len(rows) for t, rows in reached.items())
    assert covered == len(targets)
    layout = {"lora": "diffusion_model.", "loha": "diffusion_model.", "lokr": "lycoris_"}[kind]
    assert all(m.startswith(layout) for m in modules)
