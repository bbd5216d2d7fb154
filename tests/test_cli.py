"""The command line as a tool: --version, boolean flags with both forms, progress on `generate`, `make services`
passing flags through, `demo-data` writing into its own folder, quiet checkpoint rotation, `cache prune`."""

from __future__ import annotations

import json
import logging
import subprocess
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

from flux2lora.cli import app
from helpers import REPO, VENV_BIN, make_project, project_env, run

PROMPT = "sks style, a red circle on a blue background"


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def test_version() -> None:
    result = invoke("--version")
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"flux2lora {version('flux2lora')}"


def _commands(group, prefix=()):
    """(path, click command) of every command of the CLI, sub-groups included."""
    import click

    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from _commands(command, (*prefix, name))
        else:
            yield (*prefix, name), command


def test_boolean_flags_show_both_forms() -> None:
    """Every boolean option is `--x/--no-x` (except the eager --version and --help), and no help page prints a
    `<bool>` type, as if the flag took a value."""
    root = typer.main.get_command(app)
    for path, command in [((), root), *_commands(root)]:
        for param in command.params:
            if getattr(param, "is_flag", False) and param.name not in ("version", "help"):
                assert param.secondary_opts, f"{' '.join(path)} {param.opts[0]} has no --no- form"
        result = invoke(*path, "--help")
        assert result.exit_code == 0, (path, result.output)
        assert "<bool>" not in result.output, (path, result.output)
    assert "--dry-run / --no-dry-run" in invoke("import-simpletuner", "--help").output
    assert "--dry-run / --no-dry-run" in invoke("cache", "prune", "--help").output


