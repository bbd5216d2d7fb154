"""The loaders on folders laid out like the real hub repos (`make_tiny_model(layout="hub")`): real class names,
sharded bf16 weights with index files, 36 / 40 text layers, tied and untied heads, dev's PixtralProcessor tokenizer
folder and legacy key names, a step-distilled klein, Mistral-Small-3.1's own layout.

torchvision is not installed in this environment (nor in CI's), as for a fresh `pip install flux2lora`: transformers 5
cannot build dev's PixtralProcessor here. The reference tokenization for dev is therefore transformers' own
ProcessorMixin code path (`TextOnlyProcessor` below: the processor class PixtralProcessor inherits its text handling
from, loading the chat template the same way) without the image processor that needs torchvision.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from flux2lora.config import ModelParams
from flux2lora.models import (GENERATION_HEADROOM_BYTES, check_not_distilled, describe_model, is_distilled,
                              load_text_pipeline, load_training_transformer, parameter_bytes)
from flux2lora.text_encoding import PromptEncoder, PromptTokenizer
from flux2lora.tiny import make_tiny_model

PROMPTS = ["sks style, a red circle on a blue background", "a photo [IMG] of a dog, on the beach", ""]
FLAVOURS = ["klein-4b", "klein-9b", "dev"]
TOLERANCE = 1e-6  # fp32 on both sides: the same weights and the same ops; measured 0.0


def _text_only_processor():
    from transformers.processing_utils import ProcessorMixin

    class TextOnlyProcessor(ProcessorMixin):
        """ProcessorMixin with a tokenizer only: from_pretrained reads the processor's chat template
        (chat_template.json, else chat_template.jinja) and apply_chat_template/__call__ run the code PixtralProcessor
        inherits for text."""

        def __init__(self, tokenizer=None, chat_template=None):
            super().__init__(tokenizer, chat_template=chat_template)

    return TextOnlyProcessor


def reference_processor(folder: Path):
    return _text_only_processor().from_pretrained(folder)


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> dict[str, Path]:
    """One folder per layout: the three flavours, dev with transformers 5 key names, Mistral-Small-3.1's repo, a
    step-distilled klein-4b."""
    root = tmp_path_factory.mktemp("hub")
    folders = {name: make_tiny_model(root / name, name, layout="hub") for name in FLAVOURS}
    folders["dev-t5"] = make_tiny_model(root / "dev-t5", "dev", layout="hub", text_encoder_keys="transformers5")
    folders["mistral-small"] = make_tiny_model(root / "Mistral-Small-3.1-24B-Instruct-2503", "dev",
                                               layout="mistral-small")
    folders["klein-4b-distilled"] = make_tiny_model(root / "FLUX.2-klein-4B", "klein-4b", layout="hub",
                                                    distilled=True)
    return folders


def params(folder: Path, flavour: str, **extra) -> ModelParams:
    return ModelParams(model_flavour=flavour, pretrained_model_name_or_path=str(folder),
                       base_model_default_dtype="fp32", **extra)


def _weight_map(folder: Path) -> dict[str, str]:
    return json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]


def test_torchvision_is_not_installed():
    """The premise of the dev tests: a fresh install without torchvision (keep it out of the dependencies)."""
    assert importlib.util.find_spec("torchvision") is None


@pytest.mark.parametrize("name", FLAVOURS)
def test_hub_folders_have_the_real_layout(hub, name):
    folder = hub[name]
    index = json.loads((folder / "model_index.json").read_text())
    klein = name != "dev"
    assert index["_class_name"] == ("Flux2KleinPipeline" if klein else "Flux2Pipeline")
    assert index["text_encoder"] == ["transformers", "Qwen3ForCausalLM" if klein else
                                     "Mistral3ForConditionalGeneration"]
    assert index["tokenizer"] == ["transformers", "Qwen2TokenizerFast" if klein else "PixtralProcessor"]
    assert index["vae"] == ["diffusers", "AutoencoderKLFlux2"]
    for sub, weights in (("transformer", "diffusion_pytorch_model"), ("text_encoder", "model")):
        shards = sorted((folder / sub).glob(f"{weights}-*-of-*.safetensors"))
        assert len(shards) >= 2 and (folder / sub / f"{weights}.safetensors.index.json").is_file(), sub
    transformer = json.loads((folder / "transformer" / "config.json").read_text())
    blocks = {"klein-4b": (5, 20), "klein-9b": (8, 24), "dev": (8, 48)}[name]
    assert (transformer["num_layers"], transformer["num_single_layers"]) == blocks
    assert ("guidance_embeds" in transformer) == klein  # dev's config has no key: diffusers' default True applies
    text = json.loads((folder / "text_encoder" / "config.json").read_text())
    keys = _weight_map(folder / "text_encoder")
    tokenizer_files = {p.name for p in (folder / "tokenizer").iterdir()}
    if klein:
        assert index["is_distilled"] is False
        assert text["num_hidden_layers"] == 36 and text["vocab_size"] % 128 == 0
        assert text["tie_word_embeddings"] is (name == "klein-4b")
        assert ("lm_head.weight" in keys) is (name == "klein-9b")
        assert {"vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                "added_tokens.json", "chat_template.jinja"} <= tokenizer_files
    else:
        assert text["text_config"]["num_hidden_layers"] == 40 and "vision_config" in text
        assert "language_model.lm_head.weight" in keys  # untied head, legacy names
        assert all(k.startswith(("language_model.model.", "language_model.lm_head.", "vision_tower.",
                                 "multi_modal_projector.")) for k in keys)
        assert {"tokenizer.json", "tokenizer_config.json", "processor_config.json", "preprocessor_config.json",
                "chat_template.json"} <= tokenizer_files
        config = json.loads((folder / "tokenizer" / "tokenizer_config.json").read_text())
        assert config["processor_class"] == "PixtralProcessor"
    assert not (folder / "flux2lora_tiny.json").exists()


def test_transformers5_keys_and_mistral_small_layout(hub):
    keys = _weight_map(hub["dev-t5"] / "text_encoder")
    assert "lm_head.weight" in keys and all(k.startswith(("model.", "lm_head.")) for k in keys)
    repo = hub["mistral-small"]
    assert not (repo / "text_encoder").exists() and (repo / "config.json").is_file()
    assert (repo / "processor_config.json").is_file() and (repo / "chat_template.json").is_file()
    assert _weight_map(repo) == _weight_map(hub["dev"] / "text_encoder")


def test_dev_pipeline_cannot_load_its_tokenizer_here(hub):
    """What a fresh install meets with diffusers alone: the PixtralProcessor folder does not load."""
    from diffusers import Flux2Pipeline

    with pytest.raises((ImportError, ValueError, TypeError)):
        Flux2Pipeline.from_pretrained(hub["dev"], transformer=None, vae=None, text_encoder=None)


def test_dev_token_ids_equal_the_processors(hub):
    from diffusers.pipelines.flux2.pipeline_flux2 import SYSTEM_MESSAGE, format_input
    from transformers import AutoTokenizer

    folder = hub["dev"] / "tokenizer"
    # the chat template is the processor's file: a bare tokenizer has none
    assert AutoTokenizer.from_pretrained(folder).chat_template is None
    expected = reference_processor(folder).apply_chat_template(
        format_input(prompts=PROMPTS, system_message=SYSTEM_MESSAGE), add_generation_prompt=False, tokenize=True,
        return_dict=True, return_tensors="pt", padding="max_length", truncation=True, max_length=512)
    got = PromptTokenizer.from_pretrained(params(hub["dev"], "dev"))(PROMPTS, max_length=512)
    assert torch.equal(got["input_ids"], expected["input_ids"])
    assert torch.equal(got["attention_mask"], expected["attention_mask"])
    assert got["input_ids"][0, 0] == 1 and got["input_ids"][0, 1] != 1  # BOS once


CASES = {
    "klein-4b": ("klein-4b", "klein-4b", {}),
    "klein-9b": ("klein-9b", "klein-9b", {}),
    "dev": ("dev", "dev", {}),
    "dev-transformers5-keys": ("dev-t5", "dev", {}),
    "dev-encoder-from-mistral-small": ("dev", "dev", {"pretrained_text_encoder_name_or_path": "mistral-small",
                                                      "pretrained_tokenizer_name_or_path": "mistral-small"}),
}


@pytest.mark.parametrize("case", CASES)
def test_prompt_embeddings_equal_the_pipelines_encode_prompt(hub, case):
    folder, flavour, extra = CASES[case]
    extra = {k: str(hub[v]) for k, v in extra.items()}
    model = params(hub[folder], flavour, **extra)
    tokenizer = None if flavour != "dev" else reference_processor(
        Path(extra["pretrained_tokenizer_name_or_path"]) if extra else hub[folder] / "tokenizer")
    pipe = load_text_pipeline(model, torch.device("cpu"), tokenizer=tokenizer)
    layers = model.flavour.stacked_layers
    reference, _ = pipe.encode_prompt(PROMPTS, device=torch.device("cpu"), max_sequence_length=512,
                                      text_encoder_out_layers=layers)
    encoder = PromptEncoder.from_pretrained(model)
    embeds = encoder.encode(PROMPTS)
    assert encoder.num_loaded_layers == max(layers) < pipe.text_encoder.config.get_text_config().num_hidden_layers
    assert embeds.shape == reference.shape == (3, 512, 48)
    assert (embeds - reference).abs().max().item() <= TOLERANCE


def _delete_key(folder: Path, key: str) -> None:
    """Remove one tensor from a sharded checkpoint (and its index), like a partial or damaged download."""
    from safetensors.torch import load_file, save_file

    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = folder / index["weight_map"].pop(key)
    tensors = load_file(str(shard))
    del tensors[key]
    save_file(tensors, str(shard), metadata={"format": "pt"})
    index_path.write_text(json.dumps(index))


@pytest.mark.parametrize("name, deleted", [("klein-9b", "model.layers.12.self_attn.q_proj.weight"),
                                           ("dev", "language_model.model.layers.29.mlp.down_proj.weight"),
                                           ("dev", "language_model.model.norm.weight")])
def test_a_deleted_kept_layer_weight_is_a_clear_error(hub, tmp_path, name, deleted):
    folder = shutil.copytree(hub[name], tmp_path / name)
    _delete_key(folder / "text_encoder", deleted)
    with pytest.raises(ValueError) as error:
        PromptEncoder.from_pretrained(params(folder, name))
    message = str(error.value)
    assert "is missing from the checkpoint" in message and str(folder / "text_encoder") in message
    decoder_key = re.sub(r"^(language_model\.)?model\.", "", deleted)
    assert f"weight {decoder_key!r}" in message  # the key, as the decoder names it


def test_weights_above_the_cut_and_the_vision_tower_may_be_missing(hub, tmp_path):
    """Layers we do not load are not checked: deleting one is not an error; an unknown key is."""
    from safetensors.torch import load_file, save_file

    folder = shutil.copytree(hub["dev"], tmp_path / "dev")
    _delete_key(folder / "text_encoder", "language_model.model.layers.35.mlp.up_proj.weight")
    _delete_key(folder / "text_encoder", "vision_tower.ln_pre.weight")
    PromptEncoder.from_pretrained(params(folder, "dev"), max_sequence_length=16)

    index_path = folder / "text_encoder" / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = folder / "text_encoder" / index["weight_map"]["language_model.model.embed_tokens.weight"]
    tensors = load_file(str(shard))
    tensors["language_model.model.extra_scale"] = torch.ones(1, dtype=torch.bfloat16)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    index["weight_map"]["language_model.model.extra_scale"] = shard.name
    index_path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match="unexpected weight 'extra_scale'"):
        PromptEncoder.from_pretrained(params(folder, "dev"), max_sequence_length=16)


def test_the_loaded_dev_encoder_holds_no_vision_tower_and_no_head(hub):
    encoder = PromptEncoder.from_pretrained(params(hub["dev"], "dev"))
    assert type(encoder.model).__name__ == "MistralModel"
    names = [name for name, _ in encoder.model.named_parameters()]
    assert not [n for n in names if "vision" in n or "multi_modal" in n or "lm_head" in n]
    assert {n.split(".")[1] for n in names if n.startswith("layers.")} == {str(i) for i in range(30)}


def _groups(model) -> list:
    """The diffusers group-offloading ModuleGroup of each decoder layer."""
    groups = []
    for layer in model.layers:
        hook = getattr(layer, "_diffusers_hook", None)
        groups.append(hook.get_hook("group_offloading").group if hook is not None else None)
    return groups


@pytest.mark.parametrize("name", ["dev", "klein-4b"])
def test_offloaded_encoder_has_one_group_per_decoder_layer_and_encodes_identically(hub, name):
    model = params(hub[name], name)
    plain = PromptEncoder.from_pretrained(model).encode(PROMPTS)
    offloaded = PromptEncoder.from_pretrained(model, group_offload=True)
    groups = _groups(offloaded.model)
    assert len(groups) == max(model.flavour.stacked_layers) and None not in groups
    assert len({id(g) for g in groups}) == len(groups)  # each decoder layer its own group
    assert all(g.modules == [layer] for g, layer in zip(groups, offloaded.model.layers))
    assert torch.equal(offloaded.encode(PROMPTS), plain)


def test_generate_on_dev_offloads_when_the_gpu_is_smaller_than_the_pipeline(hub, caplog):
    from flux2lora.generate import generate

    small = dict(width=64, height=64, num_inference_steps=2, seed=0, model_path=str(hub["dev"]), flavour="dev",
                 device="cpu")
    with caplog.at_level(logging.INFO):
        plain = generate("a red cube", None, **small)
    assert "pipeline placement: device" in caplog.text
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("generate: model"))
    assert all(part in line for part in (str(hub["dev"]), "flavour dev", "device cpu", "dtype fp32", "scale 1"))
    caplog.clear()
    # a GPU with room for the largest component (the transformer) but not the whole pipeline: model CPU offload
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel

    transformer = parameter_bytes(Flux2Transformer2DModel.from_pretrained(hub["dev"], subfolder="transformer",
                                                                          dtype=torch.float32))
    vae = parameter_bytes(AutoencoderKLFlux2.from_pretrained(hub["dev"], subfolder="vae", dtype=torch.float32))
    assert vae < transformer
    with caplog.at_level(logging.INFO):
        offloaded = generate("a red cube", None, gpu_memory_bytes=GENERATION_HEADROOM_BYTES + transformer + vae // 2,
                             **small)
    assert "pipeline placement: model_cpu_offload" in caplog.text
    caplog.clear()
    # smaller than any component: the transformer's blocks are moved one at a time
    with caplog.at_level(logging.INFO):
        grouped = generate("a red cube", None, gpu_memory_bytes=2**20, **small)
    assert "pipeline placement: group_offload" in caplog.text
    for image in (offloaded, grouped):
        assert np.abs(np.asarray(image, dtype=np.float64) - np.asarray(plain, dtype=np.float64)).max() <= 1


def test_distilled_klein_is_recognised(hub):
    assert is_distilled(params(hub["klein-4b-distilled"], "klein-4b"))
    assert not is_distilled(params(hub["klein-4b"], "klein-4b"))
    # the published ids need no download to be recognised
    assert is_distilled(ModelParams(model_flavour="klein-9b",
                                    pretrained_model_name_or_path="black-forest-labs/FLUX.2-klein-9B"))
    with pytest.raises(ValueError, match="black-forest-labs/FLUX.2-klein-base-9B"):
        check_not_distilled(ModelParams(model_flavour="klein-9b",
                                        pretrained_model_name_or_path="black-forest-labs/FLUX.2-klein-9B"))
    with pytest.raises(ValueError, match="black-forest-labs/FLUX.2-klein-base-4B.*allow_distilled"):
        load_training_transformer(params(hub["klein-4b-distilled"], "klein-4b"), torch.device("cpu"))


def test_distilled_repo_is_refused_for_training_and_allow_distilled_trains(hub, tmp_path, caplog):
    """The stages on the distilled hub fixture: encode-latents (caching for training) and train refuse it; with
    model.allow_distilled the whole chain runs (2 steps), warns, and the LoRA's metadata carries the warning."""
    from flux2lora.stages import run_stage
    from flux2lora.train.lora import read_lora_metadata
    from helpers import make_project, set_params

    root = make_project(tmp_path / "project", git=False)
    model = shutil.copytree(hub["klein-4b-distilled"], root / "models" / "FLUX.2-klein-4B")
    set_params(root, **{"model.model_flavour": "klein-4b",
                        "model.pretrained_model_name_or_path": "models/FLUX.2-klein-4B", "train.max_train_steps": 2})
    run_stage("prepare", root / "params.yaml")
    with pytest.raises(ValueError, match="step-distilled.*FLUX.2-klein-base-4B"):
        run_stage("encode-latents", root / "params.yaml")

    set_params(root, **{"model.allow_distilled": True})
    with caplog.at_level(logging.WARNING):
        for stage in ("encode-text", "encode-latents", "train", "validate"):
            run_stage(stage, root / "params.yaml")
    assert "model.allow_distilled: training on the step-distilled" in caplog.text
    from flux2lora.config import load_params
    from flux2lora.layout import layout_for

    layout = layout_for(root, load_params(root / "params.yaml").output_dir)
    meta = read_lora_metadata(layout.lora_file)
    assert "FLUX.2-klein-base-4B" in meta["flux2lora.distilled_warning"]
    assert describe_model(params(model, "klein-4b", allow_distilled=True))["distilled"] == "true"
    assert (layout.validation_dir / "grid.png").is_file()


