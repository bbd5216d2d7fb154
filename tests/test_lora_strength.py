"""Every consumer of the diffusers-format LoRA file applies the trained strength when alpha != rank.

ComfyUI reads no `lora_adapter_metadata`: for a module `x` it applies `up @ down * alpha / rank` when the file has a
tensor `x.alpha`, else `up @ down` (scale 1.0). diffusers and peft apply `lora_alpha / r` from the metadata. The
file therefore holds each module's scale inside lora_B and says alpha = r: both readings give the trained delta.
(`.alpha` tensors are not an option: diffusers' FLUX.2 loader refuses them, see the last test.)

The ComfyUI reading below is ours, written from ComfyUI's documented behaviour (no code of ComfyUI's).
Tolerance: deltas are compared in fp64 from fp32 weights; baking the scale into B rounds each element of B once
in fp32, so the relative difference is at most ~1e-7: MAX_RELATIVE_DIFF = 1e-6 of the module's largest delta.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import Flux2KleinPipeline, Flux2Pipeline
from peft.tuners.lora import LoraLayer
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from flux2lora.export import read_diffusers_lora
from flux2lora.tiny import make_tiny_model
from flux2lora.train.lora import add_lora, lora_state_dict, save_diffusers_lora, target_modules

MAX_RELATIVE_DIFF = 1e-6
RANK, ALPHA = 4, 6  # scale 1.5: ComfyUI would apply 1/1.5 = 0.667x of the strength without the fix
PIPELINES = {"klein-4b": Flux2KleinPipeline, "dev": Flux2Pipeline}


@pytest.fixture(scope="module", params=sorted(PIPELINES))
def tiny(request, tmp_path_factory) -> tuple[str, Path]:
    flavour = request.param
    return flavour, make_tiny_model(tmp_path_factory.mktemp(flavour) / "model", flavour=flavour)


def peft_deltas(transformer) -> dict[str, torch.Tensor]:
    """{module: scaling * B @ A} (fp64) of the adapter as peft applies it in the model."""
    out = {}
    for name, module in transformer.named_modules():
        if isinstance(module, LoraLayer) and module.active_adapters:
            adapter = module.active_adapters[0]
            a, b = module.lora_A[adapter].weight.double(), module.lora_B[adapter].weight.double()
            out[name] = (b @ a) * module.scaling[adapter]
    return out


def trained_transformer(flavour: str, model: Path, rank: int = RANK, alpha: float = ALPHA):
    """The tiny model's transformer with a LoRA whose B is random (as after training; B = 0 at init)."""
    pipe = PIPELINES[flavour].from_pretrained(model)
    transformer = pipe.transformer
    add_lora(transformer, rank, alpha, 0.0, target_modules(transformer, "all"))
    g = torch.Generator().manual_seed(1)
    for name, param in transformer.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=g)
    return transformer


def comfyui_deltas(path: Path) -> dict[str, torch.Tensor]:
    """ComfyUI's reading of a diffusers-layout file: per module `x`, delta = up @ down * alpha / rank with alpha
    from `x.alpha` when present, else scale 1.0 (rank = down's first dimension). The metadata is not read."""
    state = load_file(str(path))
    out = {}
    for key in state:
        if key.endswith(".lora_A.weight"):
            module = key.removesuffix(".lora_A.weight")
            down, up = state[key].double(), state[f"{module}.lora_B.weight"].double()
            alpha = state.get(f"{module}.alpha")
            scale = 1.0 if alpha is None else alpha.item() / down.shape[0]
            out[module.removeprefix("transformer.")] = (up @ down) * scale
    return out


def assert_same_deltas(got: dict, expected: dict) -> float:
    assert set(got) == set(expected) and expected
    worst = 0.0
    for module, delta in expected.items():
        worst = max(worst, ((got[module] - delta).abs().max() / delta.abs().max()).item())
    assert worst <= MAX_RELATIVE_DIFF, worst
    return worst


def test_comfyui_reading_gives_the_trained_delta(tiny, tmp_path):
    flavour, model = tiny
    transformer = trained_transformer(flavour, model)
    trained = peft_deltas(transformer)
    path = save_diffusers_lora(transformer, PIPELINES[flavour], tmp_path, {"alpha": ALPHA, "rank": RANK})
    worst = assert_same_deltas(comfyui_deltas(path), trained)
    print(f"\n{flavour}: ComfyUI-style reading, max relative delta diff {worst:.2e} over {len(trained)} modules")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    _, config, _ = read_diffusers_lora(path)  # the peft config, `transformer.` prefix dropped
    assert config["lora_alpha"] == config["r"] == RANK and not config.get("use_rslora")
    assert meta["flux2lora.alpha"] == str(ALPHA) and meta["flux2lora.alpha_applied"] == "true"


