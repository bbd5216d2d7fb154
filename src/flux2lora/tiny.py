"""Tiny random-weight FLUX.2 pipelines, built offline, for tests and CPU smoke runs.

`make_tiny_model` writes a folder in exactly the layout of a FLUX.2 repo on the hub (model_index.json, transformer/,
vae/, text_encoder/, tokenizer/, scheduler/), so every code path that loads a real model by path - diffusers'
`Flux2KleinPipeline.from_pretrained` / `Flux2Pipeline.from_pretrained`, our own loaders - loads this one too. The
architectures are the real ones shrunk (`flavours.TINY_*`); only sizes differ. Nothing is downloaded: the
tokenizers are byte-level BPEs trained here on a small built-in corpus, with the real models' special tokens and
chat templates.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch

from .flavours import TINY_TEXT_HIDDEN, TINY_TEXT_LAYERS, Flavour, get_flavour, tiny_flavour_for

# A few hundred words of plain English about pictures: enough for a BPE of 1000 tokens whose merges look like a
# real tokenizer's (whole common words, sub-words for rare ones), so prompts tokenize to realistic lengths.
_CORPUS = """
A photo of a red cube on a wooden table next to a blue sphere and a green cone. The light comes from a window on
the left and casts long soft shadows across the floor. A small cat with white paws sleeps in a basket of yellow
wool while a dog watches from the door. The sky above the mountains is clear and bright, with a few thin clouds
drifting toward the sea. An old man in a brown coat reads a newspaper on a bench in the park; children play with a
ball near the fountain. A close up portrait of a woman with short dark hair, wearing silver earrings, looking at the
camera with a calm expression. A bowl of fresh fruit: apples, oranges, grapes and a single banana, painted in oil in
the style of a still life. A busy city street at night, wet with rain, neon signs reflected in the puddles, people
walking under black umbrellas. A tiny robot made of brass and glass stands on a desk covered with papers, pencils and
a cup of coffee. A castle on a hill surrounded by a forest of tall pine trees, snow on the roofs, smoke rising from
the chimneys. A watercolor painting of a boat on a quiet lake at sunrise, pink and orange light on the water. A
sketch in pencil of a horse running through a field of tall grass. A modern kitchen with white walls, a steel
sink, a vase of flowers and a plate of bread. A macro photograph of a bee on a purple flower, the background
blurred. A cartoon drawing of a happy frog wearing a crown, sitting on a leaf in a pond. A cinematic shot of a
spaceship flying over a desert planet with two suns. An illustration of a library with endless shelves of books, a
ladder, and warm lamps. A simple logo with the letters A and B in a circle, flat design, bright colors. A wide
landscape of green hills, a river, a stone bridge and a village in the distance, golden hour. The image shows three
people standing in a row, smiling, in front of a large painted wall. Text on the sign says hello world in bold
white letters. A glass of water, a knife, a fork and a spoon arranged on a white cloth. A girl in a red dress holds
a kite on a windy beach, waves breaking behind her. A black and white photograph of an empty train station in the
early morning fog. A pile of autumn leaves, orange, red and brown, under a bare tree. A cozy bedroom with a large
bed, soft pillows, a wooden floor and a lamp on a small table. A mountain lake reflects the snowy peaks like a
mirror. A soldier, a farmer, a teacher and a doctor talk together in a small square. Heavy rain falls on a field of
sunflowers. The camera looks down from above at a round table with food, drinks and hands reaching for plates. A
dragon with green scales and large wings breathes fire over a dark valley. Two birds sit on a wire against a grey
winter sky. A bicycle leans against a brick wall covered with ivy. A bright yellow taxi waits at a corner. The moon
rises over the ocean, silver light on the waves. A detailed map of an island with rivers, roads and small towns.
Studio lighting, high contrast, sharp focus, shallow depth of field, soft background, film grain, wide angle lens,
natural colors, vivid, realistic, detailed texture, simple composition, centered subject, symmetric, minimalist.
One two three four five six seven eight nine ten, first second third, left right top bottom middle, inside
outside, above below, behind in front, near far, big small, long short, hot cold, old new, light dark, fast slow.
You are an AI that reasons about image descriptions. You give structured responses focusing on object
relationships, object attribution and actions without speculation. The user asks and the assistant answers; the
system sets the rules. Think first, then reply with a short answer.
"""

_BPE_VOCAB_SIZE = 1000

# Qwen3's special tokens, in the order of its tokenizer (they sit after the BPE vocabulary there too). `<think>`
# and `</think>` are added but not special in the real tokenizer: they survive skip_special_tokens.
_QWEN3_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_QWEN3_PLAIN_ADDED = ["<think>", "</think>"]

# The control tokens of Mistral-Small-3.1's tokenizer that its chat template and processor use, at their real ids
# (0..19) so image_token_index=10, bos=1, eos=2 and pad=11 are the real model's values.
_MISTRAL_SPECIAL = [
    "<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]", "[PREFIX]", "[MIDDLE]",
    "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[TOOL_CONTENT]",
]

# Qwen3's chat template without tools. For system and user messages and the generation prompt it renders exactly
# what the real one renders; in particular `add_generation_prompt=True, enable_thinking=False` - what the klein
# pipeline asks for - appends an empty think block after the assistant header. Assistant turns always drop their
# reasoning (the real one keeps it on turns after the last user message); no FLUX.2 code path sends any.
_QWEN3_CHAT_TEMPLATE = (
    "{%- if messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.content is string %}{%- set content = message.content %}{%- else %}{%- set content = '' %}{%- endif %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{%- if '</think>' in content %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}"
    "{%- endif %}"
    "{{- '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)

# Mistral-Small-3.1's chat template for system/user/assistant messages whose content is a string or a list of
# {"type": "text"|"image", ...} parts (the form diffusers' Flux2Pipeline sends): BOS, the system prompt, then
# [INST]...[/INST] turns. Without a system message the real one inserts a dated default; ours uses a fixed one so
# the output is reproducible.
_MISTRAL_CHAT_TEMPLATE = (
    "{%- set default_system_message = 'You are a tiny random model used for testing.' %}"
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- if messages[0]['content'] is string %}{%- set system_message = messages[0]['content'] %}"
    "{%- else %}{%- set system_message = messages[0]['content'][0]['text'] %}{%- endif %}"
    "{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set system_message = default_system_message %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- '[SYSTEM_PROMPT]' + system_message + '[/SYSTEM_PROMPT]' }}"
    "{%- for message in loop_messages %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if message['content'] is string %}{{- '[INST]' + message['content'] + '[/INST]' }}"
    "{%- else %}{{- '[INST]' }}"
    "{%- for block in message['content'] %}"
    "{%- if block['type'] == 'text' %}{{- block['text'] }}"
    "{%- elif block['type'] in ['image', 'image_url'] %}{{- '[IMG]' }}"
    "{%- else %}{{- raise_exception('Only text and image blocks are supported in message content!') }}{%- endif %}"
    "{%- endfor %}{{- '[/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'system' %}"
    "{%- if message['content'] is string %}{{- '[SYSTEM_PROMPT]' + message['content'] + '[/SYSTEM_PROMPT]' }}"
    "{%- else %}{{- '[SYSTEM_PROMPT]' + message['content'][0]['text'] + '[/SYSTEM_PROMPT]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}"
    "{%- if message['content'] is string %}{{- message['content'] + eos_token }}"
    "{%- else %}{{- message['content'][0]['text'] + eos_token }}{%- endif %}"
    "{%- else %}{{- raise_exception('Only user, system and assistant roles are supported!') }}{%- endif %}"
    "{%- endfor %}"
)

# FLUX.2's scheduler config as published with the real repos. The pipelines pass `mu` to set_timesteps, which only
# works with dynamic shifting on.
_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)

# Each component draws from its own seed so that changing one component's size never changes another's weights.
_SEED_OFFSETS = {"transformer": 0, "vae": 1, "text_encoder": 2}


@contextmanager
def _seeded(seed: int, component: str):
    """Seed torch's global RNG for building one component, and restore the caller's RNG state afterwards."""
    # Module constructors draw their initial weights from the global generator, so it must be the one seeded; the
    # fork keeps the caller's random stream untouched. devices=[]: CPU only, no CUDA initialisation.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * len(_SEED_OFFSETS) + _SEED_OFFSETS[component])
        yield


def _train_bpe(pre_tokenizer, normalizer, special_tokens: list[str]):
    """A byte-level BPE trained on `_CORPUS`; `special_tokens` take the first ids."""
    from tokenizers import Tokenizer, decoders, models, trainers
    from tokenizers.pre_tokenizers import ByteLevel

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_BPE_VOCAB_SIZE,
        min_frequency=1,
        special_tokens=special_tokens,
        initial_alphabet=ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS.split("\n"), trainer=trainer)
    return tokenizer


def _qwen3_tokenizer():
    """A Qwen2TokenizerFast with Qwen3's pre-tokenizer, special tokens and (reduced) chat template."""
    from tokenizers import AddedToken, Regex, normalizers, pre_tokenizers, processors
    from transformers import Qwen2TokenizerFast
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    # Qwen2Tokenizer rebuilds its backend from vocab + merges with exactly this normalizer and pre-tokenizer when
    # it loads tokenizer.json, so training with anything else would tokenize differently after a save/load.
    backend = _train_bpe(
        pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]),
        normalizers.NFC(),
        special_tokens=[],
    )
    backend.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in _QWEN3_SPECIAL])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in _QWEN3_PLAIN_ADDED])
    return Qwen2TokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
        errors="replace",
        model_max_length=131072,
        chat_template=_QWEN3_CHAT_TEMPLATE,
    )