def test_the_tokenizer_is_checked_before_any_weight_is_read(hub, tmp_path):
    """A tokenizer folder without its chat template fails first, with the weights gone too: the error is about the
    tokenizer, so nothing was loaded before it."""
    folder = shutil.copytree(hub["dev"], tmp_path / "dev")
    (folder / "tokenizer" / "chat_template.json").unlink()
    for shard in (folder / "text_encoder").glob("model-*.safetensors"):
        shard.unlink()
    with pytest.raises(ValueError, match=r"tokenizer: .*tokenizer has no chat template"):
        PromptEncoder.from_pretrained(params(folder, "dev"))


def test_a_tokenizer_of_the_other_family_is_refused(hub):
    wrong = params(hub["dev"], "dev", pretrained_tokenizer_name_or_path=str(hub["klein-4b"]),
                   tokenizer_subfolder="tokenizer")
    with pytest.raises(ValueError, match=r"lacks \[INST\]"):
        PromptTokenizer.from_pretrained(wrong)


def test_the_command_writes_hub_layouts_byte_identically(tmp_path):
    import hashlib

    from typer.testing import CliRunner

    from flux2lora.cli import app

    digests = []
    for name in ("a", "b"):
        result = CliRunner().invoke(app, ["make-tiny-model", str(tmp_path / name), "--flavour", "klein-9b",
                                          "--layout", "hub", "--distilled"])
        assert result.exit_code == 0, result.output
        digests.append({str(f.relative_to(tmp_path / name)): hashlib.sha256(f.read_bytes()).hexdigest()
                        for f in sorted((tmp_path / name).rglob("*")) if f.is_file()})
    assert digests[0] == digests[1]
    assert json.loads((tmp_path / "a" / "model_index.json").read_text())["is_distilled"] is True
    bad = CliRunner().invoke(app, ["make-tiny-model", str(tmp_path / "c"), "--flavour", "dev", "--distilled"])
    assert bad.exit_code != 0 and "only klein" in bad.output


