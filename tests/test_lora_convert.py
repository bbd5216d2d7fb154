"""`flux2lora export --to bfl|diffusers`: a LoRA converted between layouts keeps every module's weight delta.

Deltas are compared in fp64 with MAX_DELTA_DIFF. The diffusers files are loaded back by diffusers' own
`Flux2Transformer2DModel.load_lora_adapter` (its peft config included), and the deltas are read from the loaded peft
layers (scaling * B @ A). The kohya and ComfyUI files are written here from their documented key formats
(`lora_unet_<bfl name>.lora_down/lora_up/alpha`; `diffusion_model.<bfl name>.lora_A/lora_B/alpha`, delta =
alpha / rank * up @ down).
"""

from __future__ import annotations

import pytest
import torch
from diffusers import Flux2KleinPipeline, Flux2Transformer2DModel
from peft.tuners.lora import LoraLayer
from safetensors.torch import save_file
from typer.testing import CliRunner

from flux2lora.adapter_files import bfl_modules, inspect_adapter
from flux2lora.cli import app
from flux2lora.export import export_bfl, export_diffusers, lora_deltas, read_diffusers_lora
from flux2lora.flavours import get_flavour
from flux2lora.train.lora import add_lora, read_lora_metadata, save_diffusers_lora, target_modules

MAX_DELTA_DIFF = 1e-6
FLAVOUR = "tiny-klein-4b"


def _tiny_transformer():
    return Flux2Transformer2DModel(**get_flavour(FLAVOUR).full_transformer_config)


def _our_file(folder, preset: str, rank: int, alpha: float):
    torch.manual_seed(1)
    model = _tiny_transformer()
    add_lora(model, rank, alpha, 0.0, target_modules(model, preset))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_()
    return save_diffusers_lora(model, Flux2KleinPipeline, folder, {"flavour": FLAVOUR})


def loaded_deltas(path) -> dict[str, torch.Tensor]:
    """{module: delta} as diffusers' own loader applies the file to a fresh tiny transformer."""
    model = _tiny_transformer()
    model.load_lora_adapter(str(path.parent), weight_name=path.name, prefix="transformer")
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            adapter = next(iter(module.lora_A))
            out[name] = (module.lora_B[adapter].weight.double() @ module.lora_A[adapter].weight.double()) * \
                module.scaling[adapter]
    return out


def assert_same_deltas(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Equal deltas on every module of either; a module missing from one side must have a zero delta."""
    for module in set(a) | set(b):
        x, y = a.get(module), b.get(module)
        x = torch.zeros_like(y) if x is None else x
        y = torch.zeros_like(x) if y is None else y
        assert (x - y).abs().max().item() <= MAX_DELTA_DIFF, module


@pytest.mark.parametrize("preset,rank,alpha", [("all", 4, 8.0), ("tiny", 2, 1.0), ("diffusers-example", 3, 3.0)])
def test_diffusers_to_bfl_and_back_keeps_every_delta(tmp_path, preset, rank, alpha):
    source = _our_file(tmp_path / "src", preset, rank, alpha)
    state, config, _ = read_diffusers_lora(source)
    trained = lora_deltas(state, config)
    bfl = export_bfl(source, tmp_path / "lora_bfl.safetensors")
    back = export_diffusers(bfl, tmp_path / "back" / "lora.safetensors")
    assert inspect_adapter(back).layout == "diffusers"
    assert read_lora_metadata(back)["flux2lora.format"] == "diffusers"
    assert read_lora_metadata(back)["flux2lora.flavour"] == FLAVOUR
    back_state, back_config, _ = read_diffusers_lora(back)
    assert_same_deltas(trained, lora_deltas(back_state, back_config))
    assert_same_deltas(trained, loaded_deltas(back))  # diffusers' loader, peft config and all
    # and once more: the converted file exports to the same BFL deltas
    again = export_bfl(back, tmp_path / "again_bfl.safetensors")
    assert_same_deltas(inspect_deltas_bfl(bfl), inspect_deltas_bfl(again))


def inspect_deltas_bfl(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return lora_deltas({k.removeprefix("diffusion_model."): v for k, v in load_file(str(path)).items()})


def _bfl_pairs(flavour: str, down: str, up: str, key_of, alpha: float | None, rank: int = 2):
    """A LoRA on every BFL module of the flavour, keys from `key_of(bfl module)`; returns (state, fused deltas)."""
    torch.manual_seed(2)
    state, deltas = {}, {}
    for bfl, (targets, (out_features, in_features)) in bfl_modules(flavour).items():
        if not bfl.startswith(("double_blocks.", "single_blocks.")):
            continue
        key = key_of(bfl)
        state[f"{key}.{down}"] = torch.randn(rank, in_features)
        state[f"{key}.{up}"] = torch.randn(out_features, rank)
        scale = 1.0 if alpha is None else alpha / rank
        if alpha is not None:
            state[f"{key}.alpha"] = torch.tensor(alpha)
        deltas[bfl] = (targets, scale * state[f"{key}.{up}"].double() @ state[f"{key}.{down}"].double())
    return state, deltas


def _split_expected(deltas) -> dict[str, torch.Tensor]:
    """Fused qkv deltas cut into their q, k, v rows (the fused weight is [q; k; v])."""
    out = {}
    for targets, delta in deltas.values():
        for target, part in zip(targets, torch.chunk(delta, len(targets), dim=0)):
            out[target] = part
    return out


@pytest.mark.parametrize("layout", ["kohya", "comfyui-with-alpha", "ai-toolkit"])
def test_other_trainers_bfl_named_files_convert_to_diffusers_with_their_deltas(tmp_path, layout):
    if layout == "kohya":
        state, deltas = _bfl_pairs(FLAVOUR, "lora_down.weight", "lora_up.weight",
                                   lambda m: "lora_unet_" + m.replace(".", "_"), alpha=1.0)
    elif layout == "comfyui-with-alpha":
        state, deltas = _bfl_pairs(FLAVOUR, "lora_A.weight", "lora_B.weight", lambda m: "diffusion_model." + m,
                                   alpha=4.0)
    else:
        state, deltas = _bfl_pairs(FLAVOUR, "lora_A.weight", "lora_B.weight", lambda m: "diffusion_model." + m,
                                   alpha=None)
    source = tmp_path / "peer.safetensors"
    save_file(state, str(source))
    out = export_diffusers(source, tmp_path / "out" / "lora.safetensors", flavour=FLAVOUR)
    assert_same_deltas(_split_expected(deltas), loaded_deltas(out))


def test_only_plain_lora_converts(tmp_path):
    o, i = 96, 32
    key = "lycoris_transformer_blocks_0_attn_to_q"
    save_file({f"{key}.lokr_w1": torch.randn(2, 2), f"{key}.lokr_w2": torch.randn(o // 2, i // 2)},
              str(tmp_path / "lokr.safetensors"))
    with pytest.raises(ValueError, match="a lokr adapter; only plain LoRA files convert"):
        export_diffusers(tmp_path / "lokr.safetensors", tmp_path / "x.safetensors", flavour=FLAVOUR)


def test_export_command_to_diffusers_and_bad_target(tmp_path):
    source = _our_file(tmp_path / "src", "all", 4, 4.0)
    runner = CliRunner()
    result = runner.invoke(app, ["export", str(source), "--to", "bfl", "--out", str(tmp_path / "b.safetensors")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["export", str(tmp_path / "b.safetensors"), "--to", "diffusers"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "b_diffusers.safetensors").exists()
    result = runner.invoke(app, ["export", str(source), "--to", "comfy"])
    assert result.exit_code == 2 and "choose bfl or diffusers" in result.output
