"""The stages by name, in pipeline order (`params`, then the six that compute), and the DVC bookkeeping that both entry points share.

`dvc repro` runs `flux2lora stage NAME` for each stage that is out of date. The Prefect flow asks DVC the same
question (`DvcPipeline.is_current`), calls the same stage function, then records the result in dvc.lock
(`DvcPipeline.record`), so dvc.lock stays the single truth of what is up to date whichever entry point ran.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable

from .config import PARAMS_FILE, Params, load_params
from .layout import layout_for

log = logging.getLogger(__name__)


def _params(params: Params, root: Path) -> dict:
    from .data.links import sync_dvcignore
    from .params_table import write_stage_inputs

    # `params` is the first stage `dvc repro` runs, and DVC re-reads .dvcignore before it hashes prepare's data root:
    # hiding the dangling symlinks here lets a plain first `dvc repro` pass over them (data/links.py)
    sync_dvcignore(root / params.prepare.data_root, root)
    return write_stage_inputs(params, root)


def _prepare(params: Params, root: Path) -> dict:
    from .data.prepare import prepare

    return prepare(params, root)


def _encode_text(params: Params, root: Path) -> dict:
    from .cache.text import encode_text

    return encode_text(params, root)


def _encode_latents(params: Params, root: Path) -> dict:
    from .cache.latents import encode_latents

    return encode_latents(params, root)


def _train(params: Params, root: Path) -> dict:
    from .tracking import describe_training_run
    from .train.recipe import train

    summary = train(params, root)
    describe_training_run(params, root, summary)  # the run page's description, code version and Prefect links
    return summary


def _validate(params: Params, root: Path) -> dict:
    from .validate.run import validate

    return validate(params, root)


def _publish(params: Params, root: Path) -> dict:
    from .publish.run import publish

    return publish(params, root)


STAGES: dict[str, Callable[[Params, Path], dict]] = {
    "params": _params,  # each later stage's params values, one file per stage: what DVC compares
    "prepare": _prepare,
    "encode-text": _encode_text,
    "encode-latents": _encode_latents,
    "train": _train,
    "validate": _validate,
    "publish": _publish,
}


# The stages that load the base model (or parts of it).
MODEL_STAGES = ("encode-text", "encode-latents", "train", "validate")


def caches_read_by(name: str, params: Params, root: Path) -> tuple[str, ...]:
    """The cache stores (folders under output_dir) stage `name` reads: checked and healed before it runs."""
    if name == "train":
        return ("latents", "text_embeds")
    if name == "validate":  # the validation prompts' embeddings (encode-text's prompt_embeds store)
        return ("prompt_embeds",)
    return ()


def heal_caches(name: str, params: Params, root: Path) -> dict:
    """Bit rot that DVC cannot see (the file's mtime kept) re-encoded before stage `name` reads the caches
    (cache/repair.py). Not inside one of several training processes: their launcher did it before starting them."""
    stores = caches_read_by(name, params, root)
    if not stores or int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        return {}
    from .cache.repair import repair_caches

    if name != "train":
        return repair_caches(params, root, stores)
    from .train.recipe import TrainingLock

    # never re-encode shards under a training that is reading them: a second train refuses here, before healing
    # (the training takes the lock again for its whole run)
    with TrainingLock(layout_for(root, params.output_dir).state_dir / "training.lock"):
        return repair_caches(params, root, stores)


def run_stage(name: str, params_path: str | Path = PARAMS_FILE) -> dict:
    """Run one stage in this process, reading params.yaml; returns the stage's summary."""
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; stages are: {', '.join(STAGES)}")
    params_path = Path(params_path).resolve()
    params = load_params(params_path)
    if name not in MODEL_STAGES:
        return STAGES[name](params, params_path.parent)
    from .models import model_errors

    with model_errors(params.model):  # a base model that is not there: a message, not an OSError
        heal_caches(name, params, params_path.parent)
        return STAGES[name](params, params_path.parent)


class DvcPipeline:
    """The project's dvc.yaml stages, loaded once and kept for a whole pipeline run, as `dvc repro` keeps them.

    Asking whether a stage is current, then recording it in dvc.lock, costs DVC's hashing and one dvc.lock write;
    opening the repo and loading dvc.yaml (templated from params.yaml) and dvc.lock for every question would add
    ~0.1 s of YAML parsing each time. The stages are loaded at the first question, so params.yaml changes written
    before it (a flow run's parameters) are seen. DVC's repo lock is held during each question and record only, as
    `dvc status` and `dvc commit` hold it, not while a stage runs. Run from the project folder (DVC resolves the run
    cache's paths against the working directory). Close it (or use it as a context manager) to release the repo.
    """

    def __init__(self, root: Path):
        from dvc.repo import Repo

        self.root = Path(root).resolve()
        self._repo = Repo(str(self.root))
        self._stages: dict | None = None

    def __enter__(self) -> "DvcPipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._repo.close()

    def _stage(self, name: str):
        if self._stages is None:
            from dvc.repo import lock_repo

            with lock_repo(self._repo):
                # by path: a bare stage name would be resolved against the working directory
                self._stages = {s.name: s for s in self._repo.stage.collect(str(self.root / "dvc.yaml"))}
        if name not in self._stages:
            raise ValueError(f"{self.root / 'dvc.yaml'} has no stage {name!r}")
        return self._stages[name]

    def _hide_dangling_links(self) -> None:
        """Bring the `.dvcignore` block of prepare.data_root's dangling symlinks up to date before DVC hashes the data
        root (data/links.py); DVC re-reads its ignore rules when they changed."""
        from .data.links import sync_dvcignore

        data_root = self.root / load_params(self.root / PARAMS_FILE).prepare.data_root
        ignore = self.root / ".dvcignore"
        before = ignore.read_bytes() if ignore.exists() else None
        sync_dvcignore(data_root, self.root)
        if (ignore.read_bytes() if ignore.exists() else None) != before:
            self._repo._reset()  # drops DVC's cached ignore filter

    def is_current(self, name: str) -> bool:
        """True when dvc.lock says `name` is up to date with its deps, params and outs (`dvc status NAME`)."""
        from dvc.repo import lock_repo

        if name == "prepare":
            self._hide_dangling_links()
        stage = self._stage(name)
        with lock_repo(self._repo):
            return not stage.status(check_updates=True)

    def record(self, name: str) -> None:
        """Write the stage's current deps, params and outs into dvc.lock, its outs into the DVC cache and the run
        into DVC's run cache, as `dvc commit --force NAME` (and `dvc repro` after running it) would."""
        from dvc.repo import lock_repo

        stage = self._stage(name)
        with lock_repo(self._repo):
            stage.save()
            stage.commit(relink=True)
            stage.dvcfile.dump_stages([stage], update_pipeline=False)

