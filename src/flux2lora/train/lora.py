"""LoRA targets inside `Flux2Transformer2DModel` and the diffusers-format LoRA file.

Targets are exact module paths (`transformer_blocks.0.attn.to_q`), never bare suffixes: a bare `to_out` would also
match the double blocks' `attn.to_out` ModuleList, which peft refuses.
"""

from __future__ import annotations

import difflib
import json
import warnings
from functools import lru_cache
from pathlib import Path

import torch

# Double-stream blocks: separate image (to_*) and text (add_*) projections and feed-forwards.
DOUBLE_ATTENTION = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"]
DOUBLE_QKV = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"]
DOUBLE_MLP = ["ff.linear_in", "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out"]
# Single-stream blocks fuse attention and MLP: to_qkv_mlp_proj computes q, k, v and the MLP input in one Linear and
# to_out projects the concatenated attention and MLP outputs. They cannot be split, so both the `attention` and the
# `mlp` presets include them.
SINGLE_FUSED = ["attn.to_qkv_mlp_proj", "attn.to_out"]
SINGLE_QKV = ["attn.to_qkv_mlp_proj"]

# The default targets of diffusers' FLUX.2 LoRA examples (examples/dreambooth/train_dreambooth_lora_flux2*.py):
# peft suffixes "to_q", "to_k", "to_v", "to_out.0" (double blocks' image attention only: the text projections are
# add_*_proj, and single blocks' to_out has no ".0"), "to_qkv_mlp_proj" and every single block's "attn.to_out".
DIFFUSERS_EXAMPLE_DOUBLE = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0"]

PRESETS = {
    "all": (DOUBLE_ATTENTION + DOUBLE_MLP, SINGLE_FUSED),
    "attention": (DOUBLE_ATTENTION, SINGLE_FUSED),
    "mlp": (DOUBLE_MLP, SINGLE_FUSED),
    "tiny": (DOUBLE_QKV, SINGLE_QKV),
    "diffusers-example": (DIFFUSERS_EXAMPLE_DOUBLE, SINGLE_FUSED),
}


