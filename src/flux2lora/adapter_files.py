"""Anyone's FLUX.2 adapter file, read: its key layout, adapter kind, rank and alpha per module, the modules of a
flavour's transformer it touches, and the keys that match none (`flux2lora lora inspect`).

Layouts, by key prefix (the naming each trainer documents, and ComfyUI's FLUX LoRA key map reads):

| layout | keys | module names |
|---|---|---|
| `diffusers` | `transformer.<module>.lora_A.weight` (diffusers' save_lora_weights, SimpleTuner's LoRA files) | diffusers' |
| `peft` | `base_model.model.<module>.lora_A.weight` (peft's save_pretrained) | diffusers' |
| `diffusers-bare` | `<module>.lora_A.weight` (a bare peft state dict, DiffSynth) | diffusers' |
| `bfl` | `diffusion_model.<module>.lora_A.weight` (ours, ComfyUI, ai-toolkit) | BFL's (fused `qkv`, `linear1`) |
| `kohya` | `lora_unet_<module, dots as _>.lora_down.weight` + `.alpha` (kohya sd-scripts, musubi-tuner) | BFL's |
| `lycoris` | `lycoris_<module, dots as _>.lokr_w1` ... (SimpleTuner's LyCORIS files) | diffusers' |
| `onetrainer` | `lora_transformer_<module, dots as _>.lora_down.weight` | diffusers' |

Kinds, by the tensors of one module (LyCORIS's documented names): `lora` (`lora_A`/`lora_B` or
`lora_down`/`lora_up`), `dora` (a LoRA plus `dora_scale`, or peft's `lora_magnitude_vector`), `lokr` (`lokr_w1` or
`lokr_w1_a`/`_b`, `lokr_w2` or `lokr_w2_a`/`_b`), `loha` (`hada_w1_a`, `hada_w1_b`, `hada_w2_a`, `hada_w2_b`).
Underscored names are resolved against the flavour's real module names, so `to_qkv_mlp_proj` is never split.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .export import DOUBLE_BLOCK_MODULES, DOUBLE_BLOCK_QKV, GLOBAL_MODULES, SINGLE_BLOCK_MODULES

# (prefix, layout, module naming, separator inside module names)
PREFIXES = (
    ("transformer.", "diffusers", "diffusers", "."),
    ("base_model.model.", "peft", "diffusers", "."),
    ("diffusion_model.", "bfl", "bfl", "."),
    ("lora_unet_", "kohya", "bfl", "_"),
    ("lycoris_", "lycoris", "diffusers", "_"),
    ("lora_transformer_", "onetrainer", "diffusers", "_"),
)
BARE = {"transformer_blocks.": ("diffusers-bare", "diffusers"), "single_transformer_blocks.": ("diffusers-bare",
                                                                                                 "diffusers"),
        "double_blocks.": ("bfl-bare", "bfl"), "single_blocks.": ("bfl-bare", "bfl")}

LORA_DOWN = ("lora_A.weight", "lora_down.weight")
LORA_UP = ("lora_B.weight", "lora_up.weight")
DORA = ("dora_scale", "lora_magnitude_vector", "lora_magnitude_vector.weight")
LOKR = ("lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
LOHA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
# longest first, so "lora_magnitude_vector.weight" is not read as "...weight"
SUFFIXES = sorted((*LORA_DOWN, *LORA_UP, *DORA, *LOKR, *LOHA, "alpha"), key=len, reverse=True)


@dataclass
class ModuleReport:
    module: str  # as the file names it (prefix dropped)
    targets: list[str]  # the diffusers modules of the flavour it changes (three for a fused qkv)
    kind: str
    rank: int | None  # None: a full (unfactored) matrix (LoKr's full w2)
    alpha: float | None  # None: not stored in the file (the loader applies scale 1)
    delta_shape: tuple[int, int]  # (out, in) of the weight change


@dataclass
class InspectReport:
    file: str
    layout: str
    kind: str
    flavour: str | None
    modules: list[ModuleReport] = field(default_factory=list)
    unmatched_keys: list[str] = field(default_factory=list)  # keys of no module of the flavour, or unreadable
    shape_mismatches: list[str] = field(default_factory=list)  # modules whose delta has another shape
    producer: str | None = None  # who wrote it, when the metadata says
    flavour_from: str = "fit"  # "option" (--flavour), "metadata" (flux2lora.flavour) or "fit" (names and shapes)

    @property
    def targets(self) -> list[str]:
        return sorted({t for m in self.modules for t in m.targets})

    def to_json(self) -> dict:
        out = asdict(self)
        out["num_modules"] = len(self.modules)
        out["num_targets"] = len(self.targets)
        return out


def bfl_modules(flavour: str) -> dict[str, tuple[list[str], tuple[int, int]]]:
    """{BFL module path: (the diffusers modules it stands for, (out, in))} for `flavour`'s transformer."""
    from .train.lora import flavour_linear_shapes

    shapes = flavour_linear_shapes(flavour)
    out: dict[str, tuple[list[str], tuple[int, int]]] = {}
    for name, shape in shapes.items():
        head, _, rest = name.partition(".")
        if head == "transformer_blocks":
            n, _, inner = rest.partition(".")
            if inner in DOUBLE_BLOCK_MODULES:
                out[f"double_blocks.{n}.{DOUBLE_BLOCK_MODULES[inner]}"] = ([name], shape)
        elif head == "single_transformer_blocks":
            n, _, inner = rest.partition(".")
            if inner in SINGLE_BLOCK_MODULES:
                out[f"single_blocks.{n}.{SINGLE_BLOCK_MODULES[inner]}"] = ([name], shape)
        elif name in GLOBAL_MODULES:
            out[GLOBAL_MODULES[name]] = ([name], shape)
    for n in range(sum(1 for name in shapes if name.startswith("transformer_blocks.") and name.endswith("attn.to_q"))):
        for bfl, projections in DOUBLE_BLOCK_QKV.items():
            names = [f"transformer_blocks.{n}.{p}" for p in projections]
            out_features, in_features = shapes[names[0]]
            out[f"double_blocks.{n}.{bfl}"] = (names, (3 * out_features, in_features))
    return out


