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
Shapes: input a list of B prompts; output (B, max_sequence_length, len(layers) * hidden_size), all padded
positions included (the transformer gets no attention mask).
"""

from __future__ import annotations

import logging

import torch

from .config import ModelParams
from .models import torch_dtype

log = logging.getLogger(__name__)

TEXT_ENCODER_PRECISIONS = ("fp32", "bf16", "fp16", "int8-quanto", "int4-quanto")


def _text_config(config):
    """The language model's config (Mistral3 nests it under text_config)."""
    return getattr(config, "text_config", None) or config


def _language_model(model):
    """The decoder stack (Qwen3Model itself; Mistral3Model.language_model)."""
    return getattr(model, "language_model", None) or model


class PromptEncoder:
    """Tokenizer + truncated text encoder of one FLUX.2 flavour; `encode(prompts)` gives pipeline-equal embeddings."""

    def __init__(self, tokenizer, model, family: str, layers: tuple[int, ...], max_sequence_length: int,
                 device: torch.device):
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
        """Load the flavour's tokenizer and its text encoder's base model with only layers 1..max(layers).

        precision: fp32 / bf16 / fp16, or int8-quanto / int4-quanto (weights quantized with optimum-quanto,
        activations in base_model_default_dtype). None: the model's base_model_default_dtype.
        truncate=False loads every layer (what the pipelines do), for comparisons and benchmarks.
        group_offload: the weights stay in CPU memory and each decoder layer is copied to `device` as it runs
        (diffusers' group offloading; prefetched on a side stream on CUDA).
        """
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        flavour = model.flavour
        layers = tuple(layers or flavour.stacked_layers)
        precision = precision or model.base_model_default_dtype
        if precision not in TEXT_ENCODER_PRECISIONS:
            raise ValueError(f"text_encoder_1_precision: {precision!r} is not one of {', '.join(TEXT_ENCODER_PRECISIONS)}")
        compute_dtype = torch_dtype(precision) if precision in ("fp32", "bf16", "fp16") \
            else torch_dtype(model.base_model_default_dtype)
        common = dict(revision=model.revision)
        config = AutoConfig.from_pretrained(model.model_path, subfolder="text_encoder", **common)
        text_config = _text_config(config)
        deepest = max(layers)
        if deepest > text_config.num_hidden_layers:
            raise ValueError(f"text_encoder_out_layers {layers}: the text encoder has only "
                             f"{text_config.num_hidden_layers} layers")
        if truncate:
            text_config.num_hidden_layers = max(deepest, 1)
            if getattr(text_config, "layer_types", None):
                text_config.layer_types = text_config.layer_types[:text_config.num_hidden_layers]
        from transformers.utils import logging as hf_logging

        # The truncated load leaves the upper layers' (and the LM head's) weights unused on purpose: silence
        # transformers' "unexpected keys" report for exactly this call.
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            encoder = AutoModel.from_pretrained(model.model_path, subfolder="text_encoder", config=config,
                                                dtype=compute_dtype, **common)
        finally:
            hf_logging.set_verbosity(verbosity)
        encoder.requires_grad_(False).eval()
        if precision.endswith("-quanto"):
            from optimum.quanto import freeze, qint4, qint8, quantize

            quantize(encoder, weights=qint8 if precision == "int8-quanto" else qint4)
            freeze(encoder)
        if group_offload:
            from .models import apply_group_offload

            apply_group_offload(encoder, torch.device(device), "block_level", 1,
                                use_stream=torch.device(device).type == "cuda")
        else:
            encoder.to(device)
        if flavour.text_encoder_family == "mistral3":
            from transformers import AutoProcessor

            tokenizer = AutoProcessor.from_pretrained(model.model_path, subfolder="tokenizer", **common)
        else:
            tokenizer = AutoTokenizer.from_pretrained(model.model_path, subfolder="tokenizer", **common)
        log.info("text encoder: %d decoder layers loaded (%s), stacking hidden states %s",
                 text_config.num_hidden_layers, precision, layers)
        return cls(tokenizer, encoder, flavour.text_encoder_family, layers, max_sequence_length, torch.device(device))

    def tokenize(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """input_ids and attention_mask (B, max_sequence_length), exactly as the flavour's pipeline builds them."""
        if self.family == "mistral3":
            from diffusers.pipelines.flux2.pipeline_flux2 import SYSTEM_MESSAGE, format_input

            return self.tokenizer.apply_chat_template(
                format_input(prompts=prompts, system_message=SYSTEM_MESSAGE), add_generation_prompt=False,
                tokenize=True, return_dict=True, return_tensors="pt", padding="max_length", truncation=True,
                max_length=self.max_sequence_length)
        texts = [self.tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                    add_generation_prompt=True, enable_thinking=False)
                 for p in prompts]
        return self.tokenizer(texts, return_tensors="pt", padding="max_length", truncation=True,
                              max_length=self.max_sequence_length)

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
