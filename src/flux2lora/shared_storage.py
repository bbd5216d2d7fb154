"""`runtime.storage`: the place every node of a Ray job sees (a shared folder or `s3://bucket/prefix`), through
pyarrow's filesystems, the ones Ray Train itself uses for its run storage.

With engine ray and a storage, the driver uploads the train stage's cached inputs once (`upload_inputs`: files
whose content is already there are skipped); each worker downloads them into a node-local staging folder and trains
from there (`StagedLayout`); checkpoints are mirrored to `<storage>/checkpoints/` after every save and pulled from it
before resuming (`CheckpointMirror`), so a job restarted on other nodes resumes from the newest one; rank 0 uploads
the LoRA and the train files to `<storage>/outputs/`, and the driver brings them back into the project, where DVC
records them. The storage holds:

    <storage>/inputs.json                  relative path -> sha256 of every uploaded input file
    <storage>/latents/..., text_embeds/... the caches, as in the project's output_dir
    <storage>/checkpoints/step-NNNNNN/     the checkpoints, the same files the recipe writes and resumes from
    <storage>/outputs/lora/, outputs/train/  the last job's outputs
    <storage>/ray_runs/                    Ray Train's own run storage

Nothing stored names a local path. Credentials are never read here: pyarrow takes them from the node's own AWS
chain (environment, config files, instance role); only the endpoint (AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL) and
region travel from the driver to the workers.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from .io import sha256_of
from .layout import Layout

log = logging.getLogger(__name__)

INPUTS = ("latents", "text_embeds")  # train's cached inputs: stages.caches_read_by("train"), dvc.yaml's deps
MANIFEST = "inputs.json"
CHECKPOINTS = "checkpoints"
OUTPUTS = "outputs"
RAY_RUNS = "ray_runs"
# a checkpoint's files; state.json goes last, so a folder without it is incomplete (checkpoint.list_checkpoints)
CHECKPOINT_FILES = ("lora.safetensors", "training_state.pt", "state.json")
_CHUNK = 8 << 20


def _files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []


@dataclass(frozen=True)
class SharedStorage:
    """One runtime.storage location: `uri` is `s3://bucket/prefix` or an absolute folder; for S3 the endpoint and
    region the driver uses (None: pyarrow's defaults). Picklable: the filesystem is built in each process."""

    uri: str
    endpoint: str | None = None
    region: str | None = None

    @classmethod
    def from_params(cls, params, root: Path) -> SharedStorage | None:
        """runtime.storage of `params` (a relative folder is relative to the project `root`), or None when unset."""
        value = params.runtime.storage
        if value is None:
            return None
        if value.startswith("s3://"):
            return cls(value.rstrip("/"),
                       endpoint=os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"),
                       region=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"))
        folder = Path(value)
        return cls(str(folder if folder.is_absolute() else (Path(root) / folder).resolve()))

    @property
    def is_s3(self) -> bool:
        return self.uri.startswith("s3://")

    @property
    def filesystem(self):
        return _filesystem(self)

    @property
    def base(self) -> str:
        """The storage's root as the filesystem names it (bucket/prefix for S3)."""
        return self.uri[len("s3://"):] if self.is_s3 else self.uri

    def path(self, rel: str) -> str:
        return f"{self.base}/{rel}" if rel else self.base

    def describe(self, rel: str = "") -> str:
        """For messages: the URI of `rel` in the storage."""
        return f"{self.uri}/{rel}" if rel else self.uri

    # -- files

    def sizes(self, rel: str) -> dict[str, int]:
        """Every file under `rel`: its path relative to the storage -> size in bytes ({} when there is none)."""
        from pyarrow.fs import FileSelector, FileType

        infos = self.filesystem.get_file_info(FileSelector(self.path(rel), recursive=True, allow_not_found=True))
        start = len(self.base) + 1
        return {i.path[start:]: i.size for i in infos if i.type == FileType.File}

    def exists(self, rel: str) -> bool:
        from pyarrow.fs import FileType

        return self.filesystem.get_file_info(self.path(rel)).type == FileType.File

    def read_bytes(self, rel: str) -> bytes:
        with self.filesystem.open_input_stream(self.path(rel)) as f:
            return f.read()

    def write_bytes(self, rel: str, data: bytes) -> None:
        self._parent(rel)
        with self.filesystem.open_output_stream(self.path(rel)) as f:
            f.write(data)

    def upload(self, local: Path, rel: str) -> None:
        self._parent(rel)
        with open(local, "rb") as src, self.filesystem.open_output_stream(self.path(rel)) as dst:
            shutil.copyfileobj(src, dst, _CHUNK)

    def download(self, rel: str, local: Path) -> None:
        """`rel` to `local`, written under a temporary name and renamed (a reader never sees half a file)."""
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f".{local.name}.part-{os.getpid()}")
        with self.filesystem.open_input_stream(self.path(rel)) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, _CHUNK)
        os.replace(tmp, local)

    def delete(self, rel: str) -> None:
        self.filesystem.delete_file(self.path(rel))

    def delete_dir(self, rel: str) -> None:
        from pyarrow.fs import FileType

        if self.filesystem.get_file_info(self.path(rel)).type != FileType.NotFound:
            self.filesystem.delete_dir(self.path(rel))

    def _parent(self, rel: str) -> None:
        if not self.is_s3:  # object stores have no folders
            self.filesystem.create_dir(self.path(rel).rsplit("/", 1)[0], recursive=True)

    # -- the train stage's inputs

    def read_manifest(self) -> dict[str, str]:
        return json.loads(self.read_bytes(MANIFEST)) if self.exists(MANIFEST) else {}

    def upload_inputs(self, output_dir: Path) -> dict[str, int]:
        """Make the storage's caches equal the project's (`output_dir`'s INPUTS folders): upload the files whose
        sha256 or size differ from what is there, delete the ones the project no longer has, then write the
        manifest. Returns the counts {uploaded, kept, deleted}; a rerun on unchanged caches uploads nothing."""
        output_dir = Path(output_dir)
        local = {f"{name}/{p.relative_to(output_dir / name).as_posix()}": p
                 for name in INPUTS for p in _files_under(output_dir / name)}
        if not local:
            raise FileNotFoundError(f"runtime.storage: no cached inputs under {output_dir} ({', '.join(INPUTS)}); "
                                    "run the encode stages first")
        old = self.read_manifest()
        remote = {rel: size for name in INPUTS for rel, size in self.sizes(name).items()}
        manifest, uploaded = {}, 0
        for rel, path in sorted(local.items()):
            manifest[rel] = sha256_of(path)
            if old.get(rel) == manifest[rel] and remote.get(rel) == path.stat().st_size:
                continue
            self.upload(path, rel)
            uploaded += 1
        stale = sorted(set(remote) - set(local))
        for rel in stale:
            self.delete(rel)
        if manifest != old:
            self.write_bytes(MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())
        log.info("runtime.storage: train inputs in %s: %d files uploaded, %d already there, %d stale deleted",
                 self.uri, uploaded, len(local) - uploaded, len(stale))
        return {"uploaded": uploaded, "kept": len(local) - uploaded, "deleted": len(stale)}

    def download_inputs(self, output_dir: Path) -> int:
        """The manifest's files into `output_dir` (as in the project), each checked against its sha256; returns
        how many."""
        manifest = self.read_manifest()
        if not manifest:
            raise FileNotFoundError(f"runtime.storage: {self.describe(MANIFEST)} is missing: the driver uploads the "
                                    "train stage's inputs before the workers start")
        for rel, digest in manifest.items():
            target = Path(output_dir) / rel
            self.download(rel, target)
            if sha256_of(target) != digest:
                raise OSError(f"runtime.storage: {self.describe(rel)} does not match its sha256 in "
                              f"{self.describe(MANIFEST)}; re-run the train stage to upload it again")
        return len(manifest)

    # -- outputs

    def upload_tree(self, local: Path, rel: str) -> int:
        """Every file under `local` to `rel` (which is emptied first); returns how many."""
        self.delete_dir(rel)
        files = _files_under(local)
        for path in files:
            self.upload(path, f"{rel}/{path.relative_to(local).as_posix()}")
        return len(files)

    def download_tree(self, rel: str, local: Path) -> int:
        """Every file under `rel` into `local` (emptied first); returns how many."""
        files = self.sizes(rel)
        shutil.rmtree(local, ignore_errors=True)
        for path in files:
            self.download(path, local / path[len(rel) + 1:])
        return len(files)


