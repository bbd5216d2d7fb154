"""How every flux2lora task retries: three retries with exponential backoff (10, 20, 40 s, +-50% jitter), except
for errors a retry cannot fix.

A retried train task continues from its latest checkpoint (the train loop resumes from the newest checkpoint whose
fingerprint matches, and keeps the same MLflow run), so a retry costs the steps since that checkpoint.
"""

from __future__ import annotations

from prefect.tasks import exponential_backoff

from flux2lora.config import ParamsError
from flux2lora.errors import UserError

RETRIES = 3
BACKOFF_S = 10


def _permanent(exc: BaseException) -> bool:
    """Errors that end the same way on every attempt: invalid params, a loss that diverged (resuming from the
    last checkpoint would diverge again), params that fail validation, and every other permanent user error
    (a missing model folder, an absent device, a refused publish: flux2lora.errors)."""
    from pydantic import ValidationError

    from flux2lora.train.step import TrainingDiverged

    return isinstance(exc, (ParamsError, TrainingDiverged, ValidationError)) or \
        (isinstance(exc, UserError) and exc.permanent)


def retry_unless_permanent(task, task_run, state) -> bool:
    """Prefect `retry_condition_fn`: retry any failure except the permanent ones."""
    exc = state.data if isinstance(state.data, BaseException) else None
    return exc is None or not _permanent(exc)


# keyword arguments for @task
RETRY = dict(retries=RETRIES, retry_delay_seconds=exponential_backoff(backoff_factor=BACKOFF_S),
             retry_jitter_factor=0.5, retry_condition_fn=retry_unless_permanent)
