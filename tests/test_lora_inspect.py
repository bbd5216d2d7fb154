"""`flux2lora lora inspect`: layout, kind, rank/alpha and modules of adapter files in every trainer's layout.

Our own files come from our own export code (a tiny transformer's LoRA saved by save_diffusers_lora and export_bfl).
The other trainers' files are written here from their documented key formats, at klein-4b's real module shapes
(rank 2, so they stay small): kohya / musubi-tuner `lora_unet_<bfl name>.lora_down/lora_up/alpha`, SimpleTuner's
LyCORIS `lycoris_<diffusers name>.lokr_w1/...`, LyCORIS LoHa `hada_w1_a/...` and DoRA `dora_scale` in the
BFL / ComfyUI layout, ai-toolkit's `diffusion_model.*.lora_A/B` with its `software` metadata, peft's
`base_model.model.*`. No peer code is used.
"""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import Flux2KleinPipeline, Flux2Transformer2DModel
from safetensors.torch import save_file
from typer.testing import CliRunner

from flux2lora.adapter_files import inspect_adapter
from flux2lora.cli import app
from flux2lora.export import export_bfl
from flux2lora.flavours import get_flavour
from flux2lora.train.lora import add_lora, flavour_linear_shapes, save_diffusers_lora, target_modules

RANK = 2


@pytest.fixture(scope="module")
def our_files(tmp_path_factory):
    """(diffusers file, BFL file) of a tiny klein-4b LoRA (preset `all`, rank 4, alpha 8, random B)."""
    folder = tmp_path_factory.mktemp("ours")
    torch.manual_seed(0)
    model = Flux2Transformer2DModel(**get_flavour("tiny-klein-4b").full_transformer_config)
    add_lora(model, 4, 8.0, 0.0, target_modules(model, "all"))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_()
    diffusers_file = save_diffusers_lora(model, Flux2KleinPipeline, folder, {"flavour": "tiny-klein-4b"})
    bfl_file = export_bfl(diffusers_file, folder / "lora_bfl.safetensors")
    return diffusers_file, bfl_file


def test_our_diffusers_export(our_files):
    report = inspect_adapter(our_files[0])
    n_linear = len(target_modules(Flux2Transformer2DModel(**get_flavour("tiny-klein-4b").full_transformer_config),
                                  "all"))
    assert (report.layout, report.kind, report.flavour, report.producer) == ("diffusers", "lora", "tiny-klein-4b",
                                                                              "flux2lora")
    assert report.flavour_from == "metadata"
    assert len(report.modules) == len(report.targets) == n_linear
    # the file's peft config says alpha = r (alpha / r is baked into B): scale 1 in every consumer
    assert {(m.rank, m.alpha) for m in report.modules} == {(4, 4.0)}
    assert not report.unmatched_keys and not report.shape_mismatches


def test_our_bfl_export(our_files):
    report = inspect_adapter(our_files[1])
    assert (report.layout, report.kind, report.flavour) == ("bfl", "lora", "tiny-klein-4b")
    qkv = next(m for m in report.modules if m.module == "double_blocks.0.img_attn.qkv")
    assert qkv.targets == ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k",
                           "transformer_blocks.0.attn.to_v"]
    assert qkv.rank == 3 * 4 and qkv.alpha is None  # stacked A; no alpha stored (scale 1: alpha is in B)
    # the fused file touches the same transformer modules as the diffusers file it came from
    assert report.targets == inspect_adapter(our_files[0]).targets
    assert len(report.modules) < len(report.targets)


def _lora_pair(out_features: int, in_features: int, down: str, up: str, prefix: str) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{down}": torch.randn(RANK, in_features), f"{prefix}.{up}": torch.randn(out_features, RANK)}


@pytest.fixture(scope="module")
def klein4b():
    """klein-4b's real (out, in) per diffusers module, from the meta-device model."""
    return flavour_linear_shapes("klein-4b")