@functools.lru_cache(maxsize=None)
def _filesystem(storage: SharedStorage):
    from pyarrow import fs

    if storage.is_s3:
        return fs.S3FileSystem(endpoint_override=storage.endpoint, region=storage.region)
    return fs.LocalFileSystem()


class CheckpointMirror:
    """The recipe's checkpoints folder mirrored in `<storage>/checkpoints/`: `push` after every save (main
    process), `pull` before resuming (every process). The files are the recipe's own (train/checkpoint.py)."""

    def __init__(self, storage: SharedStorage):
        self.storage = storage

    def _remote(self) -> dict[str, dict[str, int]]:
        """Remote checkpoint folder name -> {file name: size}."""
        folders: dict[str, dict[str, int]] = {}
        for rel, size in self.storage.sizes(CHECKPOINTS).items():
            parts = rel.split("/")
            if len(parts) == 3:
                folders.setdefault(parts[1], {})[parts[2]] = size
        return folders

    def push(self, folder: Path) -> int:
        """Upload the complete checkpoints of `folder` that the storage lacks (or holds in another version: their
        state.json differs), then delete the storage's checkpoints `folder` no longer has (checkpoints_total_limit,
        another run's). Returns how many were uploaded."""
        from .train.checkpoint import list_checkpoints

        local = {c.path.name: c.path for c in list_checkpoints(folder)}
        remote, uploaded = self._remote(), 0
        for name, path in sorted(local.items()):
            state_rel = f"{CHECKPOINTS}/{name}/state.json"
            if "state.json" in remote.get(name, {}) and \
                    self.storage.read_bytes(state_rel) == (path / "state.json").read_bytes():
                continue
            if "state.json" in remote.get(name, {}):
                self.storage.delete(state_rel)  # incomplete while its other files are replaced
            for file in CHECKPOINT_FILES:
                self.storage.upload(path / file, f"{CHECKPOINTS}/{name}/{file}")
            uploaded += 1
        for name in sorted(set(remote) - set(local)):
            self.storage.delete_dir(f"{CHECKPOINTS}/{name}")
        return uploaded

    def pull(self, folder: Path) -> int:
        """Download the storage's complete checkpoints into `folder` (each one whole, under a temporary name, then
        renamed, as save_checkpoint writes them); those already there with the same state.json are kept. Returns
        how many were downloaded."""
        from .train.checkpoint import PREFIX

        pulled = 0
        for name, files in sorted(self._remote().items()):
            if not name.startswith(PREFIX) or not all(f in files for f in CHECKPOINT_FILES):
                continue  # incomplete: an upload cut short
            target = folder / name
            state = self.storage.read_bytes(f"{CHECKPOINTS}/{name}/state.json")
            if (target / "state.json").is_file() and (target / "state.json").read_bytes() == state:
                continue
            tmp = folder / f".tmp-{name}-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            for file in CHECKPOINT_FILES:
                self.storage.download(f"{CHECKPOINTS}/{name}/{file}", tmp / file)
            shutil.rmtree(target, ignore_errors=True)
            os.replace(tmp, target)
            pulled += 1
        if pulled:
            log.info("runtime.storage: %d checkpoints pulled from %s", pulled, self.storage.describe(CHECKPOINTS))
        return pulled


@dataclass(frozen=True)
class StagedLayout(Layout):
    """A worker's layout with runtime.storage: the train stage's inputs, checkpoints, outputs and bookkeeping in
    the node-local `staging` folder; everything else (prepare's report, prompt embeddings, fault markers) where the
    project's layout has it."""

    staging: Path

    @property
    def state_dir(self) -> Path:
        return self.staging / "state"

    @property
    def latents_dir(self) -> Path:
        return self.staging / "latents"

    @property
    def text_embeds_dir(self) -> Path:
        return self.staging / "text_embeds"

    @property
    def checkpoints_dir(self) -> Path:
        return self.staging / CHECKPOINTS

    @property
    def lora_dir(self) -> Path:
        return self.staging / "lora"

    @property
    def train_dir(self) -> Path:
        return self.staging / "train"


def staged_layout(layout: Layout, staging: Path) -> StagedLayout:
    return StagedLayout(layout.output_dir, staging=staging)


def output_dirs(layout: Layout) -> dict[str, Path]:
    """The train stage's outputs (dvc.yaml: lora/, train/mlflow_run.json and train/metrics.json) by their name
    under `<storage>/outputs/`."""
    return {"lora": layout.lora_dir, "train": layout.train_dir}

