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

from .flavours import TINY_TEXT_HIDDEN, TINY_TEXT_LAYERS, Flavour, tiny_flavour_for

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


def _qwen3_text_encoder(vocab_size: int, pad_token_id: int, eos_token_id: int, seed: int):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=TINY_TEXT_HIDDEN,
        intermediate_size=2 * TINY_TEXT_HIDDEN,
        num_hidden_layers=TINY_TEXT_LAYERS,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=40960,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        tie_word_embeddings=True,
        pad_token_id=pad_token_id,
        bos_token_id=None,
        eos_token_id=eos_token_id,
    )
    with _seeded(seed, "text_encoder"):
        return Qwen3ForCausalLM(config).eval()


def _mistral3_text_encoder(tokenizer, seed: int):
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, PixtralVisionConfig

    text_config = MistralConfig(
        vocab_size=len(tokenizer),
        hidden_size=TINY_TEXT_HIDDEN,
        intermediate_size=2 * TINY_TEXT_HIDDEN,
        num_hidden_layers=TINY_TEXT_LAYERS,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=131072,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000000.0},
        sliding_window=None,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    # The vision tower is never run by the FLUX.2 pipeline but is part of the real checkpoint: keep it, minimal.
    vision_config = PixtralVisionConfig(
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=1,
        image_size=64,
        patch_size=16,
    )
    config = Mistral3Config(
        text_config=text_config,
        vision_config=vision_config,
        image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"),
        spatial_merge_size=2,
        tie_word_embeddings=True,
    )
    with _seeded(seed, "text_encoder"):
        return Mistral3ForConditionalGeneration(config).eval()


def make_tiny_model(path: str | Path, flavour: str = "tiny-klein-4b", seed: int = 0) -> Path:
    """Write a random-weight FLUX.2 pipeline of `flavour`'s architecture to `path` and return the path.

    `flavour` is a tiny flavour name ("tiny-klein-4b", "tiny-klein-9b", "tiny-dev") or a real one ("klein-4b", ...),
    which maps to its tiny sibling. The folder has the diffusers layout (model_index.json, transformer/, vae/,
    text_encoder/, tokenizer/, scheduler/) and loads offline with `Flux2KleinPipeline.from_pretrained` (klein,
    undistilled: classifier-free guidance on) or `Flux2Pipeline.from_pretrained` (dev). The same flavour and seed
    give byte-identical files. `flux2lora_tiny.json` in the folder records both.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Pipeline

    tiny = tiny_flavour_for(flavour)
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
        pipe = Flux2KleinPipeline(**components, is_distilled=False)
    else:
        pipe = Flux2Pipeline(**components)
    pipe.save_pretrained(path, safe_serialization=True)
    (path / "flux2lora_tiny.json").write_text(json.dumps({"flavour": tiny.name, "seed": seed}, indent=2) + "\n")
    return path
