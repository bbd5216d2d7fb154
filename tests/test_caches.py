"""The latent and text caches: content-addressed bf16 safetensors shards that are reused across runs, survive a
SIGKILL mid-way, recover from damaged shards, and never mix flavours or resolutions."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml

from flux2lora.cache.store import CacheEntryDamaged, TensorStore
from flux2lora.config import load_params
from flux2lora.data.synthetic import write_images
from flux2lora.stages import run_stage
from helpers import REPO, VENV_BIN, project_env, set_params

# --------------------------------------------------------------------------------------------------------------
# the store on its own


def test_entries_are_packed_into_shards_of_write_batch_size_in_bf16(tmp_path):
    with TensorStore(tmp_path / "store", write_batch_size=3, verify=True) as store:
        for i in range(7):
            store.put(f"{i:064x}", {"latents": torch.full((4, 2, 2), float(i), dtype=torch.bfloat16)})
    shards = sorted((tmp_path / "store/shards").glob("*.safetensors"))
    assert len(shards) == 3  # 3 + 3 + the last 1, written when the `with` block ends
    assert not list((tmp_path / "store/shards").glob(".*.tmp")), "writes are atomic: no temporary file is left"
    reader = TensorStore(tmp_path / "store")
    assert reader.info()["entries"] == 7 and reader.info()["dtypes"] == {"BF16": 7}
    assert torch.equal(reader.get(f"{5:064x}")["latents"], torch.full((4, 2, 2), 5.0, dtype=torch.bfloat16))


def test_prune_keeps_mostly_live_shards_and_compacts_mostly_dead_ones(tmp_path):
    store = TensorStore(tmp_path / "s", write_batch_size=4, verify=True)
    keys = [f"{i:064x}" for i in range(8)]
    for key in keys:
        store.put(key, {"x": torch.zeros(2)})
    first = store.shard_of(keys[0])
    mtime = first.stat().st_mtime_ns
    assert store.prune(set(keys[:3] + keys[4:5])) == 4
    assert first.exists() and first.stat().st_mtime_ns == mtime, "3 of 4 live: left alone"
    # the stale entry of the kept shard stays on disk (content-addressed, so never wrong, only space) until its
    # shard is mostly dead; the 1-of-4 shard was rewritten with its one live entry
    assert TensorStore(tmp_path / "s").keys() == set(keys[:5])
    assert len(list((tmp_path / "s/shards").glob("*.safetensors"))) == 2


def _corrupt(path: Path, keep_mtime: bool = False) -> None:
    stat = path.stat()
    with open(path, "r+b") as f:
        f.seek(stat.st_size - 64)
        f.write(bytes(64))  # zeros over the last tensor bytes: the header still parses
    if keep_mtime:
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_damage_is_detected_by_writers_and_readers(tmp_path):
    store = TensorStore(tmp_path / "s", write_batch_size=2, verify=True)
    keys = [f"{i:064x}" for i in range(6)]
    for i, key in enumerate(keys):
        store.put(key, {"x": torch.arange(64, dtype=torch.float32) + i})
    truncated, overwritten, rotten = (store.shard_of(k) for k in (keys[0], keys[2], keys[4]))
    truncated.write_bytes(truncated.read_bytes()[:-10])
    _corrupt(overwritten)
    _corrupt(rotten, keep_mtime=True)  # silent corruption: size and mtime unchanged

    reader = TensorStore(tmp_path / "s")
    assert not reader.has(keys[0]), "a truncated shard is unreadable from its header: its entries are missing"
    with pytest.raises(CacheEntryDamaged, match="checksum"):
        for key in keys[4:]:  # the zeros hit the last tensor of the shard, whichever entry it belongs to
            reader.get(key)

    writer = TensorStore(tmp_path / "s", verify=True)
    assert sorted(writer.damaged) == sorted(p.name for p in (truncated, overwritten, rotten))
    assert writer.keys() == set()  # all three shards were deleted: their entries will be encoded again
    assert not truncated.exists() and not rotten.exists()


# --------------------------------------------------------------------------------------------------------------
# the encode stages on a tiny model


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from flux2lora.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("model") / "tiny-klein-4b", flavour="klein-4b", seed=0)


def new_project(root: Path, tiny_model: Path, images: int = 6, size: int | tuple[int, int] = 96, **params) -> Path:
    """The repo's params and prompt library, the shared tiny model, `images` generated images in data/demo."""
    root.mkdir(parents=True)
    for name in ("params.yaml", "user_prompt_library.json"):
        shutil.copy2(REPO / name, root / name)
    (root / "models").mkdir()
    (root / "models" / "tiny-klein-4b").symlink_to(tiny_model)
    write_images(root / "data" / "demo", images, sizes=(size if isinstance(size, tuple) else (size, size),),
                 formats=("jpg",))
    set_params(root, **params)
    return root