def test_diffusers_loads_the_same_deltas_as_the_unbaked_file(tiny, tmp_path):
    """The flavour's pipeline (Flux2KleinPipeline / Flux2Pipeline) loads our file with its own load_lora_weights and
    applies the trained deltas, exactly those it applies from a file in the old layout (unscaled B, alpha 6 in the
    peft config), so nothing is scaled twice."""
    flavour, model = tiny
    cls = PIPELINES[flavour]
    transformer = trained_transformer(flavour, model)
    trained = peft_deltas(transformer)
    ours = save_diffusers_lora(transformer, cls, tmp_path / "ours", {})
    old = tmp_path / "old"
    cls.save_lora_weights(old, transformer_lora_layers=lora_state_dict(transformer),
                          transformer_lora_adapter_metadata={**transformer.peft_config["default"].to_dict(),
                                                             "lora_dropout": 0.0})
    loaded = {}
    for name, folder in (("ours", ours.parent), ("old", old)):
        pipe = cls.from_pretrained(model)
        pipe.load_lora_weights(str(folder), weight_name="pytorch_lora_weights.safetensors")
        loaded[name] = peft_deltas(pipe.transformer)
    assert_same_deltas(loaded["old"], trained)  # the reference: diffusers' reading of the peft config
    worst = assert_same_deltas(loaded["ours"], loaded["old"])
    print(f"\n{flavour}: {cls.__name__}.load_lora_weights, ours vs old layout: max relative diff {worst:.2e}")


def test_rank_equal_alpha_file_is_unchanged_by_the_baking(tiny, tmp_path):
    flavour, model = tiny
    transformer = trained_transformer(flavour, model, rank=4, alpha=4)
    path = save_diffusers_lora(transformer, PIPELINES[flavour], tmp_path, {})
    state = load_file(str(path))
    raw = lora_state_dict(transformer)
    assert all(torch.equal(state[f"transformer.{k}"], v) for k, v in raw.items())


def test_diffusers_flux2_loader_refuses_alpha_tensors(tiny, tmp_path):
    """Why the scale goes into B and not into ComfyUI's `<module>.alpha` tensors: diffusers 0.42.1's FLUX.2
    load_lora_weights rejects every key without "lora" in it. Should a diffusers release accept them, this test
    fails and `.alpha` tensors can be reconsidered."""
    flavour, model = tiny
    cls = PIPELINES[flavour]
    transformer = trained_transformer(flavour, model)
    path = save_diffusers_lora(transformer, cls, tmp_path / "ours", {})
    state = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    modules = {k.rsplit(".lora_", 1)[0] for k in state}
    save_file({**state, **{f"{m}.alpha": torch.tensor(float(RANK)) for m in modules}},
              str(tmp_path / "with_alpha.safetensors"), metadata=meta)
    pipe = cls.from_pretrained(model)
    with pytest.raises(ValueError, match="Invalid adapter checkpoint"):
        pipe.load_lora_weights(str(tmp_path), weight_name="with_alpha.safetensors")


def test_the_lora_file_is_byte_identical_across_processes(tmp_path):
    """The whole diffusers file (weights, peft config, metadata) from two processes with different hash seeds: the
    peft config's target_modules set and safetensors' metadata map would otherwise come out in another order."""
    flavour = "klein-4b"
    model = make_tiny_model(tmp_path / "model", flavour=flavour)
    script = (
        "import sys, torch; from pathlib import Path\n"
        "sys.path.insert(0, sys.argv[3])\n"
        "from test_lora_strength import PIPELINES, trained_transformer\n"
        "from flux2lora.train.lora import save_diffusers_lora\n"
        "torch.manual_seed(0)  # peft draws lora_A from the global generator\n"
        "t = trained_transformer(sys.argv[1], Path(sys.argv[2]))\n"
        "save_diffusers_lora(t, PIPELINES[sys.argv[1]], Path(sys.argv[4]), {'alpha': 6, 'rank': 4})\n")
    outputs = []
    for seed in ("1", "2"):
        out = tmp_path / seed
        subprocess.run([sys.executable, "-c", script, flavour, str(model), str(Path(__file__).parent), str(out)],
                       check=True, env={**os.environ, "PYTHONHASHSEED": seed}, capture_output=True)
        outputs.append((out / "pytorch_lora_weights.safetensors").read_bytes())
    assert outputs[0] == outputs[1]
    data = outputs[0]
    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])  # safe_open's metadata() is a hash map too
    keys = list(header["__metadata__"])
    assert keys == sorted(keys) and "flux2lora.alpha_applied" in keys
