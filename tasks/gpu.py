"""One training per GPU: the stages that use the GPU hold a slot of a Prefect global concurrency limit.

The limit (`flux2lora-gpu`, limit 1) spans every flow run on the Prefect server, the `flux2-lora/train` and
`flux2-lora/nightly` deployments alike: a second run waits for the GPU instead of running out of memory beside the
first. A flow run takes the slot once, as soon as it knows a GPU stage must run, and keeps it until its last GPU stage
is done (`GpuReservation`); a stage task run on its own holds the slot while it runs (`gpu_slot`). A host with two GPUs
that should train twice at once: `prefect gcl update flux2lora-gpu --limit 2` (pin each worker to a GPU with
CUDA_VISIBLE_DEVICES). On Kubernetes each flow-run pod requests its own GPU and the scheduler
places it, so the pool's job template sets FLUX2LORA_GPU_LIMIT to "" (no limit) there.
"""

from __future__ import annotations

import os
import time
from contextlib import ExitStack, contextmanager
from typing import Iterator

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

from flux2lora.stages import MODEL_STAGES

GPU_STAGES = frozenset(MODEL_STAGES)  # the stages that load the base model
LIMIT_ENV = "FLUX2LORA_GPU_LIMIT"
DEFAULT_LIMIT = "flux2lora-gpu"


def gpu_limit_name() -> str | None:
    """The global concurrency limit GPU stages hold a slot of ($FLUX2LORA_GPU_LIMIT; empty: none)."""
    return os.environ.get(LIMIT_ENV, DEFAULT_LIMIT) or None


def ensure_gpu_limit(logger) -> str | None:
    """Create the limit with one slot when it does not exist yet; an existing limit is left as its owner set it."""
    name = gpu_limit_name()
    if name is None:
        return None
    with get_client(sync_client=True) as client:
        try:
            limit = client.read_global_concurrency_limit_by_name(name)
            logger.info("GPU stages share concurrency limit %s (%d slot(s))", name, limit.limit)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
                logger.info("created concurrency limit %s with 1 slot: one GPU stage at a time", name)
            except ObjectAlreadyExists:  # another flow run created it meanwhile
                pass
    return name


@contextmanager
def gpu_slot(stage: str, logger) -> Iterator[None]:
    """Hold a slot of the GPU limit while `stage` runs (stages that need no GPU run freely)."""
    name = gpu_limit_name()
    if stage not in GPU_STAGES or name is None:
        yield
        return
    started = time.monotonic()
    with concurrency(name, occupy=1):
        waited = time.monotonic() - started
        if waited > 1:
            logger.info("%s: waited %.0f s for the GPU (concurrency limit %s)", stage, waited, name)
        yield


class GpuReservation:
    """A flow run's slot of the GPU limit: taken once (`take`), kept until `release` (after the run's last GPU stage,
    or when the block ends), so the run's GPU stages follow each other without another run's in between.

    One acquisition per run rather than per stage also spares the run a wait that the local Prefect server (sqlite)
    imposes on acquisitions made while it records the previous task run's end: "retry later" (503), ~2 s each. The
    flow takes it before its first stage when a GPU stage must run. Take it in the flow, not in a task: Prefect
    releases whatever a task run still holds when the task run ends."""

    def __init__(self, logger):
        self._logger = logger
        self._slot = ExitStack()
        self.held = False

    def __enter__(self) -> "GpuReservation":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def take(self, stage: str) -> None:
        """Hold the slot from now on, waiting while another run has it (nothing to hold without a limit)."""
        if not self.held:
            self._slot.enter_context(gpu_slot(stage, self._logger))
            self.held = True

    def release(self) -> None:
        self._slot.close()
        self.held = False
