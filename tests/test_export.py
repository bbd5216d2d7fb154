"""LoRA files every tool loads: the diffusers file in both FLUX.2 pipelines, and the BFL / ComfyUI file, which
diffusers' own FLUX.2 converter turns back into exactly the diffusers file's weight deltas."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import Flux2KleinPipeline, Flux2Pipeline
from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_flux2_lora_to_diffusers
from helpers import make_project
from safetensors import safe_open
from typer.testing import CliRunner

from flux2lora.config import load_params
from flux2lora.export import diffusers_to_bfl, export_bfl, lora_deltas, read_diffusers_lora
from flux2lora.layout import layout_for
from flux2lora.stages import STAGES, run_stage

MAX_DELTA_DIFF = 1e-6
METADATA_KEYS = ("base_model", "revision", "flavour", "rank", "alpha", "trigger_phrase", "steps", "training_data_sha256")


@pytest.fixture(scope="module")
def dev_project(tmp_path_factory) -> Path:
    """A tiny dev project through all six stages, with alpha != rank (scale 1.5) so baking alpha into B matters."""
    root = make_project(tmp_path_factory.mktemp("dev") / "project", flavour="dev", git=False, **{
        "train.max_train_steps": 4, "train.lora_rank": 4, "train.lora_alpha": 6, "train.checkpointing_steps": 100,
        "validate.validation_num_inference_steps": 2})
    for name in STAGES:
        run_stage(name, root / "params.yaml")
    return root


@pytest.fixture(params=["klein-4b", "dev"])
def project(request) -> Path:
    """The trained tiny klein-4b project (session fixture) and the tiny dev project above."""
    return request.getfixturevalue("trained_project" if request.param == "klein-4b" else "dev_project")


def files_of(root: Path) -> tuple[Path, Path]:
    """(diffusers file, BFL file) as the publish stage wrote them."""
    publish_dir = layout_for(root, load_params(root / "params.yaml").output_dir).publish_dir
    bfl = list(publish_dir.glob("*_bfl.safetensors"))
    assert len(bfl) == 1, sorted(p.name for p in publish_dir.iterdir())
    return publish_dir / "pytorch_lora_weights.safetensors", bfl[0]


def pipeline_for(root: Path):
    params = load_params(root / "params.yaml")
    cls = Flux2KleinPipeline if params.model.flavour.is_klein else Flux2Pipeline
    pipe = cls.from_pretrained(params.model.model_path)
    pipe.set_progress_bar_config(disable=True)
    return pipe, params


def render(pipe, params) -> np.ndarray:
    return pipe(prompt="sks style, a red circle", height=64, width=64, num_inference_steps=2, output_type="np",
                text_encoder_out_layers=params.model.flavour.stacked_layers,
                generator=torch.Generator().manual_seed(0)).images[0]


def test_diffusers_file_loads_in_the_flavours_pipeline_and_changes_the_image(project):
    """Flux2KleinPipeline (klein) and Flux2Pipeline (dev) load the file with their own load_lora_weights."""
    diffusers_file, _ = files_of(project)
    pipe, params = pipeline_for(project)
    base = render(pipe, params)
    pipe.load_lora_weights(str(diffusers_file.parent), weight_name=diffusers_file.name)
    assert np.abs(render(pipe, params) - base).max() > 1e-3


def test_bfl_file_converts_back_to_the_same_weight_deltas(project):
    """The flavour pipeline's `lora_state_dict` runs diffusers' BFL converter on our BFL file; every module's
    delta (scale * B @ A) equals the diffusers file's, whose scale comes from its peft config (alpha / r)."""
    diffusers_file, bfl_file = files_of(project)
    state, config, _ = read_diffusers_lora(diffusers_file)
    flavour = load_params(project / "params.yaml").model.flavour
    pipe_cls = Flux2KleinPipeline if flavour.is_klein else Flux2Pipeline
    converted = pipe_cls.lora_state_dict(str(bfl_file))
    expected, got = lora_deltas(state, config), lora_deltas(converted)
    assert set(got) == set(expected)
    diff = max((got[m] - expected[m]).abs().max().item() for m in expected)
    print(f"\nBFL round trip ({flavour.name}, {len(expected)} modules): max abs delta diff {diff:.3e}")
    assert diff <= MAX_DELTA_DIFF


def test_bfl_file_and_diffusers_file_give_the_same_image(project):
    diffusers_file, bfl_file = files_of(project)
    images = []
    for path in (diffusers_file, bfl_file):
        pipe, params = pipeline_for(project)
        pipe.load_lora_weights(str(path.parent), weight_name=path.name)
        images.append(render(pipe, params))
    np.testing.assert_allclose(images[1], images[0], atol=1e-4)