def test_make_services_passes_args_through() -> None:
    """`make services ARGS="..."` hands the flags to `flux2lora services up` (make -n: printed, not run)."""
    for target, command in (("services", "services up"), ("services-status", "services status"),
                            ("services-down", "services down")):
        proc = subprocess.run(["make", "-n", "-o", "install", target, "ARGS=--only mlflow --mlflow-port 0"],
                              cwd=REPO, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        line = next(li for li in proc.stdout.splitlines() if f"flux2lora {command}" in li)
        assert line.endswith(f"flux2lora {command} --only mlflow --mlflow-port 0"), line


def test_demo_data_writes_its_prompt_library_into_its_folder(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = invoke("demo-data", "sets/demo", "--count", "2", "--size", "32")
    assert result.exit_code == 0, result.output
    library = tmp_path / "sets/demo/user_prompt_library.json"
    assert json.loads(library.read_text()), library
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sets"], "demo-data wrote into the working directory"
    assert sorted(p.name for p in library.parent.glob("*.png")) == ["shape_000.png", "shape_001.png"]
    elsewhere = invoke("demo-data", "sets/other", "--count", "1", "--size", "32", "--prompt-library", "lib.json")
    assert elsewhere.exit_code == 0 and (tmp_path / "lib.json").exists()


def test_checkpoint_rotation_logs_at_info(tmp_path: Path, caplog) -> None:
    """Dropping checkpoints beyond the limit and those of an earlier run are normal: INFO, never WARNING."""
    from flux2lora.train.checkpoint import latest_matching, list_checkpoints, save_checkpoint

    lora = {"w": torch.zeros(2)}
    caplog.set_level(logging.INFO, logger="flux2lora.train.checkpoint")
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, lora, {"step": step}, {"fingerprint": "old"}, keep=2)
    assert [c.step for c in list_checkpoints(tmp_path)] == [2, 3]
    assert latest_matching(tmp_path, "new") is None and list_checkpoints(tmp_path) == []
    removed = [r for r in caplog.records if "removing checkpoint" in r.getMessage()]
    assert [r.getMessage().split()[2].rstrip(":") for r in removed] == ["step-000001", "step-000002", "step-000003"]
    assert {r.levelno for r in removed} == {logging.INFO}


# --- generate ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def klein_lora(tmp_path_factory) -> Path:
    """A tiny klein-4b model and a LoRA for it written by our own writer (random, non-zero B: no training needed),
    its metadata naming the base model as the train stage's does."""
    from diffusers import Flux2KleinPipeline, Flux2Transformer2DModel

    from flux2lora.tiny import make_tiny_model
    from flux2lora.train.lora import add_lora, save_diffusers_lora, target_modules

    folder = tmp_path_factory.mktemp("klein-generate")
    model = make_tiny_model(folder / "tiny-klein-4b", flavour="klein-4b")
    transformer = Flux2Transformer2DModel.from_pretrained(model, subfolder="transformer")
    add_lora(transformer, rank=4, alpha=4, dropout=0.0, targets=target_modules(transformer, "attention"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.5)
    return save_diffusers_lora(transformer, Flux2KleinPipeline, folder / "lora",
                               {"base_model": str(model), "revision": "main", "flavour": "tiny-klein-4b"})


class RecordedProgress:
    def __init__(self):
        self.events = []

    def phase(self, description):
        self.events.append(("phase", description))

    def step(self, image, step, total_steps):
        self.events.append(("step", image, step, total_steps))

    def image_done(self, image, total_images):
        self.events.append(("image", image, total_images))


def test_generate_reports_each_step_and_image_and_draws_the_same_images(klein_lora: Path) -> None:
    """The progress callback hears every denoising step of every image, and listening changes no pixel: the
    images equal those of one `generate` call per seed (exactly: same seeds, same CPU kernels)."""
    from flux2lora.generate import generate, generate_images

    small = dict(width=64, height=64, num_inference_steps=3)
    progress = RecordedProgress()
    images = generate_images(PROMPT, klein_lora, seeds=[0, 1], progress=progress, **small)
    phases = [e[1] for e in progress.events if e[0] == "phase"]
    assert phases == ["encoding the prompt", "loading the pipeline"]
    assert [e for e in progress.events if e[0] != "phase"] == [
        ("step", 0, 1, 3), ("step", 0, 2, 3), ("step", 0, 3, 3), ("image", 0, 2),
        ("step", 1, 1, 3), ("step", 1, 2, 3), ("step", 1, 3, 3), ("image", 1, 2)]
    for seed, image in enumerate(images):
        assert np.array_equal(np.asarray(image), np.asarray(generate(PROMPT, klein_lora, seed=seed, **small)))


def test_generate_command_shows_progress_and_writes_every_image(klein_lora: Path, tmp_path: Path) -> None:
    proc = subprocess.run([str(VENV_BIN / "flux2lora"), "generate", "--lora", str(klein_lora), "--prompt", PROMPT,
                           "--images", "2", "--steps", "2", "--width", "64", "--height", "64",
                           "--out", str(tmp_path / "out.png")], cwd=tmp_path, env=project_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "out-0.png").exists() and (tmp_path / "out-1.png").exists()
    assert "image written to" in proc.stdout
    # the bars' final state (stderr is no terminal here: rich draws them once, when they stop)
    assert "images" in proc.stderr and "2/2" in proc.stderr, proc.stderr
    assert "denoising" in proc.stderr, proc.stderr


# --- cache prune ------------------------------------------------------------------------------------------------


def test_cache_prune_removes_what_no_index_uses_and_keeps_the_pipeline_current(tmp_path: Path) -> None:
    """An image leaves the dataset: encode-latents drops it from its index but keeps its latent in the mostly-live
    shard (rewriting a shard costs more than it frees). `cache prune --dry-run` reports that entry and its bytes
    and removes nothing; `cache prune` removes it, the shard shrinks by what it reported, and the stages DVC said
    were up to date still are."""
    from flux2lora.cache.store import TensorStore

    root = make_project(tmp_path / "p", images=4)
    run(["dvc", "repro", "encode-latents"], root)
    (root / "data/demo/shape_003.png").unlink()
    (root / "data/demo/shape_003.txt").unlink()
    run(["dvc", "repro", "encode-latents"], root)
    params = str(root / "params.yaml")
    info = json.loads(invoke("cache", "info", "--params", params, "--json").output)
    assert info["latents"]["not_indexed"] == 1 and info["latents"]["indexed"] == 3
    store_bytes = TensorStore(root / "outputs/latents").nbytes()

    dry = invoke("cache", "prune", "--params", params, "--dry-run", "--json")
    assert dry.exit_code == 0, dry.output
    planned = json.loads(dry.output)
    assert planned["dry_run"] and planned["stores"]["latents"]["entries"] == 1
    assert 0 < planned["stores"]["latents"]["bytes"] < store_bytes
    assert TensorStore(root / "outputs/latents").nbytes() == store_bytes

    done = invoke("cache", "prune", "--params", params)
    assert done.exit_code == 0, done.output
    assert "latents        removed 1 entries" in done.output
    after = json.loads(invoke("cache", "info", "--params", params, "--json").output)
    assert after["latents"]["not_indexed"] == 0 and after["latents"]["indexed"] == 3
    freed = store_bytes - TensorStore(root / "outputs/latents").nbytes()
    assert freed > 0
    # the dry run's estimate is the unused share of the shard; the real prune frees that share (to a header's size)
    assert abs(freed - planned["stores"]["latents"]["bytes"]) < 4096, (freed, planned)
    status = run(["dvc", "status", "encode-latents"], root).stdout
    assert "up to date" in status.lower() or not status.strip(), status
    assert "encode-latents" in done.output.split("dvc.lock:")[1]
    again = json.loads(invoke("cache", "prune", "--params", params, "--json").output)
    assert all(row["entries"] == 0 for row in again["stores"].values())


# --- train ------------------------------------------------------------------------------------------------------


def last_line(proc: subprocess.CompletedProcess) -> str:
    """The command's result line (DVC prints "Updating lock file ..." on stdout before it)."""
    return proc.stdout.strip().splitlines()[-1]


def test_train_runs_the_pipeline_then_nothing_then_only_what_a_set_changes(tmp_path: Path) -> None:
    """`flux2lora train` on the tiny model: every stage runs and dvc.lock agrees (`dvc status` clean); a second call
    runs nothing; `--set train.max_train_steps=12 --stage train` writes params.yaml and re-runs only the params and
    train stages (the data and caches are up to date), stopping there."""
    import yaml

    root = make_project(tmp_path / "p", images=4, **{"train.max_train_steps": 6})
    flux2lora = str(VENV_BIN / "flux2lora")
    first = run([flux2lora, "train"], root, timeout=900)
    assert last_line(first) == ("ran: params, prepare, encode-text, encode-latents, train, validate, publish; "
                                    "up to date: nothing"), first.stdout
    assert "+ train" in first.stderr and "final loss" in first.stderr
    assert "Data and pipelines are up to date" in run(["dvc", "status"], root).stdout

    again = run([flux2lora, "train"], root)
    assert last_line(again).startswith("ran: nothing; up to date: params, prepare"), again.stdout

    changed = run([flux2lora, "train", "--set", "train.max_train_steps=12", "--stage", "train"], root, timeout=900)
    assert last_line(changed) == ("ran: params, train; up to date: prepare, encode-text, encode-latents"), \
        changed.stdout
    assert yaml.safe_load((root / "params.yaml").read_text())["train"]["max_train_steps"] == 12
    assert json.loads((root / "outputs/train/metrics.json").read_text())["steps"] == 12

    bad = subprocess.run([flux2lora, "train", "--set", "train.lora_rnk=4"], cwd=root, env=project_env(),
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "train.lora_rank" in bad.stderr, bad.stderr