def stores(root: Path) -> tuple[TensorStore, TensorStore]:
    return TensorStore(root / "outputs/latents"), TensorStore(root / "outputs/text_embeds")


def all_tensors(store: TensorStore) -> dict[str, torch.Tensor]:
    return {key: next(iter(store.get(key).values())) for key in sorted(store.keys())}


def test_identical_captions_are_encoded_once_and_a_rerun_encodes_only_new_images(tmp_path, tiny_model):
    root = new_project(tmp_path / "p", tiny_model, images=20, **{"encode_text.cache_dtype": "bf16",
                                                                 "encode_latents.cache_dtype": "bf16"})
    for i in range(0, 20, 2):  # every other image shares one caption
        (root / f"data/demo/img_{i:05d}.txt").write_text("sks style, the same caption")
    run_stage("prepare", root / "params.yaml")
    text = run_stage("encode-text", root / "params.yaml")
    latents = run_stage("encode-latents", root / "params.yaml")
    assert text["unique_prompts"] == 10 + 1 + 2 + 1  # 10 distinct + the shared one + 2 library prompts + ""
    assert text["encoded"] == text["unique_prompts"] and latents["encoded"] == 20
    latent_store, text_store = stores(root)
    assert latent_store.info()["dtypes"] == {"BF16": 20} and text_store.info()["dtypes"] == {"BF16": 12}
    prompt_store = TensorStore(root / "outputs/prompt_embeds")  # the 2 library prompts + "" (klein's CFG negative)
    assert prompt_store.info()["dtypes"] == {"BF16": 3}

    write_images(root / "data/demo", 1, start=20, sizes=((96, 96),), formats=("jpg",))  # +5%
    run_stage("prepare", root / "params.yaml")
    assert run_stage("encode-text", root / "params.yaml")["encoded"] == 1
    again = run_stage("encode-latents", root / "params.yaml")
    assert (again["encoded"], again["reused"]) == (1, 20)


def test_changing_resolution_or_crop_never_reuses_a_latent(tmp_path, tiny_model):
    root = new_project(tmp_path / "p", tiny_model, images=4, size=(160, 96))  # not square: crops differ
    run_stage("prepare", root / "params.yaml")
    run_stage("encode-latents", root / "params.yaml")
    first = json.loads((root / "outputs/latents/index.json").read_text())["images"]
    for change in ({"prepare.resolution": 48}, {"prepare.crop_style": "corner"},
                   {"prepare.crop_aspect": "preserve", "prepare.crop_style": "corner"}):
        set_params(root, **change)
        run_stage("prepare", root / "params.yaml")
        summary = run_stage("encode-latents", root / "params.yaml")
        keys = json.loads((root / "outputs/latents/index.json").read_text())["images"]
        assert summary["encoded"] == 4 and not set(keys.values()) & set(first.values()), change
        first = keys


def test_text_keys_separate_flavours_layers_and_lengths():
    from flux2lora.cache.text import text_key
    from flux2lora.config import parse_params

    def key(**sections) -> str:
        return text_key(parse_params(sections), "sks style, a red circle", "encoder-identity")

    base = key(model={"model_flavour": "klein-4b"})
    assert base == key(model={"model_flavour": "klein-4b"})
    assert len({base, key(model={"model_flavour": "klein-9b"}), key(model={"model_flavour": "dev"}),
                key(model={"model_flavour": "klein-4b"}, encode_text={"text_encoder_out_layers": [10, 20, 30]}),
                key(model={"model_flavour": "klein-4b"}, encode_text={"max_sequence_length": 256}),
                key(model={"model_flavour": "klein-4b"}, encode_text={"cache_dtype": "fp32"}),
                key(model={"model_flavour": "klein-4b"}, encode_text={"text_encoder_1_precision": "int8-quanto"}),
                text_key(parse_params({"model": {"model_flavour": "klein-4b"}}), "sks style, a red circle",
                         "another-encoder")}) == 8