def _module_map(flavour: str, naming: str, separator: str) -> dict[str, tuple[list[str], tuple[int, int]]]:
    from .train.lora import flavour_linear_shapes

    if naming == "bfl":
        table = bfl_modules(flavour)
    else:
        table = {name: ([name], shape) for name, shape in flavour_linear_shapes(flavour).items()}
    return {name.replace(".", separator): value for name, value in table.items()}


def _layout_of(key: str) -> tuple[str, str, str, str]:
    """(prefix, layout, naming, separator) of one key."""
    for prefix, layout, naming, separator in PREFIXES:
        if key.startswith(prefix):
            return prefix, layout, naming, separator
    for start, (layout, naming) in BARE.items():
        if key.startswith(start):
            return "", layout, naming, "."
    return "", "unknown", "", "."


def _split(key: str, prefix: str) -> tuple[str, str] | None:
    """(module, suffix) of a key, or None when its suffix is no adapter tensor's name."""
    body = key[len(prefix):]
    for suffix in SUFFIXES:
        if body.endswith("." + suffix):
            return body[: -len(suffix) - 1], suffix
    return None


def _kind(parts: dict[str, torch.Tensor]) -> str:
    if any(s in parts for s in LOKR):
        return "lokr"
    if any(s in parts for s in LOHA):
        return "loha"
    if any(s in parts for s in DORA):
        return "dora"
    return "lora"


def _first(parts: dict[str, torch.Tensor], names) -> torch.Tensor | None:
    return next((parts[n] for n in names if n in parts), None)


def _rank_and_shape(kind: str, parts: dict[str, torch.Tensor]) -> tuple[int | None, tuple[int, int]]:
    """The module's rank (None: full matrices) and its delta's (out, in), from LyCORIS's / peft's tensor shapes."""
    if kind == "loha":
        w1_a, w1_b = parts["hada_w1_a"], parts["hada_w1_b"]
        return int(w1_b.shape[0]), (int(w1_a.shape[0]), int(w1_b.shape[1]))
    if kind == "lokr":
        w1 = parts["lokr_w1"] if "lokr_w1" in parts else parts["lokr_w1_a"] @ parts["lokr_w1_b"]
        factored = "lokr_w2_a" in parts
        rank = int(parts["lokr_w2_a"].shape[1]) if factored else None
        w2_shape = (parts["lokr_w2_a"].shape[0], parts["lokr_w2_b"].shape[1]) if factored else parts["lokr_w2"].shape
        return rank, (int(w1.shape[0] * w2_shape[0]), int(w1.shape[1] * w2_shape[1]))
    down, up = _first(parts, LORA_DOWN), _first(parts, LORA_UP)
    return int(down.shape[0]), (int(up.shape[0]), int(down.shape[1]))