def target_modules(transformer, preset: str = "all") -> list[str]:
    """Exact module paths selected by a preset on this transformer (its block counts decide the list)."""
    if preset not in PRESETS:
        raise ValueError(f"flux_lora_target: unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    double, single = PRESETS[preset]
    n_double = len(transformer.transformer_blocks)
    n_single = len(transformer.single_transformer_blocks)
    return ([f"transformer_blocks.{i}.{m}" for i in range(n_double) for m in double]
            + [f"single_transformer_blocks.{i}.{m}" for i in range(n_single) for m in single])


def flavour_modules(flavour: str) -> dict[str, bool]:
    """{module path: is it a Linear} of `flavour`'s transformer at its configured size (real flavours: the
    full-size model), built from diffusers' Flux2Transformer2DModel config on the meta device: no weights, no
    memory. Computed once per flavour and process."""
    return {name: shape is not None for name, shape in _flavour_modules(flavour)}


def flavour_linear_shapes(flavour: str) -> dict[str, tuple[int, int]]:
    """{Linear module path: (out_features, in_features)} of `flavour`'s transformer (see flavour_modules)."""
    return {name: shape for name, shape in _flavour_modules(flavour) if shape is not None}


@lru_cache(maxsize=None)
def _flavour_modules(flavour: str) -> tuple[tuple[str, tuple[int, int] | None], ...]:
    from diffusers import Flux2Transformer2DModel

    from ..flavours import get_flavour

    with torch.device("meta"):
        model = Flux2Transformer2DModel(**get_flavour(flavour).full_transformer_config)
    return tuple((name, (module.out_features, module.in_features) if isinstance(module, torch.nn.Linear) else None)
                 for name, module in model.named_modules() if name)


def _suffixes(names) -> list[str]:
    """Every dotted suffix of every name ("transformer_blocks.0.attn.to_q" -> "to_q", "attn.to_q", ...)."""
    out = set()
    for name in names:
        parts = name.split(".")
        out.update(".".join(parts[i:]) for i in range(len(parts)))
    return sorted(out)


def _nearest(pattern: str, linear_names: list[str]) -> str:
    """The real module name (or dotted suffix of one) closest to `pattern`, with an example of a full path."""
    candidates = difflib.get_close_matches(pattern, _suffixes(linear_names), n=1, cutoff=0.0)
    if not candidates:
        return "(none)"
    best = candidates[0]
    example = next(n for n in linear_names if n == best or n.endswith("." + best))
    return repr(best) if best == example else f"{best!r} (e.g. {example})"


def _bfl_hint(pattern: str) -> str:
    """A note when the pattern uses BFL / ComfyUI module names, which the diffusers model does not have."""
    from ..export import DOUBLE_BLOCK_MODULES, DOUBLE_BLOCK_QKV, SINGLE_BLOCK_MODULES

    bfl = {**{b: d for d, b in DOUBLE_BLOCK_MODULES.items()}, **{b: "/".join(d) for b, d in DOUBLE_BLOCK_QKV.items()},
           **{b: d for d, b in SINGLE_BLOCK_MODULES.items()}, "double_blocks": "transformer_blocks",
           "single_blocks": "single_transformer_blocks"}
    found = [f"{b} is {d}" for b, d in bfl.items() if b.replace(".", "\\.") in pattern or b in pattern]
    return f" (these are BFL / ComfyUI names; diffusers' model names them differently: {'; '.join(found)})" \
        if found else ""


def resolve_target_patterns(modules: dict[str, bool], patterns: list[str] | str, where: str) -> list[str]:
    """Exact Linear module paths selected by peft-style `patterns` (a list: each entry is a module path or a dotted
    suffix of one, peft's `target_modules` list matching; a string: a regular expression the whole path must match,
    peft's string form), in the model's module order. `modules` is {path: is Linear}; `where` names the model in
    messages. Raises ValueError, naming the nearest real module, for a pattern that matches no module or matches
    a module peft cannot adapt (e.g. bare "to_out" also matches the double blocks' ModuleList)."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    linear = [name for name, is_linear in modules.items() if is_linear]
    entries = [patterns] if isinstance(patterns, str) else list(patterns)
    if not entries:
        raise ValueError("train.lora_target_modules is empty: list module names (or unset it to use "
                         "train.flux_lora_target's preset)")
    selected: set[str] = set()
    for entry in entries:
        config = LoraConfig(target_modules=entry if isinstance(patterns, str) else [entry])
        matched = [name for name in modules if check_target_module_exists(config, name)]
        if not matched:
            raise ValueError(f"train.lora_target_modules: {entry!r} matches no module of {where}; nearest real "
                             f"module: {_nearest(entry, linear)}{_bfl_hint(entry)}")
        not_linear = [name for name in matched if not modules[name]]
        if not_linear:
            raise ValueError(f"train.lora_target_modules: {entry!r} matches {not_linear[0]} of {where}, which is "
                             f"not a Linear layer (peft cannot adapt it); name its Linear, e.g. "
                             f"{_nearest(entry + '.0', linear)}")
        selected.update(matched)
    return [name for name in linear if name in selected]


def transformer_modules(transformer) -> dict[str, bool]:
    """{module path: is it a Linear} of a loaded transformer (peft LoRA layers count as their base Linear)."""
    return {name: isinstance(module, torch.nn.Linear) for name, module in transformer.named_modules() if name}


def training_targets(transformer, cfg) -> list[str]:
    """The exact module paths the run adapts: train.lora_target_modules' matches on this transformer when set,
    else train.flux_lora_target's preset."""
    if cfg.lora_target_modules is not None:
        return resolve_target_patterns(transformer_modules(transformer), cfg.lora_target_modules,
                                       "the loaded transformer")
    return target_modules(transformer, cfg.flux_lora_target)


def targets_description(cfg) -> str:
    """What the run targets, for the LoRA's metadata and MLflow: the preset's name, or the patterns as JSON."""
    if cfg.lora_target_modules is not None:
        return json.dumps(cfg.lora_target_modules)
    return cfg.flux_lora_target


# lora_init_type -> peft's init_lora_weights. Both start with B = 0 (the adapter adds nothing at step 0) and leave
# the base weights untouched, so the saved file is the whole adapter; A is Kaiming-uniform ("default", peft's and
# the seed trainer's default) or normal with std 1/rank ("gaussian", the diffusers training examples').
LORA_INITS = {"default": True, "gaussian": "gaussian"}


def lycoris_adapter_config(kind: str, transformer, rank: int, alpha: float | None, targets: list[str],
                           lycoris=None):
    """peft's LoKrConfig / LoHaConfig for `kind` ("lokr" / "loha") on these exact module paths.

    Scales follow LyCORIS (what ComfyUI and SimpleTuner's files assume): alpha / rank, except a LoKr module whose
    two factors are both full matrices (no rank involved), which LyCORIS applies at scale 1; peft would apply
    alpha / r there too, so those modules get alpha = r in alpha_pattern. lycoris_config.full_matrix makes every
    w2 full (r = the largest w2 side of the targets: peft creates w2 full when r >= max(w2's sides) / 2)."""
    from peft import LoHaConfig, LoKrConfig
    from peft.tuners.lokr.layer import factorization

    alpha = float(alpha if alpha is not None else rank)
    if kind == "loha":
        return LoHaConfig(r=rank, alpha=alpha, target_modules=targets, init_weights=True)
    factor = lycoris.factor if lycoris is not None else -1
    decompose_both = lycoris.decompose_both if lycoris is not None else False
    modules = dict(transformer.named_modules())
    split = {}
    for name in targets:
        out_features, in_features = modules[name].weight.shape
        (out_l, out_k), (in_m, in_n) = factorization(out_features, factor), factorization(in_features, factor)
        split[name] = (out_l, out_k, in_m, in_n)
    if lycoris is not None and lycoris.full_matrix:
        rank = max(max(out_k, in_n) for _, out_k, _, in_n in split.values())
    full = [name for name, (out_l, out_k, in_m, in_n) in split.items()
            if not (decompose_both and rank < max(out_l, in_m) / 2) and rank >= max(out_k, in_n) / 2]
    return LoKrConfig(r=rank, alpha=alpha, target_modules=targets, decompose_factor=factor,
                      decompose_both=decompose_both, init_weights=True,
                      alpha_pattern={name: float(rank) for name in full})


def add_lora(transformer, rank: int, alpha: float | None, dropout: float, targets: list[str], init: str = "gaussian",
             use_dora: bool = False, kind: str = "lora", lycoris=None):
    """Attach a peft adapter ("default") of `kind` (train.lora_type: lora, DoRA with use_dora, its magnitudes
    initialised from the base weights' row norms; lokr / loha: lycoris_adapter_config) and return its trainable
    parameters (kept in fp32)."""
    from peft import LoraConfig

    if init not in LORA_INITS:
        raise ValueError(f"train.lora_init_type: {init!r} is not one of {', '.join(LORA_INITS)}")
    if kind == "lora":
        config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, lora_dropout=dropout,
                            init_lora_weights=LORA_INITS[init], target_modules=targets, use_dora=use_dora)
    else:
        config = lycoris_adapter_config(kind, transformer, rank, alpha, targets, lycoris)
    with warnings.catch_warnings():
        # fp8-torchao bases: peft warns that merge() would need torchao's requantization recipe; training never
        # merges (the LoRA is saved separately)
        warnings.filterwarnings("ignore", message="TorchaoLoraLinear was instantiated without")
        transformer.add_adapter(config)
    params = [p for p in transformer.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()  # fp32 master weights for the adapter, whatever the frozen base's dtype
    return params


def lora_state_dict(transformer) -> dict[str, torch.Tensor]:
    """The adapter's weights in peft naming (`transformer_blocks.0.attn.to_q.lora_A.weight`), on CPU."""
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(transformer)
    # FSDP shards parameters as DTensors: full_tensor() gathers them (a collective: every process calls this)
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().to("cpu").clone()
            for k, v in state.items()}


