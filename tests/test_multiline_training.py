"""Multi-line captions through encode-text and training: every line embedded once, one picked per sample and step,
and a run stopped after a checkpoint and resumed ends with the same LoRA as one that never stopped."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import make_project
from safetensors.torch import load_file

from flux2lora.stages import run_stage


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    root = make_project(tmp_path_factory.mktemp("lines") / "template", git=False, images=4,
                        **{"train.max_train_steps": 6, "train.train_batch_size": 2, "train.checkpointing_steps": 3,
                           "train.learning_rate": 1e-3})
    for i, txt in enumerate(sorted((root / "data/demo").glob("*.txt"))[:2]):
        txt.write_text(f"sks style, first line {i}\nsks style, second line {i}\nsks style, third line {i}\n")
    for stage in ("prepare", "encode-text", "encode-latents"):
        run_stage(stage, root / "params.yaml")
    return root


def test_every_line_is_embedded_once(encoded):
    index = json.loads((encoded / "outputs/text_embeds/index.json").read_text())
    lines = index["caption_lines"]
    assert len(lines) == 2 and all(len(set(keys)) == 3 for keys in lines.values())
    for image_id, keys in lines.items():
        assert index["captions"][image_id] == keys[0]
    from flux2lora.cache.store import TensorStore

    store = TensorStore(encoded / "outputs/text_embeds")
    assert all(store.has(k) for keys in lines.values() for k in keys)


def test_training_picks_lines_and_resumes_exactly(encoded, tmp_path, monkeypatch):
    from flux2lora.train import draws as loop

    used = []
    original = loop.Sample.text_key_at
    monkeypatch.setattr(loop.Sample, "text_key_at", lambda self, *a: used.append((self.image_id, original(self, *a)))
                        or used[-1][1])
    straight = tmp_path / "straight"
    shutil.copytree(encoded, straight, symlinks=True)
    run_stage("train", straight / "params.yaml")
    picked = {}
    for image_id, key in used:
        picked.setdefault(image_id, set()).add(key)
    multi = json.loads((encoded / "outputs/text_embeds/index.json").read_text())["caption_lines"]
    assert any(len(picked.get(i, set())) > 1 for i in multi), "several lines of one image are trained on"

    resumed = tmp_path / "resumed"
    shutil.copytree(encoded, resumed, symlinks=True)
    monkeypatch.setenv("FLUX2LORA_FAULT", "train:step=3")
    with pytest.raises(Exception, match="FLUX2LORA_FAULT"):
        run_stage("train", resumed / "params.yaml")
    monkeypatch.delenv("FLUX2LORA_FAULT")
    summary = run_stage("train", resumed / "params.yaml")
    assert summary["resumed_from_step"] == 3
    a = load_file(str(straight / "outputs/lora/pytorch_lora_weights.safetensors"))
    b = load_file(str(resumed / "outputs/lora/pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_every_lines_entry_counts_as_used_so_repair_checks_it(encoded):
    """The lines after the first are in the index's caption_lines only: cache repair and `cache info` count them."""
    from flux2lora.cache.info import _index_keys

    index = json.loads((encoded / "outputs/text_embeds/index.json").read_text())
    used = _index_keys(index)
    assert all(k in used for keys in index["caption_lines"].values() for k in keys)
