"""Prompt embeddings equal to the FLUX.2 pipelines' `encode_prompt`, from a text encoder cut after its deepest
stacked layer.

The pipelines run the whole causal LM (36 or 40 layers plus the LM head) with `output_hidden_states=True` and keep
three intermediate layers. Layers above the deepest kept one never matter, so `PromptEncoder` loads and runs only
layers 1..deepest of the base model (no LM head): ~25% less memory and compute for klein, with equal outputs.

Trap avoided: in transformers 5 the *last* entry of `hidden_states` is taken after the final norm, so a model cut
to exactly `deepest` layers would return a normalised `hidden_states[deepest]`. We read each kept layer's raw
output with forward hooks instead of `output_hidden_states`, so the cut can be exact.

Prompt formatting is the pipelines' own: klein applies Qwen3's chat template per prompt (no system message,
`enable_thinking=False`); dev uses diffusers' `format_input` with its system message and "[IMG]" stripped.

dev's tokenizer folder is a `PixtralProcessor`, which transformers 5 loads only with torchvision (not a dependency;
PyPI's wheel does not import beside the CPU torch build). Text needs none of it: `PromptTokenizer` loads the
tokenizer alone and renders the chat template the processor would use (its chat_template.json, else
chat_template.jinja), tokenizing as the processor does for text (special tokens added unless the rendered text
starts with BOS): the same ids. The tokenizer is loaded and checked before any weight.

Loading is strict: only the decoder (MistralModel / Qwen3Model, no LM head, no vision tower or projector) is built,
and any missing, unexpected or mis-shaped weight of the layers we keep is an error naming the key and the repo
(transformers would fill a missing weight with random values and only log it).
Shapes: input a list of B prompts; output (B, max_sequence_length, len(layers) * hidden_size), all padded
positions included (the transformer gets no attention mask).
"""

from __future__ import annotations

import logging
import re

import torch

from .config import ModelParams
from .errors import TextEncoderMismatch
from .models import Source, optional_file, text_encoder_source, tokenizer_source, torch_dtype

log = logging.getLogger(__name__)

TEXT_ENCODER_PRECISIONS = ("fp32", "bf16", "fp16", "int8-quanto", "int4-quanto")

# Control tokens each family's chat template writes: a tokenizer without them renders prompts into wrong ids.
_REQUIRED_TOKENS = {"qwen3": ("<|im_start|>", "<|im_end|>"),
                    "mistral3": ("[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]")}

# Checkpoint key prefixes of the decoder in each layout: Qwen3ForCausalLM (`model.`), Mistral3's legacy
# (`language_model.model.`, what the published repos hold) and transformers 5's (`model.language_model.`).
_MISTRAL3_KEY_MAPPING = {r"^model\.language_model\.": "", r"^language_model\.model\.": ""}
# Checkpoint weights we skip on purpose: LM heads, dev's vision tower and projector (never used for text).
_SKIPPED = re.compile(r"^(language_model\.|model\.)?(lm_head|vision_tower|multi_modal_projector)\.")
_LAYER = re.compile(r"^(?:model\.|language_model\.model\.|model\.language_model\.)?layers\.(\d+)\.")


def _text_config(config):
    """The language model's config (Mistral3 nests it under text_config)."""
    return getattr(config, "text_config", None) or config


def _language_model(model):
    """The decoder stack (Qwen3Model / MistralModel itself; Mistral3Model.language_model)."""
    return getattr(model, "language_model", None) or model


