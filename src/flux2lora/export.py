"""LoRA files other tools load: the BFL / ComfyUI layout, written from the same weights as the diffusers file.

The diffusers file (`train/lora.py`) holds the peft state: per module `lora_A` (r, in) and `lora_B` (out, r), and
the peft config, whose `lora_alpha / r` (rank_pattern / alpha_pattern per module) scales B @ A (our own files have
the scale already in B and alpha = r; older or other trainers' files may not: both are read right). The BFL layout
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


def pattern_key_of(pattern_keys, module: str) -> str:
    """peft's `get_pattern_key` (the pattern of rank_pattern / alpha_pattern that names `module`, else `module`).
    peft is imported only when there is a pattern to match: importing it costs a publish or export process
    seconds (it pulls in transformers), and files without patterns, which train writes, need none."""
    pattern_keys = list(pattern_keys)
    if not pattern_keys:
        return module
    from peft.utils.other import get_pattern_key as peft_get_pattern_key

    return peft_get_pattern_key(pattern_keys, module)


def peft_scales(modules: list[str], ranks: dict[str, int], config: dict) -> dict[str, float]:
    """Each module's LoRA scale as peft computes it: alpha / r, or alpha / sqrt(r) with rsLoRA; per-module rank
    and alpha come from `rank_pattern` / `alpha_pattern` (peft's own pattern matching)."""
    if config.get("use_dora"):
        raise ValueError("DoRA adapters have no BFL / ComfyUI LoRA equivalent; export the diffusers file only")
    alpha_pattern = config.get("alpha_pattern") or {}
    default_alpha = config.get("lora_alpha", config.get("r"))
    scales = {}
    for module in modules:
        key = pattern_key_of(alpha_pattern.keys(), module)
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


LOKR_FORMAT = "lycoris"  # LoKr's ComfyUI file: SimpleTuner's LyCORIS layout (diffusers module names)
LOKR_W1, LOKR_W2 = ("lokr_w1", "lokr_w1_a"), ("lokr_w2", "lokr_w2_a")
LOKR_PARTS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
LOHA_PARTS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


def lycoris_modules(state: dict[str, torch.Tensor], parts: tuple[str, ...]) -> dict[str, dict[str, torch.Tensor]]:
    """{module path: {part: tensor}} of a LoKr / LoHa state dict in peft naming (`transformer.` dropped)."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        module, _, part = key.removeprefix(DIFFUSERS_PREFIX).rpartition(".")
        if part not in parts:
            raise ValueError(f"not a {'/'.join(parts)} tensor: {key!r}")
        out.setdefault(module, {})[part] = value
    return out


def lycoris_scales(modules: list[str], config: dict) -> dict[str, float]:
    """Each module's LoKr / LoHa scale as peft computes it: alpha / r, per-module r and alpha from rank_pattern /
    alpha_pattern (peft's own pattern matching)."""
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    scales = {}
    for module in modules:
        r = rank_pattern.get(pattern_key_of(rank_pattern.keys(), module), config["r"])
        alpha = alpha_pattern.get(pattern_key_of(alpha_pattern.keys(), module), config["alpha"])
        scales[module] = float(alpha) / float(r)
    return scales


def lokr_to_lycoris(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """A peft LoKr state dict -> SimpleTuner's LyCORIS layout, which ComfyUI's FLUX LoRA key map reads
    (`lycoris_<diffusers module, dots as _>.lokr_w1` ...; it maps to_q / to_k / to_v onto their rows of the fused
    qkv weight) and diffusers' FLUX.2 loader converts.

    The BFL names are not used: BFL fuses q, k and v into one Linear, and three Kronecker products
    kron(w1_q, w2_q), kron(w1_k, w2_k), kron(w1_v, w2_v) stacked are in general no single Kronecker product (their
    stack has Kronecker rank up to 3), so no LoKr on the fused `qkv` gives the trained deltas.

    peft's scale (alpha / r) is multiplied into w1 (or w1_a); where a factor is low-rank, `.alpha` = its rank (the
    dimension LyCORIS divides alpha by: w2_b's rows, else w1_b's), so every LyCORIS reader applies scale 1; where
    both are full, LyCORIS applies no alpha, and none is written."""
    modules = lycoris_modules(state, LOKR_PARTS)
    scales = lycoris_scales(list(modules), config)
    out: dict[str, torch.Tensor] = {}
    for module, parts in modules.items():
        name = "lycoris_" + module.replace(".", "_")
        w1 = "lokr_w1" if "lokr_w1" in parts else "lokr_w1_a"
        for part, value in parts.items():
            value = (value.double() * scales[module]).to(value.dtype) if part == w1 else value
            out[f"{name}.{part}"] = value.contiguous()
        low_rank = parts.get("lokr_w2_b", parts.get("lokr_w1_b"))
        if low_rank is not None:
            out[f"{name}.alpha"] = torch.tensor(float(low_rank.shape[0]))
    return out


def _fuse_loha_qkv(parts: list[dict[str, torch.Tensor] | None], scales: list[float]) -> dict[str, torch.Tensor]:
    """Three LoHa modules (q, k, v; None: not adapted) -> one LoHa on the fused qkv with the same deltas.

    (W1_q * W2_q) stacked over q, k, v is (blockdiag(w1_a) @ stack(w1_b)) * (blockdiag(w2_a) @ stack(w2_b)): each
    stacked product's rows are one projection's W1 (W2), so the Hadamard product of the stacks is the stack of the
    Hadamard products, exactly (rank 3r). Each projection's scale goes into its block of w1_a; a missing projection
    is a zero block."""
    present = [p for p in parts if p is not None]
    rank = max(p["hada_w1_b"].shape[0] for p in present)
    out_features, in_features = present[0]["hada_w1_a"].shape[0], present[0]["hada_w1_b"].shape[1]
    dtype = present[0]["hada_w1_a"].dtype
    blocks: dict[str, list[torch.Tensor]] = {part: [] for part in LOHA_PARTS}
    for module, scale in zip(parts, scales):
        for w in ("hada_w1", "hada_w2"):
            if module is None:
                a, b = torch.zeros(out_features, rank, dtype=dtype), torch.zeros(rank, in_features, dtype=dtype)
            else:
                a, b = module[f"{w}_a"], module[f"{w}_b"]
                if w == "hada_w1":
                    a = (a.double() * scale).to(dtype)
                if b.shape[0] < rank:  # another rank (rank_pattern): zero columns / rows, product unchanged
                    a = torch.cat([a, a.new_zeros(a.shape[0], rank - a.shape[1])], dim=1)
                    b = torch.cat([b, b.new_zeros(rank - b.shape[0], b.shape[1])])
            blocks[f"{w}_a"].append(a)
            blocks[f"{w}_b"].append(b)
    return {part: torch.block_diag(*tensors) if part.endswith("_a") else torch.cat(tensors)
            for part, tensors in blocks.items()}


def loha_to_bfl(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """A peft LoHa state dict -> the BFL / ComfyUI layout with LyCORIS's names
    (`diffusion_model.double_blocks.N.img_attn.qkv.hada_w1_a` ..., `single_blocks.N.linear1...`), q/k/v fused
    exactly (_fuse_loha_qkv). The scale is in w1_a and `.alpha` = w1_b's rows, so ComfyUI (alpha / w1_b's rows)
    applies scale 1."""
    modules = lycoris_modules(state, LOHA_PARTS)
    scales = lycoris_scales(list(modules), config)
    out: dict[str, torch.Tensor] = {}

    def put(bfl_module: str, parts: dict[str, torch.Tensor]) -> None:
        for part, value in parts.items():
            out[f"{BFL_PREFIX}{bfl_module}.{part}"] = value.contiguous()
        out[f"{BFL_PREFIX}{bfl_module}.alpha"] = torch.tensor(float(parts["hada_w1_b"].shape[0]))

    def scaled(module: str) -> dict[str, torch.Tensor]:
        parts = dict(modules[module])
        parts["hada_w1_a"] = (parts["hada_w1_a"].double() * scales[module]).to(parts["hada_w1_a"].dtype)
        return parts

    done: set[str] = set()
    for n in sorted({int(m.split(".")[1]) for m in modules if m.startswith("transformer_blocks.")}):
        prefix = f"transformer_blocks.{n}."
        for bfl, projections in DOUBLE_BLOCK_QKV.items():
            names = [prefix + p for p in projections]
            if any(name in modules for name in names):
                put(f"double_blocks.{n}.{bfl}", _fuse_loha_qkv([modules.get(name) for name in names],
                                                                [scales.get(name, 0.0) for name in names]))
                done.update(names)
        for diffusers_name, bfl in DOUBLE_BLOCK_MODULES.items():
            if prefix + diffusers_name in modules:
                put(f"double_blocks.{n}.{bfl}", scaled(prefix + diffusers_name))
                done.add(prefix + diffusers_name)
    for module in modules:
        if module.startswith("single_transformer_blocks."):
            _, n, rest = module.split(".", 2)
            if rest in SINGLE_BLOCK_MODULES:
                put(f"single_blocks.{n}.{SINGLE_BLOCK_MODULES[rest]}", scaled(module))
                done.add(module)
        elif module in GLOBAL_MODULES:
            put(GLOBAL_MODULES[module], scaled(module))
            done.add(module)
    unknown = sorted(set(modules) - done)
    if unknown:
        raise ValueError(f"no BFL name for LoHa modules {unknown[:5]}: the BFL / ComfyUI file cannot hold them")
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
    """Write the BFL / ComfyUI file for a diffusers-format LoRA file (LoHa: the BFL layout with LyCORIS's names,
    loha_to_bfl; LoKr: SimpleTuner's LyCORIS layout, which ComfyUI reads, lokr_to_lycoris).

    The metadata keeps the diffusers file's `flux2lora.*` entries (base model and revision, flavour, rank, alpha,
    trigger phrase, steps, dataset hash) plus `flux2lora.format = bfl` and a note that alpha is already applied.
    `lora_adapter_metadata` is deliberately not copied: diffusers would apply that peft config (other modules,
    other ranks) to this file.
    """
    from .io import write_safetensors_atomic

    from .train.lora import adapter_kind

    state, config, metadata = read_diffusers_lora(diffusers_file)
    kind = adapter_kind(config)
    bfl = lokr_to_lycoris(state, config) if kind == "lokr" else loha_to_bfl(state, config) if kind == "loha" \
        else diffusers_to_bfl(state, config)
    out_metadata = {k: v for k, v in metadata.items() if k.startswith("flux2lora.")}
    out_metadata.update({"format": "pt", "flux2lora.format": LOKR_FORMAT if kind == "lokr" else BFL_FORMAT,
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


DIFFUSERS_FORMAT = "diffusers"
# Layouts whose module names are diffusers' own (renamed here); the BFL-named ones go through diffusers' converter.
_DIFFUSERS_NAMED = ("diffusers", "peft", "diffusers-bare", "lycoris", "onetrainer")
_BFL_NAMED = ("bfl", "bfl-bare", "kohya")


def _bake_alpha_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`<module>.alpha` tensors (ComfyUI's and kohya's way) multiplied into each module's up / B matrix as
    alpha / rank, then dropped: the same delta at scale 1."""
    out = dict(state)
    for key in [k for k in state if k.endswith(".alpha")]:
        module = key.removesuffix(".alpha")
        down = next((f"{module}.{s}" for s in ("lora_A.weight", "lora_down.weight") if f"{module}.{s}" in state), None)
        up = next((f"{module}.{s}" for s in ("lora_B.weight", "lora_up.weight") if f"{module}.{s}" in state), None)
        if down is None or up is None:
            raise ValueError(f"{key}: an alpha without its module's LoRA matrices")
        scale = float(state[key].item()) / state[down].shape[0]
        out[up] = (state[up].double() * scale).to(state[up].dtype)
        del out[key]
    return out


def to_diffusers_state(path: Path, flavour: str | None = None) -> tuple[dict[str, torch.Tensor], str, dict]:
    """Any LoRA file `flux2lora lora inspect` reads -> (peft state without prefix, alpha / rank in lora_B; flavour;
    the file's metadata). BFL-named layouts (BFL / ComfyUI / ai-toolkit, kohya) are converted by the flavour
    pipeline's own `lora_state_dict` (diffusers' FLUX.2 converters: each of q/k/v gets the fused qkv's stacked A
    and its third of B, so B_q' A = B_q A_q); diffusers-named ones are renamed. Raises ValueError for another kind
    than LoRA, or keys of no module of the flavour."""
    import diffusers

    from .adapter_files import _module_map, _split, inspect_adapter, read_adapter
    from .flavours import get_flavour

    report = inspect_adapter(path, flavour)
    if report.kind != "lora":
        raise ValueError(f"{path}: a {report.kind} adapter; only plain LoRA files convert between layouts")
    problems = report.unmatched_keys + report.shape_mismatches
    if problems:
        raise ValueError(f"{path}: {len(problems)} keys fit no module of {report.flavour} (e.g. {problems[0]}); "
                         "`flux2lora lora inspect` lists them, --flavour picks another flavour")
    state, metadata = read_adapter(path)
    if report.layout == "diffusers" and "lora_adapter_metadata" in metadata:
        state, config, _ = read_diffusers_lora(Path(path))
        pairs = module_pairs(state)
        scales = peft_scales(list(pairs), {m: a.shape[0] for m, (a, _) in pairs.items()}, config)
        out = {}
        for module, (a, b) in pairs.items():
            out[f"{module}.lora_A.weight"] = a.contiguous()
            out[f"{module}.lora_B.weight"] = (b.double() * scales[module]).to(b.dtype).contiguous()
        return out, report.flavour, metadata
    state = _bake_alpha_tensors(state)
    if report.layout in _BFL_NAMED:
        if report.layout == "bfl-bare":
            state = {BFL_PREFIX + k: v for k, v in state.items()}
        pipeline_cls = getattr(diffusers, get_flavour(report.flavour).pipeline_class)
        converted = pipeline_cls.lora_state_dict(state)
        # the converter gives q, k and v one shared A tensor; safetensors stores only separate ones
        return ({k.removeprefix(DIFFUSERS_PREFIX): v.clone().contiguous() for k, v in converted.items()},
                report.flavour, metadata)
    prefix = {"diffusers": DIFFUSERS_PREFIX, "peft": "base_model.model.", "lycoris": "lycoris_",
              "onetrainer": "lora_transformer_"}.get(report.layout, "")
    separator = "_" if report.layout in ("lycoris", "onetrainer") else "."
    table = _module_map(report.flavour, "diffusers", separator)
    out = {}
    for key, value in state.items():
        module, suffix = _split(key, prefix)
        part = "lora_A" if suffix in ("lora_A.weight", "lora_down.weight") else "lora_B"
        out[f"{table[module][0][0]}.{part}.weight"] = value.contiguous()
    return out, report.flavour, metadata


def diffusers_adapter_config(state: dict[str, torch.Tensor]) -> dict:
    """The peft config of a converted LoRA (alpha already in B): r = the most common rank, rank_pattern and
    alpha_pattern for the others, alpha = rank everywhere (scale 1), no dropout."""
    ranks = {m: a.shape[0] for m, (a, _) in module_pairs(state).items()}
    counts: dict[int, int] = {}
    for r in ranks.values():
        counts[r] = counts.get(r, 0) + 1
    r = max(sorted(counts), key=lambda k: counts[k])
    others = {m: rank for m, rank in sorted(ranks.items()) if rank != r}
    return {"r": r, "lora_alpha": r, "rank_pattern": others, "alpha_pattern": dict(others),
            "target_modules": sorted(ranks), "lora_dropout": 0.0, "use_rslora": False, "use_dora": False,
            "bias": "none", "init_lora_weights": True}


def export_diffusers(lora_file: Path, out_file: Path, flavour: str | None = None) -> Path:
    """Write the diffusers-layout file (`transformer.<module>.lora_A/B.weight` + its peft config, loadable with the
    flavour pipeline's `load_lora_weights`) for a LoRA file in any layout `lora inspect` reads. The metadata keeps
    the source's `flux2lora.*` entries; `flux2lora.format = diffusers`."""
    import diffusers

    from .flavours import get_flavour
    from .train.lora import write_diffusers_file

    state, flavour_name, metadata = to_diffusers_state(Path(lora_file), flavour)
    pipeline_cls = getattr(diffusers, get_flavour(flavour_name).pipeline_class)
    ours = {k: v for k, v in metadata.items() if k.startswith("flux2lora.")}
    ours.update({"flux2lora.format": DIFFUSERS_FORMAT, "flux2lora.flavour": ours.get("flux2lora.flavour",
                                                                                      flavour_name)})
    return write_diffusers_file(Path(out_file), state, diffusers_adapter_config(state), pipeline_cls, ours)
