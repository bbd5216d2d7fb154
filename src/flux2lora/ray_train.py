"""The train stage as a Ray Train job (`runtime.engine: ray`): a `TorchTrainer` whose workers each run the train
stage's own recipe (`run_stage("train")`, accelerate inside), so a Ray run with N workers computes what an
N-process `accelerate launch` computes.

Ray sets up torch.distributed (gloo on CPU, NCCL on GPU) before the workers' function runs; accelerate finds the
process group and the RANK/WORLD_SIZE/LOCAL_RANK variables Ray sets and uses them. A worker that dies fails the
worker group; with `runtime.ray_max_failures` Ray starts the group again and the recipe resumes from the newest
checkpoint. Where the workers find the caches and keep the checkpoints is `runtime.storage`: null, the project
folder (which every node must then see); a shared folder or an S3 prefix, through `flux2lora.shared_storage`
(the driver uploads the caches, each worker trains from a node-local copy, checkpoints are mirrored there, and
the LoRA and train files come back into the project).

Ray is the optional extra `flux2lora[ray]`.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from pathlib import Path

from .config import Params
from .errors import UserError
from .layout import layout_for

EXTRA_HINT = "runtime.engine: ray needs Ray Train: pip install 'flux2lora[ray]'"


def require_ray():
    """The `ray` module, or a UserError naming the extra to install."""
    try:
        import ray
        import ray.train.torch  # noqa: F401
    except ImportError as e:
        raise UserError(f"{EXTRA_HINT} ({e})") from None
    return ray


def _pinned_address_and_port(master_addr: str) -> tuple[str, int]:
    """Runs on the rank-0 worker: `master_addr` and a free port there (bound on that address, so it is free on it)."""
    with socket.socket(socket.AF_INET6 if ":" in master_addr else socket.AF_INET) as s:
        s.bind((master_addr, 0))
        return master_addr, s.getsockname()[1]


def torch_config(master_addr: str | None):
    """Ray's TorchConfig; with `master_addr`, torch.distributed's rendezvous (MASTER_ADDR) is that address.

    Ray Train asks the rank-0 worker for its node's IP with a route lookup, which finds the default interface even
    when every node was started with --node-ip-address=127.0.0.1, and offers no setting for it; the backend here
    makes that one question answer `master_addr` instead, for the duration of Ray's own process-group setup."""
    from ray.train.torch import TorchConfig
    from ray.train.torch import config as ray_torch_config

    if master_addr is None:
        return TorchConfig()

    class PinnedMasterBackend(ray_torch_config._TorchBackend):
        def on_start(self, worker_group, backend_config):
            ask = ray_torch_config.get_address_and_port
            def pinned_address_and_port():  # shipped to the rank-0 worker, which runs it
                return _pinned_address_and_port(master_addr)

            ray_torch_config.get_address_and_port = pinned_address_and_port
            try:
                super().on_start(worker_group, backend_config)
            finally:
                ray_torch_config.get_address_and_port = ask

    class PinnedMasterTorchConfig(TorchConfig):
        @property
        def backend_cls(self):
            return PinnedMasterBackend

    return PinnedMasterTorchConfig()


def _train_worker(config: dict) -> None:
    """One Ray Train worker: the train stage's recipe, as one of `accelerate launch`'s processes would run it.

    `config`: the driver's `params` (validated, so workers need no params file), the project `root` and the
    runtime.storage (`SharedStorage`, or None: the project folder)."""
    from .stages import STAGES
    from .models import model_errors

    params, root, storage = config["params"], Path(config["root"]), config["storage"]
    with model_errors(params.model):  # the driver healed the caches; the workers only read them
        if storage is None:
            STAGES["train"](params, root)
        else:
            _train_from_storage(params, root, storage)


def _train_from_storage(params: Params, root: Path, storage) -> None:
    """The recipe in a node-local staging folder: the caches downloaded from `storage`, checkpoints mirrored to
    it, and (rank 0) the LoRA and train files uploaded to `<storage>/outputs/` for the driver."""
    import hashlib
    import logging
    import shutil
    import tempfile

    from . import shared_storage
    from .tracking import describe_training_run
    from .train.recipe import train

    rank = int(os.environ.get("RANK", "0"))  # set by Ray Train for torch workers
    # one folder per storage and rank, emptied first: a restarted worker (or one SIGKILLed before its cleanup)
    # leaves nothing behind for the next attempt on this node
    key = hashlib.sha256(storage.uri.encode()).hexdigest()[:12]
    staging = Path(tempfile.gettempdir()) / "flux2lora-staging" / f"{key}-rank{rank}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        files = storage.download_inputs(staging)
        logging.getLogger(__name__).info("ray worker %d: %d train input files from %s", rank, files, storage.uri)
        layout = shared_storage.staged_layout(layout_for(root, params.output_dir), staging)
        summary = train(params, root, layout=layout, checkpoint_mirror=shared_storage.CheckpointMirror(storage))
        describe_training_run(params, root, summary)
        if rank == 0:
            for name, folder in shared_storage.output_dirs(layout).items():
                storage.upload_tree(folder, f"{shared_storage.OUTPUTS}/{name}")
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def ray_storage(root: Path, storage) -> tuple[str, object]:
    """Ray Train's run storage (RunConfig's storage_path, storage_filesystem): `<storage>/ray_runs` with
    runtime.storage, else <project>/.ray_runs."""
    if storage is None:
        return str(root / ".ray_runs"), None
    from .shared_storage import RAY_RUNS

    return storage.path(RAY_RUNS), storage.filesystem