def load_lora_state_dict(transformer, state: dict[str, torch.Tensor]) -> None:
    from peft.utils import set_peft_model_state_dict

    result = set_peft_model_state_dict(transformer, state)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ValueError(f"checkpoint LoRA has keys this model lacks: {unexpected[:5]}")


def save_diffusers_lora(transformer, pipeline_cls, folder: Path, extra_metadata: dict[str, str]) -> Path:
    """Write `pytorch_lora_weights.safetensors` in the diffusers format (keys `transformer.<module>.lora_A/B.weight`,
    `lora_adapter_metadata`), with our own metadata (base model, flavour, steps, ...) added under `flux2lora.*`.

    Each module's peft scale (lora_alpha / r; alpha / sqrt(r) with rsLoRA; per module with rank/alpha patterns) is
    multiplied into its lora_B, and the file's peft config says alpha = r (scale 1.0). Every consumer then applies
    the trained delta B @ A: diffusers and peft through the config, ComfyUI (which reads no lora_adapter_metadata and
    applies 1.0 without a `.alpha` tensor) through the weights. Per-module `.alpha` tensors, ComfyUI's own way, are
    not an option: diffusers' FLUX.2 `load_lora_weights` (0.42.1) refuses any key without "lora" in its name
    ("Invalid adapter checkpoint"). The trained alpha stays in `flux2lora.alpha`; `flux2lora.alpha_applied` says
    B holds it. Metadata keys are sorted, so equal weights give equal bytes."""
    from peft.tuners.lora import LoraLayer

    config = transformer.peft_config["default"]
    kind = adapter_kind(config)
    if kind != "lora":
        return _save_lycoris_adapter(transformer, config, pipeline_cls, folder, extra_metadata)
    scales = {name: float(module.scaling["default"]) for name, module in transformer.named_modules()
              if isinstance(module, LoraLayer) and "default" in module.scaling}
    state = lora_state_dict(transformer)
    for key in state:
        if key.endswith(".lora_B.weight"):
            module = key.removesuffix(".lora_B.weight")
            if module not in scales:
                raise ValueError(f"LoRA weight {key} has no peft layer {module!r} to take its scale from")
            state[key] = state[key] * scales[module]
    # Dropout is a training setting: saved, peft would rebuild it on load, in train mode (diffusers does not switch
    # the new layers to eval), and every image made with the file would be random. The file says 0.
    adapter_config = {**config.to_dict(), "lora_dropout": 0.0, "lora_alpha": config.r,
                      "alpha_pattern": dict(config.rank_pattern or {}), "use_rslora": False}
    return write_diffusers_file(folder / "pytorch_lora_weights.safetensors", state, adapter_config, pipeline_cls,
                                {f"flux2lora.{k}": v if isinstance(v, str) else json.dumps(v)
                                 for k, v in extra_metadata.items()})


