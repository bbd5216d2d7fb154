"""The six stages by name, in pipeline order, and the DVC bookkeeping that both entry points share.

`dvc repro` runs `flux2lora stage NAME` for each stage that is out of date. The Prefect flow asks DVC the same
question (`stage_is_current`), calls the same stage function, then records the result in dvc.lock
(`record_stage`), so dvc.lock stays the single truth of what is up to date whichever entry point ran.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

from .config import PARAMS_FILE, Params, load_params

log = logging.getLogger(__name__)


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
    from .train.loop import train

    return train(params, root)


def _validate(params: Params, root: Path) -> dict:
    from .validate.run import validate

    return validate(params, root)


def _publish(params: Params, root: Path) -> dict:
    from .publish.run import publish

    return publish(params, root)


STAGES: dict[str, Callable[[Params, Path], dict]] = {
    "prepare": _prepare,
    "encode-text": _encode_text,
    "encode-latents": _encode_latents,
    "train": _train,
    "validate": _validate,
    "publish": _publish,
}


def run_stage(name: str, params_path: str | Path = PARAMS_FILE) -> dict:
    """Run one stage in this process, reading params.yaml; returns the stage's summary."""
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; stages are: {', '.join(STAGES)}")
    params_path = Path(params_path).resolve()
    params = load_params(params_path)
    return STAGES[name](params, params_path.parent)


def stage_is_current(name: str, root: Path) -> bool:
    """True when dvc.lock says `name` is up to date with its deps, params and outs."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        # qualified by the project's dvc.yaml: a bare name would be resolved against the working directory
        return not repo.status(targets=[f"{root / 'dvc.yaml'}:{name}"])


def record_stage(name: str, root: Path) -> None:
    """Write the stage's current deps, params and outs into dvc.lock (and the DVC cache), as `dvc repro` would."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        repo.commit(f"{root / 'dvc.yaml'}:{name}", force=True)