def scaling_config(params: Params):
    """runtime.num_processes workers, one GPU each when the model trains on CUDA, else one CPU each."""
    from ray.train import ScalingConfig

    use_gpu = str(params.model.device).startswith("cuda")
    return ScalingConfig(num_workers=params.runtime.num_processes, use_gpu=use_gpu,
                         resources_per_worker={"GPU": 1} if use_gpu else {"CPU": 1})


def train_on_ray(root: Path, params: Params, logger, params_file: str = "params.yaml") -> dict:
    """Train as a Ray Train job on the cluster at runtime.ray_address; returns the stage's summary (metrics).

    The driver (this process) heals the caches once, connects, runs the job and reads the metrics rank 0 wrote.
    The workers get `params` itself (not `params_file`): with runtime.storage they need no project folder for it.
    With a Jobs API address (http://head:8265) the stage is submitted as a Ray job instead (flux2lora.ray_jobs)."""
    from .ray_jobs import submit_train_job, submits_job

    if submits_job(params):
        return submit_train_job(root, params, logger, params_file)
    ray = require_ray()
    from .models import model_errors
    from .stages import heal_caches

    root = Path(root).resolve()
    with model_errors(params.model):
        heal_caches("train", params, root)
    layout = layout_for(root, params.output_dir)
    with _storage_for_job(root, params, layout, logger) as storage:
        _run_trainer(ray, root, params, storage, logger)
    metrics = json.loads(layout.train_metrics.read_text())
    run = json.loads(layout.run_file.read_text())
    return {**metrics, "lora_file": str(layout.lora_file), "mlflow_run_id": run["run_id"]}


@contextlib.contextmanager
def _storage_for_job(root: Path, params: Params, layout, logger):
    """runtime.storage for one job (None when unset): before it, the caches uploaded and the last job's outputs
    cleared; after it, the outputs downloaded into the project. The project's training lock is held throughout
    (with a storage no worker holds it: their bookkeeping is node-local)."""
    from . import shared_storage
    from .train.recipe import TrainingLock

    storage = shared_storage.SharedStorage.from_params(params, root)
    if storage is None:
        yield None
        return
    with TrainingLock(layout.state_dir / "training.lock"):
        counts = storage.upload_inputs(layout.output_dir)
        logger.info("ray: train inputs in %s (%d uploaded, %d already there)", storage.uri, counts["uploaded"],
                    counts["kept"])
        storage.delete_dir(shared_storage.OUTPUTS)
        yield storage
        for name, folder in shared_storage.output_dirs(layout).items():
            if not storage.download_tree(f"{shared_storage.OUTPUTS}/{name}", folder):
                raise RuntimeError(f"ray: the job ended without {storage.describe(shared_storage.OUTPUTS)}/{name}")


def _run_trainer(ray, root: Path, params: Params, storage, logger) -> None:
    """Connect (or start a local cluster), run the TorchTrainer to its end, disconnect."""
    from ray.train import FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from .ray_jobs import inside_submitted_job

    runtime = params.runtime
    started_here = not ray.is_initialized()
    if started_here:
        # the workers see the driver's FLUX2LORA_* settings (progress interval, fault injection); their output is
        # streamed to this driver's console
        env = {k: v for k, v in os.environ.items() if k.startswith("FLUX2LORA_")}
        # inside a submitted job: the job's own cluster (Ray sets RAY_ADDRESS for the job's driver)
        address = None if inside_submitted_job() else runtime.ray_address
        # (a submitted job's runtime env already carries them to all its workers, and Ray refuses to merge the two)
        ray.init(address=address, log_to_driver=True,
                 runtime_env={"env_vars": env} if env and not inside_submitted_job() else None)
    try:
        logger.info("ray: training on %d workers of %s", runtime.num_processes,
                    runtime.ray_address or os.environ.get("RAY_ADDRESS") or "a local cluster")
        storage_path, storage_filesystem = ray_storage(root, storage)
        trainer = TorchTrainer(
            _train_worker, train_loop_config={"params": params, "root": str(root), "storage": storage},
            torch_config=torch_config(runtime.ray_master_addr), scaling_config=scaling_config(params),
            run_config=RunConfig(name="flux2lora-train", storage_path=storage_path,
                                 storage_filesystem=storage_filesystem,
                                 failure_config=FailureConfig(max_failures=runtime.ray_max_failures)))
        trainer.fit()
    finally:
        if started_here:
            ray.shutdown()