def test_text_cache_of_another_flavour_is_not_reused(tmp_path, tiny_model):
    from flux2lora.tiny import make_tiny_model

    root = new_project(tmp_path / "p", tiny_model, images=3)
    run_stage("prepare", root / "params.yaml")
    before = run_stage("encode-text", root / "params.yaml")
    make_tiny_model(root / "models" / "tiny-dev", flavour="dev", seed=0)
    set_params(root, **{"model.model_flavour": "tiny-dev", "model.pretrained_model_name_or_path": "models/tiny-dev"})
    after = run_stage("encode-text", root / "params.yaml")
    assert after["encoded"] == after["unique_prompts"] == before["unique_prompts"]
    assert after["pruned"] == before["unique_prompts"], "the klein entries are dropped, not served to dev"


def test_a_damaged_shard_is_detected_and_re_encoded_to_the_same_latents(tmp_path, tiny_model):
    # one image per VAE forward: a latent then does not depend on which images shared its batch (on CPU the
    # convolution's blocking differs with the batch and moves the last bits)
    root = new_project(tmp_path / "p", tiny_model, images=12, **{"encode_latents.write_batch_size": 4,
                                                                 "encode_latents.vae_batch_size": 1})
    run_stage("prepare", root / "params.yaml")
    run_stage("encode-latents", root / "params.yaml")
    clean = all_tensors(stores(root)[0])
    shards = sorted((root / "outputs/latents/shards").glob("*.safetensors"))
    assert len(shards) == 3
    shards[0].write_bytes(shards[0].read_bytes()[:-100])  # truncated
    _corrupt(shards[1])  # overwritten in place
    summary = run_stage("encode-latents", root / "params.yaml")
    assert (summary["damaged_shards"], summary["encoded"], summary["reused"]) == (2, 8, 4)
    repaired = all_tensors(stores(root)[0])
    assert repaired.keys() == clean.keys() and all(torch.equal(repaired[k], clean[k]) for k in clean)


def test_encoding_killed_with_sigkill_resumes_without_re_encoding_what_was_written(tmp_path, tiny_model):
    """A real `kill -9` of `flux2lora stage encode-latents` once some shards exist; the rerun encodes only the rest
    and ends with exactly the latents of a run that was never interrupted."""
    count = 80
    root = new_project(tmp_path / "p", tiny_model, images=count, size=256,
                       **{"prepare.resolution": 256, "encode_latents.vae_batch_size": 2,
                          "encode_latents.write_batch_size": 4})
    run_stage("prepare", root / "params.yaml")
    shards = root / "outputs/latents/shards"
    proc = subprocess.Popen([str(VENV_BIN / "flux2lora"), "stage", "encode-latents"], cwd=root, env=project_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not (shards.exists() and len(list(shards.glob("*.safetensors"))) >= 2):
        assert proc.poll() is None, f"encode-latents ended before it could be killed: {proc.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, "no shard was written within 300 s"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    written = TensorStore(root / "outputs/latents").keys()
    assert 0 < len(written) < count, f"the kill should land mid-way ({len(written)} of {count} written)"
    assert not (root / "outputs/latents/index.json").exists()

    summary = run_stage("encode-latents", root / "params.yaml")
    assert summary["encoded"] == count - len(written) and summary["reused"] == len(written)
    resumed = all_tensors(stores(root)[0])

    set_params(root, output_dir="clean")  # the same data and model, never interrupted
    run_stage("prepare", root / "params.yaml")
    run_stage("encode-latents", root / "params.yaml")
    clean = all_tensors(TensorStore(root / "clean/latents"))
    assert resumed.keys() == clean.keys() and len(clean) == count
    assert all(torch.equal(resumed[k], clean[k]) for k in clean)


def test_cache_info_reports_entries_and_bytes_per_store(tmp_path, tiny_model):
    from typer.testing import CliRunner

    from flux2lora.cli import app

    root = new_project(tmp_path / "p", tiny_model, images=3)
    for stage in ("prepare", "encode-text", "encode-latents"):
        run_stage(stage, root / "params.yaml")
    result = CliRunner().invoke(app, ["cache", "info", "--params", str(root / "params.yaml"), "--json", "--verify"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    latent_store, text_store = stores(root)
    assert info["latents"]["entries"] == 3 and info["latents"]["bytes"] == latent_store.nbytes() > 0
    assert info["text_embeds"]["entries"] == len(text_store.keys())
    assert info["latents"]["indexed"] == 3 and info["latents"]["damaged"] == []
    table = CliRunner().invoke(app, ["cache", "info", "--params", str(root / "params.yaml")])
    assert table.exit_code == 0 and "latents" in table.output and "text_embeds" in table.output