def _kohya_file(shapes) -> dict[str, torch.Tensor]:
    hidden = shapes["transformer_blocks.0.attn.to_q"][0]
    out = {}
    for n in range(5):
        out |= _lora_pair(3 * hidden, hidden, "lora_down.weight", "lora_up.weight",
                          f"lora_unet_double_blocks_{n}_img_attn_qkv")
        out[f"lora_unet_double_blocks_{n}_img_attn_qkv.alpha"] = torch.tensor(1.0)
    for n in range(20):
        o, i = shapes[f"single_transformer_blocks.{n}.attn.to_qkv_mlp_proj"]
        out |= _lora_pair(o, i, "lora_down.weight", "lora_up.weight", f"lora_unet_single_blocks_{n}_linear1")
        out[f"lora_unet_single_blocks_{n}_linear1.alpha"] = torch.tensor(1.0)
    return out


def _lokr_file(shapes) -> dict[str, torch.Tensor]:
    """SimpleTuner's LyCORIS LoKr naming: full w1 (factor x factor), w2 full or factored (w2_a @ w2_b)."""
    factor = 4
    out = {}
    for name in ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_add_out"):
        o, i = shapes[name]
        key = "lycoris_" + name.replace(".", "_")
        out[f"{key}.lokr_w1"] = torch.randn(factor, factor)
        out[f"{key}.lokr_w2"] = torch.randn(o // factor, i // factor)
        out[f"{key}.alpha"] = torch.tensor(16.0)
    o, i = shapes["single_transformer_blocks.3.attn.to_qkv_mlp_proj"]
    key = "lycoris_single_transformer_blocks_3_attn_to_qkv_mlp_proj"
    out |= {f"{key}.lokr_w1": torch.randn(factor, factor), f"{key}.lokr_w2_a": torch.randn(o // factor, RANK),
            f"{key}.lokr_w2_b": torch.randn(RANK, i // factor), f"{key}.alpha": torch.tensor(16.0)}
    return out


def _loha_file(shapes) -> dict[str, torch.Tensor]:
    o, i = shapes["transformer_blocks.1.attn.to_out.0"]
    key = "diffusion_model.double_blocks.1.img_attn.proj"
    return {f"{key}.hada_w1_a": torch.randn(o, RANK), f"{key}.hada_w1_b": torch.randn(RANK, i),
            f"{key}.hada_w2_a": torch.randn(o, RANK), f"{key}.hada_w2_b": torch.randn(RANK, i),
            f"{key}.alpha": torch.tensor(2.0)}


def _dora_file(shapes) -> dict[str, torch.Tensor]:
    o, i = shapes["single_transformer_blocks.0.attn.to_out"]
    key = "diffusion_model.single_blocks.0.linear2"
    return {**_lora_pair(o, i, "lora_A.weight", "lora_B.weight", key), f"{key}.dora_scale": torch.randn(o, 1),
            f"{key}.alpha": torch.tensor(2.0)}


def _peft_file(shapes) -> dict[str, torch.Tensor]:
    o, i = shapes["transformer_blocks.2.ff.linear_in"]
    return _lora_pair(o, i, "lora_A.weight", "lora_B.weight", "base_model.model.transformer_blocks.2.ff.linear_in")


def _ai_toolkit_file(shapes) -> dict[str, torch.Tensor]:
    o, i = shapes["transformer_blocks.4.ff_context.linear_out"]
    return _lora_pair(o, i, "lora_A.weight", "lora_B.weight", "diffusion_model.double_blocks.4.txt_mlp.2")


@pytest.mark.parametrize("builder,metadata,layout,kind,count,rank,alpha", [
    (_kohya_file, {"ss_network_dim": "2"}, "kohya", "lora", 25, RANK, 1.0),
    (_lokr_file, None, "lycoris", "lokr", 3, None, 16.0),
    (_loha_file, None, "bfl", "loha", 1, RANK, 2.0),
    (_dora_file, None, "bfl", "dora", 1, RANK, 2.0),
    (_peft_file, None, "peft", "lora", 1, RANK, None),
    (_ai_toolkit_file, {"software": json.dumps({"name": "ai-toolkit", "version": "0"})}, "bfl", "lora", 1, RANK,
     None),
])
def test_other_trainers_layouts(tmp_path, klein4b, builder, metadata, layout, kind, count, rank, alpha):
    path = tmp_path / "adapter.safetensors"
    save_file(builder(klein4b), str(path), metadata=metadata)
    report = inspect_adapter(path)  # no --flavour: the modules' names and shapes say klein-4b
    assert report.flavour_from == "fit"
    assert (report.layout, report.kind, report.flavour, len(report.modules)) == (layout, kind, "klein-4b", count)
    assert not report.unmatched_keys and not report.shape_mismatches
    assert report.modules[-1].rank == rank and report.modules[-1].alpha == alpha
    for m in report.modules:  # the delta's shape is the module's (fused qkv: three projections tall)
        assert m.delta_shape[1] == klein4b[m.targets[0]][1]
        assert m.delta_shape[0] == sum(klein4b[t][0] for t in m.targets)
    if builder is _ai_toolkit_file:
        assert report.producer == "ai-toolkit"


def test_keys_of_no_module_are_listed_and_fail_the_command(tmp_path, klein4b):
    state = _ai_toolkit_file(klein4b)
    hidden = klein4b["transformer_blocks.0.attn.to_q"][0]
    # a sixth double block (klein-4b has five) and FLUX.1's per-block modulation (FLUX.2 shares it)
    state |= _lora_pair(3 * hidden, hidden, "lora_A.weight", "lora_B.weight", "diffusion_model.double_blocks.5.img_attn.qkv")
    state |= _lora_pair(6 * hidden, hidden, "lora_A.weight", "lora_B.weight", "diffusion_model.double_blocks.0.img_mod.lin")
    state["diffusion_model.double_blocks.4.txt_mlp.2.lora_mid.weight"] = torch.zeros(1)  # no adapter tensor's name
    path = tmp_path / "mixed.safetensors"
    save_file(state, str(path))
    report = inspect_adapter(path, "klein-4b")
    assert len(report.modules) == 1
    assert sorted(report.unmatched_keys) == sorted([
        "diffusion_model.double_blocks.4.txt_mlp.2.lora_mid.weight",
        "diffusion_model.double_blocks.5.img_attn.qkv.lora_A.weight",
        "diffusion_model.double_blocks.5.img_attn.qkv.lora_B.weight",
        "diffusion_model.double_blocks.0.img_mod.lin.lora_A.weight",
        "diffusion_model.double_blocks.0.img_mod.lin.lora_B.weight"])
    result = CliRunner().invoke(app, ["lora", "inspect", str(path), "--flavour", "klein-4b", "--json"])
    assert result.exit_code == 1, result.output
    assert json.loads(result.output)["unmatched_keys"] == report.unmatched_keys


def test_another_flavours_file_shows_shape_mismatches(tmp_path, klein4b):
    path = tmp_path / "k4.safetensors"
    save_file(_kohya_file(klein4b), str(path))
    report = inspect_adapter(path, "klein-9b")  # the same names exist in klein-9b, at width 4096
    assert report.shape_mismatches and len(report.shape_mismatches) == len(report.modules) == 25


def test_the_command_prints_the_table_and_json(our_files):
    runner = CliRunner()
    table = runner.invoke(app, ["lora", "inspect", str(our_files[1])])
    assert table.exit_code == 0, table.output
    assert "layout bfl" in table.output and "double_blocks.0.img_attn.qkv" in table.output
    data = json.loads(runner.invoke(app, ["lora", "inspect", str(our_files[0]), "--json"]).output)
    assert (data["layout"], data["kind"], data["flavour"]) == ("diffusers", "lora", "tiny-klein-4b")
    assert data["num_modules"] == len(data["modules"]) > 0


def test_not_an_adapter_file_is_a_message(tmp_path):
    bad = tmp_path / "notes.safetensors"
    bad.write_text("hello")
    result = CliRunner().invoke(app, ["lora", "inspect", str(bad)])
    assert result.exit_code == 2 and "not a safetensors file" in result.output
    result = CliRunner().invoke(app, ["lora", "inspect", str(tmp_path / "missing.safetensors")])
    assert result.exit_code == 2 and "no such file" in result.output
