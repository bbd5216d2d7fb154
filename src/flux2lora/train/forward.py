"""One transformer prediction for a training batch, with or without reference (edit) images.

References are appended after the target tokens, clean (not noised), with position ids T = 10 + 10*i and the same
timestep as the target, exactly as the FLUX.2 pipelines do at inference; the prediction is sliced back to the target
tokens so the loss covers those only. The transformer reads position ids from the first sample of a batch, so
samples whose references differ in shape are run as separate sub-batches.
"""

from __future__ import annotations

import torch

from ..latents import pack, reference_ids, target_ids, text_ids


def pick_references(reference_keys: list[list[str]], mode: str, generator: torch.Generator) -> list[list[str]]:
    """Per sample, the reference latents to condition on: all of them ("combined") or one drawn ("random")."""
    if mode == "combined" or all(len(keys) <= 1 for keys in reference_keys):
        return reference_keys
    picked = []
    for keys in reference_keys:
        index = int(torch.randint(len(keys), (1,), generator=generator)) if keys else 0
        picked.append(keys[index:index + 1])
    return picked


def predict(model, noisy: torch.Tensor, prompt_embeds: torch.Tensor, sigmas: torch.Tensor,
            guidance: torch.Tensor | None, references: list[list[torch.Tensor]] | None,
            generator: torch.Generator | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Velocity prediction for the target tokens: (B, h*w, 128) for noisy latents (B, 128, h, w).

    model: a `TrainingModel` (possibly wrapped by DDP/FSDP); TREAD routing draws from `generator`.
    references: per sample a list of clean reference latents (128, h_i, w_i), or None for text-to-image.
    dtype: the transformer's weight dtype (inputs are cast to it).
    """
    device = noisy.device
    dtype = dtype or torch.float32

    def _run(**inputs):
        return model(generator=generator, **inputs)
    if not references or not any(references):
        return _run(hidden_states=pack(noisy).to(dtype),
                    encoder_hidden_states=prompt_embeds.to(dtype), timestep=sigmas.to(dtype), guidance=guidance,
                    img_ids=target_ids(noisy).to(device), txt_ids=text_ids(prompt_embeds).to(device))
    groups: dict[tuple, list[int]] = {}
    for i, refs in enumerate(references):
        groups.setdefault(tuple(tuple(r.shape) for r in refs), []).append(i)
    n_target = noisy.shape[2] * noisy.shape[3]
    out = torch.empty((noisy.shape[0], n_target, noisy.shape[1]), device=device, dtype=dtype)
    for indices in groups.values():
        idx = torch.tensor(indices, device=device)
        target = noisy[idx]
        refs = [torch.stack([references[i][j] for i in indices]).to(device) for j in range(len(references[indices[0]]))]
        tokens = torch.cat([pack(target)] + [pack(r) for r in refs], dim=1).to(dtype)
        ids = torch.cat([target_ids(target).to(device),
                         reference_ids([r[:1] for r in refs]).to(device).expand(len(indices), -1, -1)], dim=1)
        embeds = prompt_embeds[idx]
        prediction = _run(hidden_states=tokens, encoder_hidden_states=embeds.to(dtype),
                          timestep=sigmas[idx].to(dtype), guidance=None if guidance is None else guidance[idx],
                          img_ids=ids, txt_ids=text_ids(embeds).to(device))
        out[idx] = prediction[:, :n_target].to(dtype)
    return out