def _mistral_tokenizer():
    """A PreTrainedTokenizerFast with Mistral-Small-3.1's control tokens and chat template."""
    from tokenizers import normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    backend = _train_bpe(
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        normalizers.Sequence([]),
        special_tokens=_MISTRAL_SPECIAL,
    )
    # Like the real tokenizer, a plain `tokenizer(text)` starts with BOS; the chat template writes BOS itself and
    # apply_chat_template tokenizes without special tokens, so it is not doubled there.
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", _MISTRAL_SPECIAL.index("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=[t for t in _MISTRAL_SPECIAL if t not in ("<unk>", "<s>", "</s>", "<pad>")],
        model_max_length=131072,
        chat_template=_MISTRAL_CHAT_TEMPLATE,
    )


def _transformer(flavour: Flavour, seed: int):
    from diffusers import Flux2Transformer2DModel

    with _seeded(seed, "transformer"):
        return Flux2Transformer2DModel(**flavour.full_transformer_config)


def _vae(seed: int):
    """AutoencoderKLFlux2 with the real /8 spatial factor and 32 latent channels, a few hundred kB of weights."""
    from diffusers import AutoencoderKLFlux2

    with _seeded(seed, "vae"):
        vae = AutoencoderKLFlux2(
            block_out_channels=(8, 8, 8, 8),  # 4 blocks: 3 downsamplings = /8, as in the real VAE
            layers_per_block=1,
            norm_num_groups=4,
            latent_channels=32,
        )
        # The real VAE's batch-norm statistics are far from (0, 1); random ones make a forgotten (de)normalisation
        # show up in every test instead of passing silently.
        channels = vae.bn.running_mean.shape[0]
        vae.bn.running_mean.copy_(torch.randn(channels) * 0.5)
        vae.bn.running_var.copy_(torch.rand(channels) * 1.5 + 0.5)
        vae.bn.num_batches_tracked.fill_(1)
    return vae


