"""FLUX.2 latent space: VAE encode, 2x2 patchify, batch-norm normalisation, token packing and position ids.

The math is the reference pipelines' own (`Flux2Pipeline._patchify_latents`, `_pack_latents`, `_prepare_*_ids`):
we call diffusers' static methods rather than re-derive them, so the cache holds exactly what the pipeline would
compute. Shapes: pixels (B, 3, H, W) in [-1, 1]; VAE latents (B, 32, H/8, W/8); cached latents (B, 128, H/16, W/16);
tokens (B, H/16 * W/16, 128); ids (B, N, 4) with axes (T, H, W, L).
"""

from __future__ import annotations

import torch
from diffusers import Flux2Pipeline

# Reference images' T coordinate is REFERENCE_T_SCALE * (1 + i), as in the pipelines.
REFERENCE_T_SCALE = 10


def bn_statistics(vae) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE's non-affine batch-norm mean and std as (1, 128, 1, 1) tensors (std includes the VAE's eps)."""
    mean = vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    return mean, std


@torch.no_grad()
def encode_pixels(vae, pixels: torch.Tensor) -> torch.Tensor:
    """Pixels (B, 3, H, W) in [-1, 1] -> normalised patchified latents (B, 128, H/16, W/16), in the VAE's dtype."""
    pixels = pixels.to(device=vae.device, dtype=vae.dtype)
    latents = vae.encode(pixels).latent_dist.mode()
    latents = Flux2Pipeline._patchify_latents(latents)
    mean, std = bn_statistics(vae)
    return (latents - mean.to(latents)) / std.to(latents)


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Inverse of `encode_pixels`: (B, 128, h, w) normalised latents -> pixels (B, 3, 16h, 16w) in [-1, 1]."""
    latents = latents.to(device=vae.device, dtype=vae.dtype)
    mean, std = bn_statistics(vae)
    latents = latents * std.to(latents) + mean.to(latents)
    return vae.decode(Flux2Pipeline._unpatchify_latents(latents), return_dict=False)[0]


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> tokens (B, h*w, C)."""
    return Flux2Pipeline._pack_latents(latents)


def target_ids(latents: torch.Tensor) -> torch.Tensor:
    """Position ids (B, h*w, 4) of target image tokens: (0, row, col, 0)."""
    return Flux2Pipeline._prepare_latent_ids(latents)


def text_ids(prompt_embeds: torch.Tensor) -> torch.Tensor:
    """Position ids (B, L, 4) of text tokens: (0, 0, 0, l)."""
    return Flux2Pipeline._prepare_text_ids(prompt_embeds)


def reference_ids(reference_latents: list[torch.Tensor]) -> torch.Tensor:
    """Position ids (1, N, 4) of reference images' tokens, the i-th at T = 10 + 10*i."""
    return Flux2Pipeline._prepare_image_ids(reference_latents, scale=REFERENCE_T_SCALE)
