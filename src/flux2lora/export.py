"""LoRA files other tools load: the BFL / ComfyUI layout, written from the same weights as the diffusers file.

The diffusers file (`train/lora.py`) holds the peft state: per module `lora_A` (r, in) and `lora_B` (out, r), and
the peft config, whose `lora_alpha / r` (rank_pattern / alpha_pattern per module) scales B @ A. The BFL layout
names modules as Black Forest Labs' reference code does (`diffusion_model.double_blocks.N.img_attn.qkv`,
`single_blocks.N.linear1`, ...), which is what ComfyUI's native FLUX.2 model and ai-toolkit use, and diffusers'
`_convert_non_diffusers_flux2_lora_to_diffusers` converts back. Two differences matter:

- BFL fuses q, k and v into one `qkv` Linear. Separate LoRAs (A_q, B_q), (A_k, B_k), (A_v, B_v) become one LoRA
  with A = [A_q; A_k; A_v] (3r, in) stacked and B = blockdiag(B_q, B_k, B_v) (3*out, 3r), so that
  B @ A = [B_q A_q; B_k A_k; B_v A_v], the fused weight's delta. (Copying one A to all three, or concatenating
  the Bs without the block-diagonal, gives wrong deltas.) diffusers' converter gives each of q/k/v the whole
  stacked A and its third of B: B_q' @ A = B_q A_q exactly.
- BFL files carry no alpha: loaders (ComfyUI, diffusers) apply B @ A at scale 1. Each module's peft scale is
  multiplied into its B here, so every tool sees the same delta as diffusers does with the peft config.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

BFL_PREFIX = "diffusion_model."
DIFFUSERS_PREFIX = "transformer."
BFL_FORMAT = "bfl"

# diffusers module path inside a double block -> BFL path (un-fused modules).
DOUBLE_BLOCK_MODULES = {
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
    "ff.linear_in": "img_mlp.0",
    "ff.linear_out": "img_mlp.2",
    "ff_context.linear_in": "txt_mlp.0",
    "ff_context.linear_out": "txt_mlp.2",
}
# Fused in BFL: (q, k, v) in this order, as diffusers' converter splits `qkv` with torch.chunk(3).
DOUBLE_BLOCK_QKV = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
SINGLE_BLOCK_MODULES = {
    "attn.to_qkv_mlp_proj": "linear1",  # already fused in diffusers' Flux2SingleTransformerBlock
    "attn.to_out": "linear2",
}
# Modules outside the blocks (no preset targets them; kept so any LoRA the converter understands round-trips).
GLOBAL_MODULES = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_guidance_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_guidance_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",
    "single_stream_modulation.linear": "single_stream_modulation.lin",
    "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
    "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
}


def module_pairs(state: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module path: (A (r, in), B (out, r))} from a diffusers-format or peft state dict (`transformer.` dropped)."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        key = key.removeprefix(DIFFUSERS_PREFIX)
        for part in ("lora_A", "lora_B"):
            suffix = f".{part}.weight"
            if key.endswith(suffix):
                pairs.setdefault(key[: -len(suffix)], {})[part] = value
                break
        else:
            raise ValueError(f"not a LoRA weight: {key!r} (expected <module>.lora_A.weight / .lora_B.weight)")
    missing = [m for m, p in pairs.items() if len(p) != 2]
    if missing:
        raise ValueError(f"LoRA modules without both lora_A and lora_B: {missing[:5]}")
    return {m: (p["lora_A"], p["lora_B"]) for m, p in pairs.items()}


def peft_scales(modules: list[str], ranks: dict[str, int], config: dict) -> dict[str, float]:
    """Each module's LoRA scale as peft computes it: alpha / r, or alpha / sqrt(r) with rsLoRA; per-module rank
    and alpha come from `rank_pattern` / `alpha_pattern` (peft's own pattern matching)."""
    from peft.utils.other import get_pattern_key

    if config.get("use_dora"):
        raise ValueError("DoRA adapters have no BFL / ComfyUI LoRA equivalent; export the diffusers file only")
    alpha_pattern = config.get("alpha_pattern") or {}
    default_alpha = config.get("lora_alpha", config.get("r"))
    scales = {}
    for module in modules:
        key = get_pattern_key(alpha_pattern.keys(), module)
        alpha = alpha_pattern.get(key, default_alpha)
        r = ranks[module]
        alpha = r if alpha is None else alpha
        scales[module] = alpha / (r ** 0.5) if config.get("use_rslora") else alpha / r
    return scales


def _fuse_qkv(parts: list[tuple[torch.Tensor, torch.Tensor] | None]) -> tuple[torch.Tensor, torch.Tensor]:
    """Three (A, B*scale) pairs (None: no LoRA on that projection) -> (stacked A, block-diagonal B)."""
    present = [p for p in parts if p is not None]
    rank = max(a.shape[0] for a, _ in present)
    in_features = present[0][0].shape[1]
    out_features = present[0][1].shape[0]
    dtype = present[0][0].dtype
    filled = []
    for pair in parts:
        if pair is None:  # zero delta for a projection the preset left out
            pair = (torch.zeros(rank, in_features, dtype=dtype), torch.zeros(out_features, rank, dtype=dtype))
        a, b = pair
        if a.shape[0] < rank:  # different ranks (rank_pattern): pad with zero rows / columns, delta unchanged
            a = torch.cat([a, a.new_zeros(rank - a.shape[0], a.shape[1])])
            b = torch.cat([b, b.new_zeros(b.shape[0], rank - b.shape[1])], dim=1)
        filled.append((a, b))
    return torch.cat([a for a, _ in filled]), torch.block_diag(*[b for _, b in filled])


def diffusers_to_bfl(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """Convert a diffusers/peft LoRA state dict and its peft config into BFL keys with the scales baked into B.

    Returns `diffusion_model.<bfl module>.lora_A.weight` (r, in) / `.lora_B.weight` (out, r) tensors; fused qkv
    modules have rank 3r. Raises ValueError for a module the BFL layout has no name for.
    """
    pairs = module_pairs(state)
    scales = peft_scales(list(pairs), {m: a.shape[0] for m, (a, _) in pairs.items()}, config)
    scaled = {m: (a.contiguous(), (b * scales[m]).to(b.dtype).contiguous()) for m, (a, b) in pairs.items()}
    out: dict[str, torch.Tensor] = {}

    def put(bfl_module: str, a: torch.Tensor, b: torch.Tensor) -> None:
        out[f"{BFL_PREFIX}{bfl_module}.lora_A.weight"] = a
        out[f"{BFL_PREFIX}{bfl_module}.lora_B.weight"] = b

    done: set[str] = set()
    double_blocks = sorted({int(m.split(".")[1]) for m in pairs if m.startswith("transformer_blocks.")})
    for n in double_blocks:
        prefix = f"transformer_blocks.{n}."
        for bfl, projections in DOUBLE_BLOCK_QKV.items():
            names = [prefix + p for p in projections]
            if any(name in scaled for name in names):
                put(f"double_blocks.{n}.{bfl}", *_fuse_qkv([scaled.get(name) for name in names]))
                done.update(names)
        for diffusers_name, bfl in DOUBLE_BLOCK_MODULES.items():
            if prefix + diffusers_name in scaled:
                put(f"double_blocks.{n}.{bfl}", *scaled[prefix + diffusers_name])
                done.add(prefix + diffusers_name)
    for module, pair in scaled.items():
        if module.startswith("single_transformer_blocks."):
            _, n, rest = module.split(".", 2)
            if rest in SINGLE_BLOCK_MODULES:
                put(f"single_blocks.{n}.{SINGLE_BLOCK_MODULES[rest]}", *pair)
                done.add(module)
        elif module in GLOBAL_MODULES:
            put(GLOBAL_MODULES[module], *pair)
            done.add(module)
    unknown = sorted(set(pairs) - done)
    if unknown:
        raise ValueError(f"no BFL name for LoRA modules {unknown[:5]}: the BFL / ComfyUI file cannot hold them")
    return out


def read_diffusers_lora(path: Path) -> tuple[dict[str, torch.Tensor], dict, dict[str, str]]:
    """A diffusers-format LoRA file: (tensors, peft config with the `transformer.` prefix dropped, all metadata)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata() or {})
    if "lora_adapter_metadata" not in metadata:
        raise ValueError(f"{path}: no `lora_adapter_metadata`; not a diffusers-format LoRA written by "
                         "save_lora_weights (its alpha would be unknown)")
    raw = json.loads(metadata["lora_adapter_metadata"])
    config = {k.removeprefix(DIFFUSERS_PREFIX): v for k, v in raw.items()}
    return load_file(str(path)), config, metadata


def export_bfl(diffusers_file: Path, out_file: Path, extra_metadata: dict[str, str] | None = None) -> Path:
    """Write the BFL / ComfyUI file for a diffusers-format LoRA file.

    The metadata keeps the diffusers file's `flux2lora.*` entries (base model and revision, flavour, rank, alpha,
    trigger phrase, steps, dataset hash) plus `flux2lora.format = bfl` and a note that alpha is already applied.
    `lora_adapter_metadata` is deliberately not copied: diffusers would apply that peft config (other modules,
    other ranks) to this file.
    """
    from .io import write_safetensors_atomic

    state, config, metadata = read_diffusers_lora(diffusers_file)
    bfl = diffusers_to_bfl(state, config)
    out_metadata = {k: v for k, v in metadata.items() if k.startswith("flux2lora.")}
    out_metadata.update({"format": "pt", "flux2lora.format": BFL_FORMAT,
                         "flux2lora.alpha_applied": "true",  # B already holds alpha/r: load at strength 1.0
                         **(extra_metadata or {})})
    write_safetensors_atomic(Path(out_file), bfl, out_metadata)
    return Path(out_file)


def lora_deltas(state: dict[str, torch.Tensor], config: dict | None = None) -> dict[str, torch.Tensor]:
    """{module path: scale * B @ A} (out, in) in fp64, the weight change a LoRA makes to each module.

    `config` is the peft config (scales from alpha); None means scale 1 (BFL files and converted BFL files).
    Deltas, not the raw matrices, are what two files must agree on: fusing q/k/v changes A and B but not B @ A.
    """
    pairs = module_pairs(state)
    if config is None:
        scales = {m: 1.0 for m in pairs}
    else:
        scales = peft_scales(list(pairs), {m: a.shape[0] for m, (a, _) in pairs.items()}, config)
    return {m: (b.double() @ a.double()) * scales[m] for m, (a, b) in pairs.items()}
