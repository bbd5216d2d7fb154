"""The facts of the three FLUX.2 flavours, in one place.

Everything that differs between `dev`, `klein-9b` and `klein-4b` lives here: the transformer config, the text
encoder's class and size, which hidden layers are stacked into the prompt embedding, whether the transformer has a
guidance embedder, which diffusers pipeline runs it, the default base repo and its licence. The `tiny-*` flavours
are the same architectures shrunk to a few thousand parameters so the whole product runs and is tested on a CPU
without downloading weights; `make-tiny-model` builds them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Shared by every FLUX.2 transformer (diffusers' Flux2Transformer2DModel defaults).
SHARED_TRANSFORMER_CONFIG: dict[str, Any] = dict(
    patch_size=1,
    in_channels=128,
    attention_head_dim=128,
    mlp_ratio=3.0,
    timestep_guidance_channels=256,
    axes_dims_rope=(32, 32, 32, 32),
    rope_theta=2000,
)


@dataclass(frozen=True)
class Flavour:
    """What flux2lora needs to know about one FLUX.2 model family member."""

    name: str
    pipeline_class: str  # diffusers class that runs it: "Flux2KleinPipeline" | "Flux2Pipeline"
    text_encoder_class: str  # transformers class name
    text_encoder_family: str  # "qwen3" | "mistral3": decides the prompt template
    text_hidden_size: int
    text_num_layers: int
    stacked_layers: tuple[int, ...]  # hidden_states indices stacked per token (0 = embeddings)
    guidance_embeds: bool  # only dev has a distilled-guidance embedder
    default_repo: str  # klein: the *base* (undistilled) repos, which LoRAs must be trained on
    licence: str
    transformer_config: dict[str, Any] = field(default_factory=dict)
    tiny: bool = False

    @property
    def joint_attention_dim(self) -> int:
        """Width of one cached text token: the stacked layers side by side."""
        return self.transformer_config["joint_attention_dim"]

    @property
    def is_klein(self) -> bool:
        return self.text_encoder_family == "qwen3"

    @property
    def full_transformer_config(self) -> dict[str, Any]:
        return {**SHARED_TRANSFORMER_CONFIG, **self.transformer_config}


_QWEN = dict(pipeline_class="Flux2KleinPipeline", text_encoder_class="Qwen3ForCausalLM", text_encoder_family="qwen3",
             guidance_embeds=False, stacked_layers=(9, 18, 27))

DEV = Flavour(
    name="dev",
    pipeline_class="Flux2Pipeline",
    text_encoder_class="Mistral3ForConditionalGeneration",
    text_encoder_family="mistral3",
    text_hidden_size=5120,
    text_num_layers=40,
    stacked_layers=(10, 20, 30),
    guidance_embeds=True,
    default_repo="black-forest-labs/FLUX.2-dev",
    licence="flux-dev-non-commercial-license",
    transformer_config=dict(num_layers=8, num_single_layers=48, num_attention_heads=48, joint_attention_dim=15360,
                            guidance_embeds=True),
)
KLEIN_9B = Flavour(
    name="klein-9b",
    text_hidden_size=4096,
    text_num_layers=36,
    default_repo="black-forest-labs/FLUX.2-klein-base-9B",
    licence="flux-non-commercial-license",
    transformer_config=dict(num_layers=8, num_single_layers=24, num_attention_heads=32, joint_attention_dim=12288,
                            guidance_embeds=False),
    **_QWEN,
)
KLEIN_4B = Flavour(
    name="klein-4b",
    text_hidden_size=2560,
    text_num_layers=36,
    default_repo="black-forest-labs/FLUX.2-klein-base-4B",
    licence="apache-2.0",
    transformer_config=dict(num_layers=5, num_single_layers=20, num_attention_heads=24, joint_attention_dim=7680,
                            guidance_embeds=False),
    **_QWEN,
)

# Tiny flavours: same classes, same code paths, a few thousand parameters. Text hidden size 16 and 4 layers, with
# stacked layers (1, 2, 3) so the "deepest stacked layer is not the last one" property of the real models holds.
_TINY_TRANSFORMER = dict(num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                         axes_dims_rope=(4, 4, 4, 4), timestep_guidance_channels=32, joint_attention_dim=48)
TINY_TEXT_HIDDEN = 16
TINY_TEXT_LAYERS = 4
TINY_STACKED = (1, 2, 3)


def _tiny(real: Flavour, num_layers: int, num_single_layers: int) -> Flavour:
    return Flavour(
        name=f"tiny-{real.name}",
        pipeline_class=real.pipeline_class,
        text_encoder_class=real.text_encoder_class,
        text_encoder_family=real.text_encoder_family,
        text_hidden_size=TINY_TEXT_HIDDEN,
        text_num_layers=TINY_TEXT_LAYERS,
        stacked_layers=TINY_STACKED,
        guidance_embeds=real.guidance_embeds,
        default_repo="",
        licence=real.licence,
        transformer_config={**_TINY_TRANSFORMER, "num_layers": num_layers, "num_single_layers": num_single_layers,
                            "guidance_embeds": real.guidance_embeds},
        tiny=True,
    )


# The tiny models keep their real sibling's double/single block ratio in miniature (2+2 for dev, 1+2 for klein) so
# LoRA target presets select different modules on each, as they do at full size.
TINY_DEV = _tiny(DEV, num_layers=2, num_single_layers=2)
TINY_KLEIN_9B = _tiny(KLEIN_9B, num_layers=1, num_single_layers=2)
TINY_KLEIN_4B = _tiny(KLEIN_4B, num_layers=1, num_single_layers=1)

FLAVOURS: dict[str, Flavour] = {f.name: f for f in (DEV, KLEIN_9B, KLEIN_4B, TINY_DEV, TINY_KLEIN_9B, TINY_KLEIN_4B)}
REAL_FLAVOURS = ("klein-4b", "klein-9b", "dev")
DEFAULT_FLAVOUR = "klein-9b"


def get_flavour(name: str) -> Flavour:
    """Look a flavour up by name; the error lists the valid names."""
    try:
        return FLAVOURS[name]
    except KeyError:
        raise ValueError(f"unknown model flavour {name!r}: choose one of {', '.join(REAL_FLAVOURS)} "
                         f"(or a tiny-* test flavour: {', '.join(n for n in FLAVOURS if n.startswith('tiny-'))})") from None


def tiny_flavour_for(name: str) -> Flavour:
    """The tiny test flavour of `name` ("klein-4b" -> "tiny-klein-4b"); tiny names map to themselves."""
    return get_flavour(name if name.startswith("tiny-") else f"tiny-{name}")