class PromptTokenizer:
    """A flavour's prompt tokenization without its processor: `tokenizer` plus the chat template in use.

    `tokenizer(prompts)` gives input_ids and attention_mask (B, max_length) equal to the pipeline's: klein renders
    Qwen3's template per prompt (`enable_thinking=False`) and tokenizes; dev renders `format_input`'s messages with
    the processor's template and tokenizes the way PixtralProcessor does for text."""

    def __init__(self, tokenizer, chat_template: str, family: str, source: Source):
        self.tokenizer, self.chat_template, self.family, self.source = tokenizer, chat_template, family, source

    @classmethod
    def from_pretrained(cls, model: ModelParams) -> "PromptTokenizer":
        """Load the tokenizer of `model` (`tokenizer_source`) and check it; no weights are read."""
        from transformers import AutoTokenizer

        source = tokenizer_source(model)
        family = model.flavour.text_encoder_family
        try:
            tokenizer = AutoTokenizer.from_pretrained(source.path, **source.kwargs())
        except (OSError, ValueError) as e:
            raise TextEncoderMismatch(f"tokenizer: cannot load a tokenizer from {source} ({e}); set "
                             "model.pretrained_tokenizer_name_or_path / model.tokenizer_subfolder to a folder with "
                             "tokenizer.json") from None
        template = cls._processor_chat_template(source) if family == "mistral3" else None
        template = template or tokenizer.chat_template
        if not template or not isinstance(template, str):
            raise TextEncoderMismatch(f"tokenizer: {source} has no chat template (no chat_template.json, chat_template.jinja "
                             "or tokenizer_config.json chat_template); the FLUX.2 pipelines render every prompt "
                             "through it")
        missing = [t for t in _REQUIRED_TOKENS[family] if t not in tokenizer.get_vocab()]
        if missing:
            raise TextEncoderMismatch(f"tokenizer: {source} lacks {', '.join(missing)}: it is not the "
                             f"{model.flavour.text_encoder_class} tokenizer model_flavour {model.model_flavour!r} "
                             "needs")
        if tokenizer.pad_token_id is None:
            raise TextEncoderMismatch(f"tokenizer: {source} has no pad token; prompts are padded to max_sequence_length")
        return cls(tokenizer, template, family, source)

    @staticmethod
    def _processor_chat_template(source: Source) -> str | None:
        """The template a PixtralProcessor loaded from `source` would use: the legacy chat_template.json first, then
        chat_template.jinja (transformers' ProcessorMixin order)."""
        import json

        legacy = optional_file(source, "chat_template.json")
        if legacy is not None:
            return json.loads(legacy.read_text())["chat_template"]
        raw = optional_file(source, "chat_template.jinja")
        return raw.read_text() if raw is not None else None

    def __len__(self) -> int:
        return len(self.tokenizer)

    def __call__(self, prompts: list[str], max_length: int) -> dict[str, torch.Tensor]:
        """input_ids and attention_mask (B, max_length), exactly as the flavour's pipeline builds them."""
        padding = dict(return_tensors="pt", padding="max_length", truncation=True, max_length=max_length)
        if self.family == "mistral3":
            from diffusers.pipelines.flux2.pipeline_flux2 import SYSTEM_MESSAGE, format_input

            texts = self.tokenizer.apply_chat_template(
                format_input(prompts=prompts, system_message=SYSTEM_MESSAGE), chat_template=self.chat_template,
                add_generation_prompt=False, tokenize=False)
            # The processor adds no special tokens when the template already wrote BOS (ProcessorMixin)
            bos = self.tokenizer.bos_token
            add_special = not (bos is not None and texts and texts[0].startswith(bos))
            return self.tokenizer(texts, add_special_tokens=add_special, **padding)
        texts = [self.tokenizer.apply_chat_template([{"role": "user", "content": p}], chat_template=self.chat_template,
                                                    tokenize=False, add_generation_prompt=True, enable_thinking=False)
                 for p in prompts]
        return self.tokenizer(texts, **padding)


def check_loaded_weights(info: dict, kept_layers: int, source: Source) -> None:
    """Raise on any missing, mis-shaped or unknown weight of a strict decoder load (transformers' loading info).

    Skipped on purpose (not errors): decoder layers >= kept_layers (the cut), LM heads, the vision tower and the
    multi-modal projector."""
    if info.get("missing_keys"):
        keys = sorted(info["missing_keys"])
        raise TextEncoderMismatch(f"text encoder {source}: weight {keys[0]!r} is missing from the checkpoint"
                         f"{f' (and {len(keys) - 1} more)' if len(keys) > 1 else ''}: a partial download or a "
                         "different model; re-download it (or point model.pretrained_text_encoder_name_or_path at "
                         "a complete copy)")
    if info.get("mismatched_keys"):
        key, *_ = sorted(info["mismatched_keys"], key=str)
        raise TextEncoderMismatch(f"text encoder {source}: weight {key} has the wrong shape for its config")
    if info.get("error_msgs"):
        raise TextEncoderMismatch(f"text encoder {source}: {info['error_msgs'][0]}")
    for key in sorted(info.get("unexpected_keys", ())):
        layer = _LAYER.match(key)
        if _SKIPPED.match(key) or (layer and int(layer.group(1)) >= kept_layers):
            continue
        raise TextEncoderMismatch(f"text encoder {source}: unexpected weight {key!r} (not in the decoder layers loaded, nor "
                         "an LM head or vision weight skipped): the checkpoint's key layout is not one flux2lora "
                         "reads")