def _qwen3_text_encoder(vocab_size: int, pad_token_id: int, eos_token_id: int, seed: int,
                        num_layers: int = TINY_TEXT_LAYERS, tie_word_embeddings: bool = True):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=TINY_TEXT_HIDDEN,
        intermediate_size=2 * TINY_TEXT_HIDDEN,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=40960,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=pad_token_id,
        bos_token_id=None,
        eos_token_id=eos_token_id,
    )
    with _seeded(seed, "text_encoder"):
        return Qwen3ForCausalLM(config).eval()


def _mistral3_text_encoder(tokenizer, seed: int, num_layers: int = TINY_TEXT_LAYERS,
                           tie_word_embeddings: bool = True, vision_patch_size: int = 16):
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, PixtralVisionConfig

    text_config = MistralConfig(
        vocab_size=len(tokenizer),
        hidden_size=TINY_TEXT_HIDDEN,
        intermediate_size=2 * TINY_TEXT_HIDDEN,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=131072,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000000.0},
        sliding_window=None,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=tie_word_embeddings,
    )
    # The vision tower is never run by the FLUX.2 pipeline but is part of the real checkpoint: keep it, minimal.
    vision_config = PixtralVisionConfig(
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=1,
        image_size=4 * vision_patch_size,
        patch_size=vision_patch_size,
    )
    config = Mistral3Config(
        text_config=text_config,
        vision_config=vision_config,
        image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"),
        spatial_merge_size=2,
        tie_word_embeddings=tie_word_embeddings,
    )
    with _seeded(seed, "text_encoder"):
        return Mistral3ForConditionalGeneration(config).eval()