def test_bfl_layout_fuses_qkv_with_stacked_A_and_block_diagonal_B(trained_project):
    """ComfyUI applies B @ A to the fused qkv weight: A stacks q, k, v's A; B is block-diagonal (alpha baked in)."""
    diffusers_file, bfl_file = files_of(trained_project)
    state, config, _ = read_diffusers_lora(diffusers_file)
    scale = config["lora_alpha"] / config["r"]
    with safe_open(str(bfl_file), framework="pt") as f:
        bfl = {k: f.get_tensor(k) for k in f.keys()}
    assert all(k.startswith("diffusion_model.") for k in bfl)
    assert {"diffusion_model.single_blocks.0.linear1.lora_A.weight",
            "diffusion_model.single_blocks.0.linear2.lora_B.weight",
            "diffusion_model.double_blocks.0.img_mlp.0.lora_A.weight",
            "diffusion_model.double_blocks.0.txt_attn.proj.lora_B.weight"} <= set(bfl)
    a, b = (bfl[f"diffusion_model.double_blocks.0.img_attn.qkv.lora_{p}.weight"] for p in "AB")
    projections = [f"transformer.transformer_blocks.0.attn.to_{p}" for p in "qkv"]
    r = config["r"]
    assert a.shape[0] == 3 * r and b.shape[1] == 3 * r
    torch.testing.assert_close(a, torch.cat([state[f"{p}.lora_A.weight"] for p in projections]))
    torch.testing.assert_close(b, torch.block_diag(*[state[f"{p}.lora_B.weight"] * scale for p in projections]))


def test_both_files_carry_the_training_metadata(project):
    diffusers_file, bfl_file = files_of(project)
    params = load_params(project / "params.yaml")
    for path in (diffusers_file, bfl_file):
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
        assert all(f"flux2lora.{k}" in meta for k in METADATA_KEYS), (path.name, sorted(meta))
        assert meta["flux2lora.flavour"] == params.model.model_flavour
        assert meta["flux2lora.base_model"] == params.model.model_id  # as params.yaml names it: relocatable
        assert meta["flux2lora.trigger_phrase"] == params.publish.trigger_phrase
        assert int(meta["flux2lora.steps"]) == params.train.max_train_steps
        assert int(meta["flux2lora.rank"]) == params.train.lora_rank
    with safe_open(str(bfl_file), framework="pt") as f:
        meta = f.metadata()
    # diffusers would apply a peft config found in the file to it: the BFL file must carry none
    assert "lora_adapter_metadata" not in meta and meta["flux2lora.format"] == "bfl"


def test_partial_qkv_and_mixed_ranks_round_trip():
    """LoRAs on only some of q/k/v, per-module ranks and alphas (rank_pattern / alpha_pattern) still convert to
    the same deltas: missing projections become zero blocks, smaller ranks are zero-padded."""
    g = torch.Generator().manual_seed(0)

    def pair(r, out, inp):
        return torch.randn(r, inp, generator=g), torch.randn(out, r, generator=g)

    modules = {"transformer_blocks.0.attn.to_q": pair(4, 32, 32), "transformer_blocks.0.attn.to_k": pair(3, 32, 32),
               "transformer_blocks.0.attn.add_v_proj": pair(4, 32, 32), "transformer_blocks.0.ff.linear_in": pair(4, 96, 32),
               "single_transformer_blocks.0.attn.to_qkv_mlp_proj": pair(4, 192, 32),
               "single_transformer_blocks.0.attn.to_out": pair(4, 32, 128)}
    state = {f"transformer.{m}.lora_{p}.weight": t for m, (a, b) in modules.items() for p, t in (("A", a), ("B", b))}
    config = {"r": 4, "lora_alpha": 8, "rank_pattern": {"transformer_blocks.0.attn.to_k": 3},
              "alpha_pattern": {"single_transformer_blocks.0.attn.to_out": 1}}
    converted = _convert_non_diffusers_flux2_lora_to_diffusers(diffusers_to_bfl(state, config))
    expected, got = lora_deltas(state, config), lora_deltas(converted)
    for module, delta in expected.items():
        assert (got[module] - delta).abs().max() <= 1e-6 * delta.abs().max()
    # the projections without a LoRA come back with a zero delta, nothing else appears
    assert set(got) - set(expected) == {"transformer_blocks.0.attn.to_v", "transformer_blocks.0.attn.add_q_proj",
                                        "transformer_blocks.0.attn.add_k_proj"}
    assert all(got[m].abs().max() == 0 for m in set(got) - set(expected))
    assert expected["single_transformer_blocks.0.attn.to_out"].abs().max() > 0


def test_modules_without_a_bfl_name_are_refused():
    state = {"transformer.some_new_block.proj.lora_A.weight": torch.zeros(2, 4),
             "transformer.some_new_block.proj.lora_B.weight": torch.zeros(4, 2)}
    with pytest.raises(ValueError, match="no BFL name.*some_new_block.proj"):
        diffusers_to_bfl(state, {"r": 2, "lora_alpha": 2})


def test_export_command_writes_the_bfl_file_beside_the_lora(trained_project, tmp_path):
    from flux2lora.cli import app

    diffusers_file, published_bfl = files_of(trained_project)
    lora = tmp_path / "my_lora.safetensors"
    lora.write_bytes(diffusers_file.read_bytes())
    result = CliRunner().invoke(app, ["export", str(lora)])
    assert result.exit_code == 0, result.output
    with safe_open(str(tmp_path / "my_lora_bfl.safetensors"), framework="pt") as new, \
            safe_open(str(published_bfl), framework="pt") as old:
        assert set(new.keys()) == set(old.keys())
        assert all(torch.equal(new.get_tensor(k), old.get_tensor(k)) for k in new.keys())


def test_export_refuses_files_without_a_peft_config(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "bare.safetensors"
    save_file({"transformer.x.lora_A.weight": torch.zeros(1, 1)}, str(path))
    with pytest.raises(ValueError, match="lora_adapter_metadata"):
        export_bfl(path, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()
