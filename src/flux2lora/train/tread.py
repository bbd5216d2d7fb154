"""TREAD token routing for FLUX.2 training: a share of the image tokens skips a span of blocks.

`selection_ratio` is the share of image tokens that SKIP the routed span (SimpleTuner's code means this; its guide's
"fraction kept" wording is wrong). At the route's first block the skipped tokens are set aside with their current
values; the kept image tokens and every text token run through the span; after the route's last block the skipped
tokens are put back in their places. Each kept token carries its own rotary position (its row of the RoPE table),
so positions travel with the tokens. Block indices count the double blocks first, then the single blocks; negative
indices count from the end (-1 = the last single block).

The transformer reads one RoPE table for the whole batch (the first sample's ids), so one selection is drawn per
batch and applied to every sample: exact for batches from one aspect bucket, which is how flux2lora batches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Route:
    selection_ratio: float  # share of image tokens that skip blocks start..end
    start_layer_idx: int
    end_layer_idx: int

    def span(self, num_blocks: int) -> tuple[int, int]:
        start = self.start_layer_idx % num_blocks if self.start_layer_idx < 0 else self.start_layer_idx
        end = self.end_layer_idx % num_blocks if self.end_layer_idx < 0 else self.end_layer_idx
        if not 0 <= start <= end < num_blocks:
            raise ValueError(f"tread_config route {self}: resolves to blocks {start}..{end}, but the transformer has "
                             f"{num_blocks} blocks (double then single); start must not come after end")
        if not 0.0 <= self.selection_ratio < 1.0:
            raise ValueError(f"tread_config route {self}: selection_ratio must be in [0, 1)")
        return start, end


def parse_routes(tread_config) -> list[Route]:
    """`train.tread_config` (a validated TreadConfig, or the same as a dict) -> [Route]."""
    if not tread_config:
        return []
    if isinstance(tread_config, dict):
        from ..config import TreadConfig

        tread_config = TreadConfig.model_validate(tread_config)
    return [Route(r.selection_ratio, r.start_layer_idx, r.end_layer_idx) for r in tread_config.routes]


class BlockLoop:
    """The transformer's forward as our own loop over its blocks; same inputs and output as its forward
    (return_dict=False). It routes tokens when TREAD routes are given, and runs each block through its `BlockCall`
    (per-block checkpointing, regional compile) when those are given; with neither, it equals the plain forward."""

    def __init__(self, routes: list[Route], num_blocks: int):
        # no routes: the plain block loop (used for per-block checkpointing and regional compile)
        self.spans = sorted((r.span(num_blocks) + (r.selection_ratio,) for r in routes))
        for (s0, e0, _), (s1, _, _) in zip(self.spans, self.spans[1:]):
            if s1 <= e0:
                raise ValueError("tread_config: routes overlap; give each route its own span of blocks")

    def forward(self, transformer, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                timestep: torch.Tensor, img_ids: torch.Tensor, txt_ids: torch.Tensor,
                guidance: torch.Tensor | None, generator: torch.Generator | None = None,
                keep_indices: list[torch.Tensor] | None = None, block_calls: list | None = None) -> torch.Tensor:
        """(B, N_img, C) prediction. keep_indices (one per route) overrides the random draw, for tests.

        block_calls: per block, the callable that runs it with positional arguments (`train.model.BlockCall`:
        checkpointed and/or compiled); None: the block itself, checkpointed when the transformer's gradient
        checkpointing is on."""
        t = transformer
        timestep = timestep.to(hidden_states.dtype) * 1000
        if guidance is not None:
            guidance = guidance.to(hidden_states.dtype) * 1000
        temb = t.time_guidance_embed(timestep, guidance)
        mod_img, mod_txt = t.double_stream_modulation_img(temb), t.double_stream_modulation_txt(temb)
        mod_single = t.single_stream_modulation(temb)
        img = t.x_embedder(hidden_states)
        txt = t.context_embedder(encoder_hidden_states)
        img_rope = t.pos_embed(img_ids[0] if img_ids.ndim == 3 else img_ids)
        txt_rope = t.pos_embed(txt_ids[0] if txt_ids.ndim == 3 else txt_ids)
        n_txt, n_img = txt.shape[1], img.shape[1]
        checkpointing = torch.is_grad_enabled() and t.gradient_checkpointing
        blocks = list(t.transformer_blocks) + list(t.single_transformer_blocks)
        n_double = len(t.transformer_blocks)

        current_rope = img_rope
        saved, keep = None, None
        route_number = 0
        for index, block in enumerate(blocks):
            span = next((s for s in self.spans if s[0] == index), None)
            if span is not None:
                # draw (or take) the image tokens that go through this span; the rest wait outside it
                n_keep = n_img - int(span[2] * n_img)
                keep = (keep_indices[route_number] if keep_indices is not None else
                        torch.randperm(n_img, generator=generator)[:n_keep].sort().values).to(img.device)
                route_number += 1
                saved = img
                img = img[:, keep]
                current_rope = (img_rope[0][keep], img_rope[1][keep])
            rope = (torch.cat([txt_rope[0], current_rope[0]]), torch.cat([txt_rope[1], current_rope[1]]))
            if block_calls is not None:
                run = block_calls[index]
            else:
                run = (lambda *args, _block=block: t._gradient_checkpointing_func(_block, *args)) \
                    if checkpointing else block
            if index < n_double:
                # positional, in the blocks' signature order (what checkpoint functions pass on)
                txt, img = run(img, txt, mod_img, mod_txt, rope, None)
            else:
                joint = run(torch.cat([txt, img], dim=1), None, mod_single, rope, None)
                txt, img = joint[:, :n_txt], joint[:, n_txt:]
            if saved is not None and any(s[1] == index for s in self.spans):
                full = saved.clone()
                full[:, keep] = img.to(full.dtype)
                img, saved, current_rope = full, None, img_rope
        img = t.norm_out(img, temb)
        return t.proj_out(img)