LAYOUTS = ("diffusers", "hub", "mistral-small")
TEXT_ENCODER_KEY_LAYOUTS = ("legacy", "transformers5")


def make_tiny_model(path: str | Path, flavour: str = "tiny-klein-4b", seed: int = 0, layout: str = "diffusers",
                    distilled: bool = False, text_encoder_keys: str = "legacy") -> Path:
    """Write a random-weight FLUX.2 pipeline of `flavour`'s architecture to `path` and return the path.

    `flavour` is a tiny flavour name ("tiny-klein-4b", "tiny-klein-9b", "tiny-dev") or a real one ("klein-4b", ...).

    layout="diffusers" (default): the tiny flavour's architecture (4 text layers, stacked (1, 2, 3)) in the layout
    `save_pretrained` writes (model_index.json, transformer/, vae/, text_encoder/, tokenizer/, scheduler/, one
    weight file each); loads offline with `Flux2KleinPipeline.from_pretrained` (klein, undistilled: classifier-free
    guidance on) or `Flux2Pipeline.from_pretrained` (dev). `flux2lora_tiny.json` records flavour and seed.

    layout="hub": the real repo's layout and depth at tiny width (`make_hub_model`): train and encode it with the
    real flavour name. layout="mistral-small": dev's text encoder repo `mistralai/Mistral-Small-3.1-24B-Instruct-2503`
    (`make_mistral_small_repo`).

    distilled: klein only, `is_distilled: true` in model_index.json (the step-distilled repos).
    text_encoder_keys: dev's text encoder weights in the legacy key layout (`language_model.model.*`, what the
    published checkpoints and `save_pretrained` write) or transformers 5's module names (`model.language_model.*`).
    The same arguments give byte-identical files.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"make-tiny-model: layout {layout!r} is not one of {', '.join(LAYOUTS)}")
    if text_encoder_keys not in TEXT_ENCODER_KEY_LAYOUTS:
        raise ValueError(f"make-tiny-model: text_encoder_keys {text_encoder_keys!r} is not one of "
                         f"{', '.join(TEXT_ENCODER_KEY_LAYOUTS)}")
    tiny = tiny_flavour_for(flavour)
    if distilled and not tiny.is_klein:
        raise ValueError("make-tiny-model: only klein has step-distilled repos (distilled=True needs klein-4b or "
                         "klein-9b)")
    if layout == "hub":
        return make_hub_model(path, flavour, seed, distilled=distilled, text_encoder_keys=text_encoder_keys)
    if layout == "mistral-small":
        if tiny.is_klein:
            raise ValueError("make-tiny-model: the mistral-small layout is dev's text encoder; use --flavour dev")
        return make_mistral_small_repo(path, seed, text_encoder_keys=text_encoder_keys)

    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Pipeline

    path = Path(path)
    if tiny.is_klein:
        tokenizer = _qwen3_tokenizer()
        text_encoder = _qwen3_text_encoder(len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id, seed)
    else:
        tokenizer = _mistral_tokenizer()
        text_encoder = _mistral3_text_encoder(tokenizer, seed)
    components = dict(
        scheduler=FlowMatchEulerDiscreteScheduler(**_SCHEDULER_CONFIG),
        vae=_vae(seed),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=_transformer(tiny, seed),
    )
    if tiny.is_klein:
        pipe = Flux2KleinPipeline(**components, is_distilled=distilled)
    else:
        pipe = Flux2Pipeline(**components)
    pipe.save_pretrained(path, safe_serialization=True)
    (path / "flux2lora_tiny.json").write_text(json.dumps({"flavour": tiny.name, "seed": seed}, indent=2) + "\n")
    return path


# --- The real hub repos' layouts, at tiny width ----------------------------------------------------------------
#
# What `black-forest-labs/FLUX.2-klein-base-4B` / `-9B`, `FLUX.2-klein-4B` / `-9B` (step-distilled),
# `FLUX.2-dev` and `mistralai/Mistral-Small-3.1-24B-Instruct-2503` look like once downloaded
# (shared/reference/real-repo-layouts.md): the real class names in model_index.json, bf16 weights sharded with an
# index json, the real depth (36 / 40 text layers, 5+20 / 8+24 / 8+48 transformer blocks), klein-4b's tied and
# klein-9b's and dev's untied LM head, dev's PixtralProcessor tokenizer folder, dev's transformer config without a
# `guidance_embeds` key. Only widths are tiny (text hidden 16, transformer 2 heads of 16), so the real flavours'
# stacked layers (9, 18, 27) / (10, 20, 30) apply: params name the real flavour ("klein-4b"), not "tiny-klein-4b".

# (double blocks, single blocks) of the real transformers
HUB_TRANSFORMER_BLOCKS = {"klein-4b": (5, 20), "klein-9b": (8, 24), "dev": (8, 48)}
# Small shards, so every folder has several (the real ones have 2..10) and an index json.
_HUB_SHARD_SIZE = {"transformer": "600KB", "text_encoder": "100KB"}
# Qwen3's config vocab (151936) is padded past its tokenizer (151669 tokens), as here.
_QWEN3_VOCAB_MULTIPLE = 128
_PIXTRAL_PATCH = 14

# The text of dev's processor files (patch size and merge as in the real repo; the image processor never runs for
# text: FLUX.2 sends no images to the text encoder).
_PIXTRAL_PROCESSOR_CONFIG = {
    "image_break_token": "[IMG_BREAK]", "image_end_token": "[IMG_END]", "image_token": "[IMG]",
    "patch_size": _PIXTRAL_PATCH, "processor_class": "PixtralProcessor", "spatial_merge_size": 2,
}
_PIXTRAL_PREPROCESSOR_CONFIG = {
    "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_processor_type": "PixtralImageProcessor",
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "patch_size": {"height": _PIXTRAL_PATCH, "width": _PIXTRAL_PATCH},
    "processor_class": "PixtralProcessor", "resample": 3, "rescale_factor": 0.00392156862745098,
    "size": {"longest_edge": 1540},
}


def _bf16(model):
    """The model cast to bf16, the published dtype (without diffusers' note that no module asks to stay fp32)."""
    from diffusers.utils import logging as diffusers_logging

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        return model.to(torch.bfloat16)
    finally:
        diffusers_logging.set_verbosity(verbosity)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _hub_text_encoder(real: Flavour, tokenizer, seed: int):
    """The real flavour's text encoder class and depth at tiny width, in bf16 (the published dtype)."""
    if real.is_klein:
        vocab = -(-len(tokenizer) // _QWEN3_VOCAB_MULTIPLE) * _QWEN3_VOCAB_MULTIPLE
        model = _qwen3_text_encoder(vocab, tokenizer.pad_token_id, tokenizer.eos_token_id, seed,
                                    num_layers=real.text_num_layers, tie_word_embeddings=real.name == "klein-4b")
    else:
        model = _mistral3_text_encoder(tokenizer, seed, num_layers=real.text_num_layers, tie_word_embeddings=False,
                                       vision_patch_size=_PIXTRAL_PATCH)
    return model.to(torch.bfloat16)


def _rename_shards(folder: Path, index_name: str, rename) -> None:
    """Rewrite every shard listed in `folder/index_name` (and the index) with keys mapped by `rename`."""
    from safetensors.torch import load_file, save_file

    index_path = folder / index_name
    index = json.loads(index_path.read_text())
    for shard in sorted(set(index["weight_map"].values())):
        tensors = load_file(str(folder / shard))
        save_file({rename(k): v for k, v in tensors.items()}, str(folder / shard), metadata={"format": "pt"})
    index["weight_map"] = {rename(k): v for k, v in index["weight_map"].items()}
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _to_transformers5_keys(key: str) -> str:
    """Mistral3ForConditionalGeneration's legacy checkpoint names -> transformers 5's module names."""
    for old, new in (("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
                     ("vision_tower.", "model.vision_tower."),
                     ("multi_modal_projector.", "model.multi_modal_projector.")):
        if key.startswith(old):
            return new + key[len(old):]
    return key


def _save_text_encoder(model, folder: Path, text_encoder_keys: str) -> None:
    model.save_pretrained(folder, max_shard_size=_HUB_SHARD_SIZE["text_encoder"])
    # Qwen3's names are the same in both; only Mistral3's were re-nested in transformers 5
    if text_encoder_keys == "transformers5" and "Mistral3" in type(model).__name__:
        _rename_shards(folder, "model.safetensors.index.json", _to_transformers5_keys)


def _save_qwen3_tokenizer(tokenizer, folder: Path) -> None:
    """Qwen3's tokenizer files: vocab.json, merges.txt, tokenizer.json, tokenizer_config.json,
    special_tokens_map.json, added_tokens.json, chat_template.jinja."""
    tokenizer.save_pretrained(folder)
    tokenizer.backend_tokenizer.model.save(str(folder))  # vocab.json + merges.txt
    added = {t: tokenizer.convert_tokens_to_ids(t) for t in [*_QWEN3_SPECIAL, *_QWEN3_PLAIN_ADDED]}
    _write_json(folder / "added_tokens.json", added)
    _write_json(folder / "special_tokens_map.json", {
        "additional_special_tokens": _QWEN3_SPECIAL[1:], "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"})


def _save_pixtral_tokenizer(tokenizer, folder: Path) -> None:
    """Mistral-Small-3.1's PixtralProcessor folder: tokenizer.json, tokenizer_config.json (processor_class
    PixtralProcessor), special_tokens_map.json, processor_config.json, preprocessor_config.json and the chat
    template as the processor's legacy chat_template.json [assumed: the processor's file, not the tokenizer's, so a
    bare AutoTokenizer on this folder has no chat template]."""
    tokenizer.save_pretrained(folder)
    template = (folder / "chat_template.jinja").read_text()
    (folder / "chat_template.jinja").unlink()
    _write_json(folder / "chat_template.json", {"chat_template": template})
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.update(tokenizer_class="LlamaTokenizerFast", processor_class="PixtralProcessor")
    config.pop("chat_template", None)
    _write_json(config_path, config)
    _write_json(folder / "special_tokens_map.json", {
        "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"})
    _write_json(folder / "processor_config.json", _PIXTRAL_PROCESSOR_CONFIG)
    _write_json(folder / "preprocessor_config.json", _PIXTRAL_PREPROCESSOR_CONFIG)


def make_hub_model(path: str | Path, flavour: str, seed: int = 0, *, distilled: bool = False,
                   text_encoder_keys: str = "legacy") -> Path:
    """Write `flavour`'s hub repo (klein-4b / klein-9b base or step-distilled, dev) at tiny width to `path`.

    Loads with the real flavour's params (model_flavour "klein-4b" etc.: stacked layers (9, 18, 27) / (10, 20, 30)).
    diffusers' `Flux2KleinPipeline.from_pretrained` loads the klein folders as they are; dev's tokenizer folder
    names `PixtralProcessor`, which transformers 5 loads only with torchvision installed.
    """
    import diffusers
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel

    real = get_flavour(flavour.removeprefix("tiny-"))
    tiny = tiny_flavour_for(real.name)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)

    double, single = HUB_TRANSFORMER_BLOCKS[real.name]
    with _seeded(seed, "transformer"):
        transformer = Flux2Transformer2DModel(**{**tiny.full_transformer_config, "num_layers": double,
                                                 "num_single_layers": single})
    _bf16(transformer).save_pretrained(path / "transformer", max_shard_size=_HUB_SHARD_SIZE["transformer"])
    if not real.is_klein:
        # dev's published config has no guidance_embeds key: diffusers' default (True) applies
        config_path = path / "transformer" / "config.json"
        config = json.loads(config_path.read_text())
        assert config.pop("guidance_embeds") is True
        _write_json(config_path, config)
    _bf16(_vae(seed)).save_pretrained(path / "vae")
    FlowMatchEulerDiscreteScheduler(**_SCHEDULER_CONFIG).save_pretrained(path / "scheduler")

    tokenizer = _qwen3_tokenizer() if real.is_klein else _mistral_tokenizer()
    _save_text_encoder(_hub_text_encoder(real, tokenizer, seed), path / "text_encoder", text_encoder_keys)
    if real.is_klein:
        _save_qwen3_tokenizer(tokenizer, path / "tokenizer")
    else:
        _save_pixtral_tokenizer(tokenizer, path / "tokenizer")

    index = {"_class_name": real.pipeline_class, "_diffusers_version": diffusers.__version__,
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
             "text_encoder": ["transformers", real.text_encoder_class],
             "tokenizer": ["transformers", "Qwen2TokenizerFast" if real.is_klein else "PixtralProcessor"],
             "transformer": ["diffusers", "Flux2Transformer2DModel"],
             "vae": ["diffusers", "AutoencoderKLFlux2"]}
    if real.is_klein:
        index["is_distilled"] = distilled
    _write_json(path / "model_index.json", index)
    return path


def make_mistral_small_repo(path: str | Path, seed: int = 0, *, text_encoder_keys: str = "legacy") -> Path:
    """`mistralai/Mistral-Small-3.1-24B-Instruct-2503` at tiny width: the model and its processor files at the repo
    root (no text_encoder/ or tokenizer/ subfolder). With the same seed its weights and tokenizer are those of
    `make_hub_model(..., "dev", seed)`'s text_encoder/ and tokenizer/, as FLUX.2-dev's are Mistral-Small-3.1's."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = _mistral_tokenizer()
    _save_text_encoder(_hub_text_encoder(get_flavour("dev"), tokenizer, seed), path, text_encoder_keys)
    _save_pixtral_tokenizer(tokenizer, path)
    return path