def load_text_decoder(model: ModelParams, num_layers: int | None, dtype: torch.dtype, vocab_size: int | None = None,
                      deepest: int = 0):
    """The text encoder's decoder only (Qwen3Model / MistralModel: no LM head, no vision tower), with its first
    `num_layers` layers (None: all), loaded strictly (`check_loaded_weights`) from `text_encoder_source(model)`.
    deepest: the deepest hidden state the caller reads (an error if the encoder is shallower)."""
    from transformers import AutoConfig, AutoModel
    from transformers.utils import logging as hf_logging

    source = text_encoder_source(model)
    try:
        config = AutoConfig.from_pretrained(source.path, **source.kwargs())
    except (OSError, ValueError) as e:
        raise TextEncoderMismatch(f"text encoder: cannot read config.json from {source} ({e})") from None
    text_config = _text_config(config)
    expected = {"qwen3": "qwen3", "mistral3": "mistral"}[model.flavour.text_encoder_family]
    if text_config.model_type != expected:
        raise TextEncoderMismatch(f"text encoder {source}: a {text_config.model_type} model, but model_flavour "
                         f"{model.model_flavour!r} needs {model.flavour.text_encoder_class}")
    if vocab_size is not None and vocab_size > text_config.vocab_size:
        raise TextEncoderMismatch(f"text encoder {source}: its embedding has {text_config.vocab_size} rows but the tokenizer "
                         f"has {vocab_size} tokens: they are not from the same model")
    if max(deepest, num_layers or 0) > text_config.num_hidden_layers:
        raise TextEncoderMismatch(f"text_encoder_out_layers: the text encoder has only {text_config.num_hidden_layers} "
                         f"layers ({source})")
    if num_layers is not None:
        text_config.num_hidden_layers = num_layers
        if getattr(text_config, "layer_types", None):
            text_config.layer_types = text_config.layer_types[:num_layers]
    key_mapping = _MISTRAL3_KEY_MAPPING if model.flavour.text_encoder_family == "mistral3" else None
    # transformers reports the weights skipped on purpose (upper layers, heads, vision) as a warning table; the
    # strict check below decides what is an error
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        decoder, info = AutoModel.from_pretrained(source.path, **source.kwargs(), config=text_config, dtype=dtype,
                                                  key_mapping=key_mapping, output_loading_info=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    check_loaded_weights(info, text_config.num_hidden_layers, source)
    return decoder.requires_grad_(False).eval()


class PromptEncoder:
    """Tokenizer + truncated text encoder of one FLUX.2 flavour; `encode(prompts)` gives pipeline-equal embeddings."""

    def __init__(self, tokenizer, model, family: str, layers: tuple[int, ...], max_sequence_length: int,
                 device: torch.device):
        """tokenizer: a PromptTokenizer, or a transformers tokenizer carrying its chat template (benchmarks)."""
        if not isinstance(tokenizer, PromptTokenizer):
            tokenizer = PromptTokenizer(tokenizer, tokenizer.chat_template, family,
                                        Source(getattr(tokenizer, "name_or_path", "") or "tokenizer", "", None))
        self.tokenizer, self.model, self.family = tokenizer, model, family
        self.layers, self.max_sequence_length, self.device = tuple(layers), max_sequence_length, device
        self._captured: dict[int, torch.Tensor] = {}
        lm = _language_model(model)
        for k in self.layers:
            # hidden_states[0] is the embedding output, hidden_states[k] the output of decoder layer k (1-based)
            module = lm.embed_tokens if k == 0 else lm.layers[k - 1]
            module.register_forward_hook(self._capture(k))

    def _capture(self, k: int):
        def hook(_module, _inputs, output):
            self._captured[k] = output[0] if isinstance(output, tuple) else output
        return hook

    @classmethod
    def from_pretrained(cls, model: ModelParams, layers: tuple[int, ...] | None = None, max_sequence_length: int = 512,
                        device: torch.device | str = "cpu", precision: str | None = None, truncate: bool = True,
                        group_offload: bool = False):
        """Load and check the flavour's tokenizer, then its text encoder's decoder with only layers 1..max(layers).

        precision: fp32 / bf16 / fp16, or int8-quanto / int4-quanto (weights quantized with optimum-quanto,
        activations in base_model_default_dtype). None: the model's base_model_default_dtype.
        truncate=False loads every decoder layer (what the pipelines run), for comparisons and benchmarks.
        group_offload: the weights stay in CPU memory and each decoder layer is copied to `device` as it runs
        (diffusers' block-level group offloading: one group per decoder layer, plus one for the embedding and final
        norm; prefetched on a side stream on CUDA).
        """
        flavour = model.flavour
        layers = tuple(layers or flavour.stacked_layers)
        precision = precision or model.base_model_default_dtype
        if precision not in TEXT_ENCODER_PRECISIONS:
            raise ValueError(f"text_encoder_1_precision: {precision!r} is not one of {', '.join(TEXT_ENCODER_PRECISIONS)}")
        compute_dtype = torch_dtype(precision) if precision in ("fp32", "bf16", "fp16") \
            else torch_dtype(model.base_model_default_dtype)
        # The tokenizer first: a wrong or unloadable tokenizer fails before gigabytes of weights are read.
        tokenizer = PromptTokenizer.from_pretrained(model)
        tokenizer(["a check that the chat template renders"], max_length=max_sequence_length)
        encoder = load_text_decoder(model, max(max(layers), 1) if truncate else None, compute_dtype,
                                    vocab_size=len(tokenizer), deepest=max(layers))
        if precision.endswith("-quanto"):
            from optimum.quanto import freeze, qint4, qint8, quantize

            quantize(encoder, weights=qint8 if precision == "int8-quanto" else qint4)
            freeze(encoder)
        log.info("text encoder %s: %d decoder layers loaded (%s), stacking hidden states %s",
                 text_encoder_source(model), encoder.config.num_hidden_layers, precision, layers)
        prompt_encoder = cls(tokenizer, encoder, flavour.text_encoder_family, layers, max_sequence_length,
                             torch.device("cpu"))
        return prompt_encoder.move_to(torch.device(device), group_offload=group_offload)

    def move_to(self, device: torch.device, group_offload: bool = False) -> "PromptEncoder":
        """Run on `device`: the weights moved there, or (group_offload) kept in CPU memory with each decoder layer
        copied to `device` as it runs (one group per decoder layer, one for the embedding and final norm)."""
        if group_offload:
            from .models import apply_group_offload

            apply_group_offload(self.model, device, "block_level", 1, use_stream=device.type == "cuda")
        else:
            self.model.to(device)
        self.device = device
        return self

    def tokenize(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """input_ids and attention_mask (B, max_sequence_length), exactly as the flavour's pipeline builds them."""
        return self.tokenizer(list(prompts), max_length=self.max_sequence_length)

    @torch.inference_mode()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        """(B, L, len(layers) * D) prompt embeddings, in the encoder's dtype."""
        inputs = self.tokenize(list(prompts))
        self._captured.clear()
        self.model(input_ids=inputs["input_ids"].to(self.device),
                   attention_mask=inputs["attention_mask"].to(self.device), use_cache=False)
        stacked = torch.stack([self._captured[k] for k in self.layers], dim=1)  # (B, n_layers, L, D)
        self._captured.clear()
        b, n, length, d = stacked.shape
        return stacked.permute(0, 2, 1, 3).reshape(b, length, n * d)

    @property
    def num_loaded_layers(self) -> int:
        return len(_language_model(self.model).layers)

    def parameter_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())