def adapter_kind(config) -> str:
    """"lora" (DoRA included), "lokr" or "loha", from a peft config object or its dict (the file's
    lora_adapter_metadata)."""
    peft_type = str(getattr(config, "peft_type", None) or (config.get("peft_type") if isinstance(config, dict)
                                                           else None) or "LORA")
    return {"LOKR": "lokr", "LOHA": "loha"}.get(peft_type.rsplit(".", 1)[-1].upper(), "lora")


def _save_lycoris_adapter(transformer, config, pipeline_cls, folder: Path, extra_metadata: dict[str, str]) -> Path:
    """The LoKr / LoHa adapter in the diffusers layout: peft's own tensor names under `transformer.`
    (`transformer.<module>.lokr_w1`, `.hada_w1_a`, ...) as trained (the scale is NOT in the weights: the file's
    peft config, with its alpha_pattern, says it), the peft config as `lora_adapter_metadata`. diffusers 0.42.1's
    FLUX.2 `load_lora_weights` builds a LoKrConfig from that metadata; it refuses LoHa keys, which
    `load_adapter_weights` loads with peft. Metadata keys sorted: equal weights give equal bytes."""
    state = lora_state_dict(transformer)
    adapter_config = {**config.to_dict(), "rank_dropout": 0.0, "module_dropout": 0.0}
    return write_diffusers_file(folder / "pytorch_lora_weights.safetensors", state, adapter_config, pipeline_cls,
                                {f"flux2lora.{k}": v if isinstance(v, str) else json.dumps(v)
                                 for k, v in extra_metadata.items()}, alpha_applied=False)


def load_adapter_weights(pipe, path: Path, adapter_name: str) -> None:
    """Load an adapter file of ours into a FLUX.2 pipeline's transformer: diffusers' `load_lora_weights` for LoRA,
    DoRA and LoKr; for LoHa (which diffusers 0.42.1 refuses: "We currently support LoRA and LoKr") peft itself,
    through diffusers' `add_adapter` (so set_adapters and the `scale` attention kwarg work as for a LoRA) and
    peft's `set_peft_model_state_dict`."""
    from peft import LoHaConfig
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(path)
    metadata = read_lora_metadata(path)
    config = json.loads(metadata.get("lora_adapter_metadata") or "{}")
    config = {k.removeprefix("transformer."): v for k, v in config.items()}
    if adapter_kind(config) != "loha":
        pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=adapter_name)
        return
    state = {k.removeprefix("transformer."): v for k, v in load_file(str(path)).items()}
    known = set(LoHaConfig.__dataclass_fields__)
    pipe.transformer.add_adapter(LoHaConfig(**{k: v for k, v in config.items() if k in known}),
                                 adapter_name=adapter_name)
    result = set_peft_model_state_dict(pipe.transformer, state, adapter_name=adapter_name)
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"{path}: LoHa keys this model lacks: {result.unexpected_keys[:5]}")


def write_diffusers_file(path: Path, state: dict[str, torch.Tensor], adapter_config: dict, pipeline_cls,
                         metadata: dict[str, str], alpha_applied: bool = True) -> Path:
    """Write `state` (peft names without the `transformer.` prefix, alpha already in lora_B) with the pipeline's
    own `save_lora_weights` and `adapter_config` as its `lora_adapter_metadata`, then add `metadata` (sorted keys:
    equal weights give equal bytes)."""
    from safetensors import safe_open
    from safetensors.torch import load

    from ..io import write_safetensors_atomic

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # sets (target_modules) as sorted lists: diffusers lists them in hash order, which changes per process
    adapter_config = {k: sorted(v) if isinstance(v, set) else v for k, v in adapter_config.items()}
    pipeline_cls.save_lora_weights(path.parent, transformer_lora_layers=state,
                                   transformer_lora_adapter_metadata=adapter_config, weight_name=path.name)
    with safe_open(str(path), framework="pt") as f:
        written = dict(f.metadata() or {})
    tensors = load(path.read_bytes())
    written.update(metadata)
    # true: lora_B holds alpha / r, load at strength 1.0; false (LoKr / LoHa): the peft config's alpha applies
    written["flux2lora.alpha_applied"] = "true" if alpha_applied else "false"
    write_safetensors_atomic(path, tensors, written)
    return path


def read_lora_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})