def _peft_alphas(metadata: dict[str, str]) -> tuple[float | None, dict]:
    """(lora_alpha, alpha_pattern) of a diffusers file's peft config (`lora_adapter_metadata`), if it has one."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None, {}
    config = {k.removeprefix("transformer."): v for k, v in json.loads(raw).items()}
    # LoRA's config names it lora_alpha, peft's LoKr / LoHa configs alpha
    return config.get("lora_alpha", config.get("alpha")), config.get("alpha_pattern") or {}


def _producer(metadata: dict[str, str]) -> str | None:
    if "flux2lora.format" in metadata or "flux2lora.flavour" in metadata:
        return "flux2lora"
    software = metadata.get("software")
    if software:
        try:
            return json.loads(software).get("name") or software
        except (ValueError, AttributeError):
            return software
    if any(k.startswith("ss_") for k in metadata):
        return "kohya sd-scripts / musubi-tuner"
    return None


def read_adapter(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
        return load_file(str(path)), metadata
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path}: not a safetensors file ({e})") from None


def _group(state: dict[str, torch.Tensor]) -> tuple[str, str, str, dict[str, dict[str, torch.Tensor]], list[str]]:
    """(layout, naming, separator, {module: {suffix: tensor}}, unreadable keys): the most common layout wins."""
    counts: dict[tuple, int] = {}
    for key in state:
        layout = _layout_of(key)
        counts[layout] = counts.get(layout, 0) + 1
    prefix, layout, naming, separator = max(counts, key=lambda k: (k[1] != "unknown", counts[k]))
    modules: dict[str, dict[str, torch.Tensor]] = {}
    unreadable = []
    for key, value in state.items():
        split = _split(key, prefix) if _layout_of(key)[1] == layout else None
        if split is None:
            unreadable.append(key)
        else:
            modules.setdefault(split[0], {})[split[1]] = value
    return layout, naming, separator, modules, unreadable


def _report_for(path: Path, flavour: str, grouped, metadata: dict[str, str]) -> InspectReport:
    layout, naming, separator, modules, unreadable = grouped
    table = _module_map(flavour, naming, separator) if naming else {}
    lora_alpha, alpha_pattern = _peft_alphas(metadata)
    report = InspectReport(file=path.name, layout=layout, kind="", flavour=flavour, unmatched_keys=list(unreadable),
                           producer=_producer(metadata))
    prefix = next((p for p, lay, _, _ in PREFIXES if lay == layout), "")
    for module, parts in sorted(modules.items()):
        if module not in table:
            report.unmatched_keys += [f"{prefix}{module}.{suffix}" for suffix in sorted(parts)]
            continue
        kind = _kind(parts)
        try:
            rank, shape = _rank_and_shape(kind, parts)
        except (KeyError, TypeError, AttributeError, RuntimeError):  # an incomplete module: say so, do not guess
            report.unmatched_keys += [f"{prefix}{module}.{suffix} (incomplete {kind} module)" for suffix in sorted(parts)]
            continue
        if "alpha" in parts:
            alpha = float(parts["alpha"].item())
        elif lora_alpha is not None:
            from .export import pattern_key_of

            diffusers_name = table[module][0][0]
            alpha = float(alpha_pattern.get(pattern_key_of(alpha_pattern.keys(), diffusers_name), lora_alpha))
        else:
            alpha = None
        targets, expected = table[module]
        if tuple(shape) != tuple(expected):
            report.shape_mismatches.append(f"{module}: delta {tuple(shape)}, {flavour}'s module {tuple(expected)}")
        report.modules.append(ModuleReport(module=module, targets=list(targets), kind=kind, rank=rank, alpha=alpha,
                                           delta_shape=tuple(shape)))
    kinds = sorted({m.kind for m in report.modules})
    report.kind = "+".join(kinds) if kinds else "none"
    return report


def inspect_adapter(path: Path, flavour: str | None = None) -> InspectReport:
    """Read an adapter file and report its layout, kind, modules and the keys that fit no module of the flavour.

    `flavour` None: the file's `flux2lora.flavour` metadata, else the flavour (real ones first, then the tiny test
    flavours) whose modules fit the most keys with the right shapes.
    """
    from .flavours import FLAVOURS, REAL_FLAVOURS, get_flavour

    path = Path(path)
    state, metadata = read_adapter(path)
    if not state:
        raise ValueError(f"{path}: holds no tensors")
    grouped = _group(state)
    if flavour is not None:
        get_flavour(flavour)  # a clear error for an unknown name
        candidates = [flavour]
    elif metadata.get("flux2lora.flavour") in FLAVOURS:
        candidates = [metadata["flux2lora.flavour"]]
    else:
        candidates = [*REAL_FLAVOURS, *(name for name in FLAVOURS if name not in REAL_FLAVOURS)]
    reports = [_report_for(path, name, grouped, metadata) for name in candidates]
    best = min(reports, key=lambda r: (len(r.unmatched_keys) + len(r.shape_mismatches), candidates.index(r.flavour)))
    best.flavour_from = "option" if flavour is not None else "metadata" if len(candidates) == 1 else "fit"
    return best
