"""The training engine's guarantees: exact LoRA targets, checkpoints of their own run only, a clear stop on NaN.

Resume after SIGKILL, bitwise, for every adapter kind and flavour: tests/test_lycoris_resume.py."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import Flux2Transformer2DModel
from safetensors.torch import load_file

from flux2lora.flavours import get_flavour
from flux2lora.stages import run_stage
from flux2lora.train.lora import PRESETS, target_modules
from flux2lora.train.step import TrainingDiverged

DOUBLE_ALL = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
              "attn.add_v_proj", "attn.to_add_out", "ff.linear_in", "ff.linear_out", "ff_context.linear_in",
              "ff_context.linear_out"]


def _expected(preset: str, n_double: int, n_single: int) -> set[str]:
    double = {"all": DOUBLE_ALL, "attention": DOUBLE_ALL[:8], "mlp": DOUBLE_ALL[8:],
              "tiny": ["attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj",
                       "attn.add_v_proj"],
              "diffusers-example": DOUBLE_ALL[:4]}[preset]
    single = ["attn.to_qkv_mlp_proj"] if preset == "tiny" else ["attn.to_qkv_mlp_proj", "attn.to_out"]
    return ({f"transformer_blocks.{i}.{m}" for i in range(n_double) for m in double}
            | {f"single_transformer_blocks.{i}.{m}" for i in range(n_single) for m in single})


@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("flavour", ["tiny-klein-4b", "tiny-klein-9b", "tiny-dev"])
def test_each_preset_selects_exactly_its_modules_and_peft_wraps_exactly_those(flavour, preset):
    config = get_flavour(flavour).full_transformer_config
    model = Flux2Transformer2DModel(**config)
    targets = target_modules(model, preset)
    assert set(targets) == _expected(preset, config["num_layers"], config["num_single_layers"])
    from peft import LoraConfig

    model.add_adapter(LoraConfig(r=2, target_modules=targets))
    wrapped = {name for name, module in model.named_modules() if hasattr(module, "lora_A")}
    assert wrapped == set(targets)  # exact paths: a bare "to_out" would have caught the ModuleList too


def test_real_flavour_presets_have_the_documented_module_counts():
    """The module lists at real size, from the real block counts (no weights needed: the meta device)."""
    counts = {}
    for name in ("klein-4b", "klein-9b", "dev"):
        with torch.device("meta"):
            model = Flux2Transformer2DModel(**get_flavour(name).full_transformer_config)
        counts[name] = {p: len(target_modules(model, p)) for p in PRESETS}
    assert counts["klein-4b"] == {"all": 5 * 12 + 20 * 2, "attention": 5 * 8 + 20 * 2, "mlp": 5 * 4 + 20 * 2,
                                  "tiny": 5 * 6 + 20, "diffusers-example": 5 * 4 + 20 * 2}
    assert counts["dev"]["all"] == 8 * 12 + 48 * 2
    assert counts["klein-9b"]["tiny"] == 8 * 6 + 24


def _encoded(tmp_path, name, **params):
    from helpers import make_project

    root = make_project(tmp_path / name, git=False, images=6,
                        **{"train.max_train_steps": 20, "train.checkpointing_steps": 5, "train.train_batch_size": 2,
                           "train.checkpoints_total_limit": 2, **params})
    for stage in ("prepare", "encode-text", "encode-latents"):
        run_stage(stage, root / "params.yaml")
    return root


def test_checkpoints_keep_only_the_newest_and_belong_to_their_run(tmp_path):
    root = _encoded(tmp_path, "p")
    run_stage("train", root / "params.yaml")
    names = sorted(p.name for p in (root / "outputs/checkpoints").iterdir())
    assert names == ["step-000010", "step-000015"]  # limit 2; no checkpoint of the final step (the LoRA is)
    from helpers import set_params

    set_params(root, **{"train.learning_rate": 0.5})
    summary = run_stage("train", root / "params.yaml")
    assert summary["resumed_from_step"] == 0  # other params: the old run's checkpoints are not resumed


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(tmp_path):
    from flux2lora.cache.store import TensorStore

    root = _encoded(tmp_path, "p", **{"train.max_train_steps": 40})
    index = json.loads((root / "outputs/latents/index.json").read_text())
    store = TensorStore(root / "outputs/latents")
    # One damaged cache entry: training reaches it at some step after the first checkpoint.
    victim = sorted(index["images"].values())[0]
    latents = store.get(victim)["latents"]
    latents[0, 0, 0] = float("nan")
    store.put(victim, {"latents": latents})
    with pytest.raises(TrainingDiverged, match=r"loss became nan at step \d+.*last good checkpoint"):
        run_stage("train", root / "params.yaml")
    checkpoints = list((root / "outputs/checkpoints").glob("step-*"))
    assert not (root / "outputs/lora/pytorch_lora_weights.safetensors").exists()
    for checkpoint in checkpoints:
        state = load_file(str(checkpoint / "lora.safetensors"))
        assert all(torch.isfinite(t).all() for t in state.values())


def test_gradient_accumulation_of_two_half_batches_equals_one_full_batch_step():
    """Two micro-batches of one sample accumulate to the gradient of one batch of both: with plain SGD the LoRA
    after the step is the same to float precision."""
    from peft import LoraConfig

    from flux2lora.train.step import MicroBatch, TrainingStep

    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 128, 4, 4, generator=g), torch.randn(2, 128, 4, 4, generator=g)
    embeds, sigmas = torch.randn(2, 7, 48, generator=g), torch.tensor([0.3, 0.7])

    def lora_after_one_step(micro_batches):
        torch.manual_seed(0)
        model = Flux2Transformer2DModel(**get_flavour("tiny-klein-4b").full_transformer_config)
        model.requires_grad_(False)
        model.add_adapter(LoraConfig(r=2, init_lora_weights="gaussian", target_modules=target_modules(model, "all")))
        params = [p for p in model.parameters() if p.requires_grad]
        for p in params:  # non-zero B so that A gets a gradient too
            p.data.normal_(0, 0.05, generator=torch.Generator().manual_seed(p.numel()))
        before.append([p.detach().clone() for p in params])
        sgd = torch.optim.SGD(params, lr=1.0)
        step = TrainingStep(model, params, sgd, torch.optim.lr_scheduler.LambdaLR(sgd, lambda _: 1.0),
                            max_grad_norm=0)
        step(micro_batches)
        return [p.detach().clone() for p in params]

    before = []
    whole = lora_after_one_step([MicroBatch(x0, embeds, noise, sigmas)])
    assert all((a - b).abs().max() > 0 for a, b in zip(whole, before[0]))  # every LoRA matrix got a gradient
    halves = lora_after_one_step([MicroBatch(x0[i:i + 1], embeds[i:i + 1], noise[i:i + 1], sigmas[i:i + 1])
                                  for i in range(2)])
    assert max((a - b).abs().max().item() for a, b in zip(whole, halves)) <= 1e-6


@pytest.mark.parametrize("init", ["default", "gaussian"])
def test_lora_init_types_start_as_a_no_op_with_their_own_a(init):
    """lora_init_type: B = 0 (the adapter changes nothing before training), A Kaiming-uniform or N(0, 1/r)."""
    from flux2lora.train.lora import add_lora

    torch.manual_seed(0)
    model = Flux2Transformer2DModel(**get_flavour("tiny-klein-4b").full_transformer_config)
    model.requires_grad_(False)
    add_lora(model, 4, None, 0.0, target_modules(model, "all"), init)
    a = model.transformer_blocks[0].attn.to_q.lora_A["default"].weight
    b = model.transformer_blocks[0].attn.to_q.lora_B["default"].weight
    assert torch.count_nonzero(b) == 0
    if init == "gaussian":
        assert abs(a.std().item() - 1 / 4) < 0.05
    else:  # Kaiming-uniform with a = sqrt(5): bound 1/sqrt(fan_in)
        assert a.abs().max().item() <= 1 / a.shape[1] ** 0.5 + 1e-6 and abs(a.std().item() - 0.25) > 0.05
