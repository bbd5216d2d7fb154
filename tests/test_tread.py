"""TREAD routing over FLUX.2's double and single blocks: the configured share of image tokens skips the span,
text tokens always pass, positions travel with their tokens, and batches > 1 stay exact."""

from __future__ import annotations

import pytest
import torch
from diffusers import Flux2Transformer2DModel

from flux2lora.flavours import get_flavour
from flux2lora.latents import target_ids, text_ids
from flux2lora.train.tread import Route, BlockLoop, parse_routes


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Flux2Transformer2DModel(**get_flavour("tiny-dev").full_transformer_config).eval()  # 2 double + 2 single


def _inputs(batch=2, h=4, w=4, text=7):
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(batch, 128, h, w, generator=g)
    hidden = latents.flatten(2).transpose(1, 2)
    embeds = torch.randn(batch, text, 48, generator=g)
    return dict(hidden_states=hidden, encoder_hidden_states=embeds, timestep=torch.tensor([0.3] * batch),
                img_ids=target_ids(latents), txt_ids=text_ids(embeds), guidance=torch.tensor([3.5] * batch))


def test_selection_ratio_zero_is_the_plain_forward(model):
    x = _inputs()
    with torch.no_grad():
        plain = model(**x, return_dict=False)[0]
        routed = BlockLoop([Route(0.0, 0, -1)], 4).forward(model, **x)
    assert (plain - routed).abs().max() <= 1e-6


def test_kept_tokens_see_only_each_other_at_their_own_positions_and_skipped_ones_skip_every_block(model):
    x = _inputs(batch=1)
    keep = torch.tensor([0, 3, 5, 6, 9, 12, 15])
    with torch.no_grad():
        routed = BlockLoop([Route(0.5, 0, -1)], 4).forward(model, **x, keep_indices=[keep])
        subset = model(**{**x, "hidden_states": x["hidden_states"][:, keep], "img_ids": x["img_ids"][:, keep]},
                       return_dict=False)[0]
        temb = model.time_guidance_embed(x["timestep"] * 1000, x["guidance"] * 1000)
        untouched = model.proj_out(model.norm_out(model.x_embedder(x["hidden_states"]), temb))
    assert (routed[:, keep] - subset).abs().max() <= 1e-5  # positions travelled with the kept tokens
    skipped = torch.tensor([i for i in range(16) if i not in keep.tolist()])
    assert (routed[:, skipped] - untouched[:, skipped]).abs().max() <= 1e-6


def test_the_configured_share_skips_the_routed_blocks_and_text_always_passes(model):
    x = _inputs()
    seen = {}
    blocks = list(model.transformer_blocks) + list(model.single_transformer_blocks)
    # blocks are called positionally, in their forward's order: hidden_states, encoder_hidden_states, ...
    hooks = [b.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(i, a)) for i, b in enumerate(blocks)]
    try:
        with torch.no_grad():
            out = BlockLoop([Route(0.5, 1, -2)], 4).forward(model, **x, generator=torch.Generator().manual_seed(0))
    finally:
        for h in hooks:
            h.remove()
    assert out.shape == (2, 16, 128)
    double_tokens = lambda args: (args[0].shape[1], args[1].shape[1])  # noqa: E731
    assert double_tokens(seen[0]) == (16, 7)  # before the route: everything
    assert double_tokens(seen[1]) == (8, 7)  # routed double block: half the image tokens, all text
    assert seen[2][0].shape[1] == 7 + 8  # routed single block (end -2 = block 2)
    assert seen[3][0].shape[1] == 7 + 16  # after the route: all tokens again


def test_batches_are_exact_per_sample(model):
    x = _inputs(batch=2)
    keep = torch.tensor([1, 2, 4, 8, 9, 11, 13, 14])
    router = BlockLoop([Route(0.5, 1, 2)], 4)
    with torch.no_grad():
        both = router.forward(model, **x, keep_indices=[keep])
        first = router.forward(model, **{k: v[:1] for k, v in x.items()}, keep_indices=[keep])
    assert (both[:1] - first).abs().max() <= 1e-5


def test_routing_trains_with_gradient_checkpointing(model):
    from peft import LoraConfig

    m = Flux2Transformer2DModel(**get_flavour("tiny-klein-4b").full_transformer_config)
    m.add_adapter(LoraConfig(r=2, init_lora_weights="gaussian",
                             target_modules=["transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.attn.to_out"]))
    m.enable_gradient_checkpointing()
    m.train()
    x = _inputs()
    x["guidance"] = None
    out = BlockLoop(parse_routes({"routes": [{"selection_ratio": 0.25, "start_layer_idx": 0,
                                                "end_layer_idx": -1}]}), 2).forward(m, **x)
    out.square().mean().backward()
    grads = [p.grad for n, p in m.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_bad_routes_are_clear_errors():
    with pytest.raises(ValueError, match="blocks 3..1"):
        BlockLoop([Route(0.5, 3, 1)], 4)
    with pytest.raises(ValueError, match="overlap"):
        BlockLoop([Route(0.5, 0, 2), Route(0.5, 2, 3)], 4)
    with pytest.raises(ValueError, match="selection_ratio"):
        BlockLoop([Route(1.0, 0, 1)], 4)
    with pytest.raises(ValueError, match="start_layer"):
        parse_routes({"routes": [{"selection_ratio": 0.5, "start_layer": 1, "end_layer_idx": 2}]})


def test_training_stage_runs_with_tread_routes(tmp_path):
    from helpers import make_project

    from flux2lora.stages import run_stage

    routes = {"routes": [{"selection_ratio": 0.5, "start_layer_idx": 0, "end_layer_idx": -1}]}
    root = make_project(tmp_path / "p", git=False, images=4,
                        **{"train.tread_config": routes, "train.max_train_steps": 6, "train.train_batch_size": 2})
    for stage in ("prepare", "encode-text", "encode-latents", "train"):
        summary = run_stage(stage, root / "params.yaml")
    import math

    assert summary["steps"] == 6 and math.isfinite(summary["final_loss"])