def test_dev_stages_run_on_the_hub_layout_without_torchvision(hub, tmp_path):
    """encode-text, encode-latents, train (2 steps), validate and publish on dev's hub layout, its text encoder
    taken from Mistral-Small-3.1's own repo layout."""
    from flux2lora.config import load_params
    from flux2lora.layout import layout_for
    from flux2lora.stages import STAGES, run_stage
    from helpers import make_project, set_params

    root = make_project(tmp_path / "project", flavour="dev", git=False)
    shutil.copytree(hub["dev"], root / "models" / "FLUX.2-dev")
    shutil.copytree(hub["mistral-small"], root / "models" / "Mistral-Small-3.1-24B-Instruct-2503")
    set_params(root, **{"model.model_flavour": "dev", "model.pretrained_model_name_or_path": "models/FLUX.2-dev",
                        "model.pretrained_text_encoder_name_or_path": "models/Mistral-Small-3.1-24B-Instruct-2503",
                        "train.max_train_steps": 2, "encode_text.group_offload_text_encoder": True})
    for stage in STAGES:
        run_stage(stage, root / "params.yaml")
    layout = layout_for(root, load_params(root / "params.yaml").output_dir)
    index = json.loads((layout.text_embeds_dir / "index.json").read_text())
    assert "Mistral-Small-3.1-24B-Instruct-2503" not in index["encoder"]  # relocatable: a hash, not the path
    assert (layout.validation_dir / "grid.png").is_file() and layout.lora_file.is_file()

    # `flux2lora generate` takes the text encoder the LoRA was trained with from its metadata: the base repo's own
    # text_encoder/ (a user who downloaded dev without it) is not needed
    from flux2lora.generate import generate_images
    from flux2lora.train.lora import read_lora_metadata

    meta = read_lora_metadata(layout.lora_file)
    assert meta["flux2lora.text_encoder"] == "models/Mistral-Small-3.1-24B-Instruct-2503"
    shutil.rmtree(root / "models" / "FLUX.2-dev" / "text_encoder")
    image, = generate_images("a photo", layout.lora_file, width=64, height=64, num_inference_steps=1)
    assert image.size == (64, 64)
