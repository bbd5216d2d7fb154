"""The train stage submitted as a Ray job (`runtime.engine: ray` with `runtime.ray_address` a Jobs API URL,
http(s)://head:8265, the address `ray job submit` takes): the flow's train task, `flux2lora stage train` and
`dvc repro` send the stage to the cluster with `ray.job_submission.JobSubmissionClient`, stream the job's output
into their logger (the Prefect task log, or the console), wait for it to end, and return the summary the stage
returns when it runs here, so dvc.lock records the stage and the flow goes on to validate and publish.

The job runs `flux2lora stage train` in the project folder on the cluster: the project must be a folder every node
sees (one machine, or a shared volume on Kubernetes), at `runtime.ray_project_dir` when the cluster mounts it at
another path than this machine does. It is not uploaded (`runtime_env.working_dir` would train in a copy the job
throws away: the LoRA, checkpoints, metrics and MLflow store must land in the project). Inside the job the stage
runs engine ray as usual, connecting to the job's own cluster (Ray sets RAY_ADDRESS for the job's driver).

Secrets stay out of the job: its entrypoint and runtime env are shown by the dashboard and `ray job list`, so only
FLUX2LORA_* settings travel in the runtime env; the cluster's nodes bring their own credentials (the
`flux2lora-credentials` secret in infra/k8s/raycluster.yaml).
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import queue
import threading
import uuid
from collections import deque
from pathlib import Path

from .config import Params
from .errors import UserError
from .layout import layout_for

JOBS_SCHEMES = ("http://", "https://")
# set in the submitted job's environment: the stage there trains on the job's cluster instead of submitting again
INSIDE_JOB_ENV = "FLUX2LORA_RAY_JOB"
POLL_SECONDS = 1.0
USER_ERROR_EXIT_CODE = 2  # the command line's exit code for a UserError (cli.py)


class RayJobFailed(UserError):
    """The submitted Ray job failed or was stopped; the message has the job id, Ray's reason and the job's last
    lines. A failed job is retried by the Prefect task (the retry resumes from the newest checkpoint), unless it was
    stopped on purpose or ended with a user error (exit code 2), which a retry would meet again."""

    def __init__(self, message: str, permanent: bool):
        super().__init__(message)
        self.permanent = permanent


def is_jobs_address(address: str | None) -> bool:
    """Whether `address` is a Ray Jobs API (dashboard) URL rather than a cluster (GCS / Ray Client) address."""
    return bool(address) and address.lower().startswith(JOBS_SCHEMES)


def inside_submitted_job() -> bool:
    """Whether this process is the train stage of a job submitted by `submit_train_job`."""
    return bool(os.environ.get(INSIDE_JOB_ENV))


def submits_job(params: Params) -> bool:
    """engine ray with a Jobs API address, outside the submitted job itself: the stage is submitted as a Ray job."""
    runtime = params.runtime
    return runtime.engine == "ray" and is_jobs_address(runtime.ray_address) and not inside_submitted_job()


def cluster_project_dir(root: Path, params: Params) -> str:
    """The project folder as the cluster's nodes see it: runtime.ray_project_dir, else this machine's path."""
    return params.runtime.ray_project_dir or str(root)


def job_entrypoint(root: Path, params: Params, params_file: str = "params.yaml") -> str:
    """The job's shell command: the train stage in the project folder on the cluster (no secrets: Ray shows it)."""
    return (f"cd {shlex.quote(cluster_project_dir(root, params))} && "
            f"flux2lora stage train --params {shlex.quote(params_file)}")


def job_env() -> dict[str, str]:
    """The job's environment additions: the marker and this process's FLUX2LORA_* settings (progress interval,
    fault injection, debug), never credentials."""
    env = {k: v for k, v in os.environ.items() if k.startswith("FLUX2LORA_") and k != INSIDE_JOB_ENV}
    return {**env, INSIDE_JOB_ENV: "1", "TQDM_MININTERVAL": "30", "PYTHONUNBUFFERED": "1"}


def _jobs_client(address: str):
    from .ray_train import require_ray

    require_ray()
    try:
        from ray.job_submission import JobSubmissionClient
    except ImportError as e:  # ray without its dashboard client (ray[default])
        raise UserError(f"runtime.ray_address {address} is a Ray Jobs API; submitting needs "
                        f"pip install 'flux2lora[ray]' ({e})") from None
    try:
        return JobSubmissionClient(address)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise UserError(f"runtime.ray_address: no Ray Jobs API answers at {address} ({e}); start the cluster's "
                        f"head with its dashboard (ray start --head --dashboard-host=...) or fix the address"
                        ) from None


class _LogTail:
    """The job's output, followed in a thread of its own (tail_job_logs is async) and handed as lines to the waiting
    thread, which logs them: a Prefect run logger belongs to its task's thread and context. The last `keep` lines
    are kept for an error message."""

    def __init__(self, client, job_id: str, logger, keep: int = 40):
        self.client, self.job_id, self.logger = client, job_id, logger
        self.tail: deque[str] = deque(maxlen=keep)
        self.error: BaseException | None = None
        self._lines: queue.Queue[str] = queue.Queue()
        self._thread = threading.Thread(target=self._follow, name=f"ray-job-logs-{job_id}", daemon=True)

    def start(self) -> "_LogTail":
        self._thread.start()
        return self

    def log_lines(self, wait: float) -> None:
        """Log the lines that arrived, waiting up to `wait` seconds for the first one."""
        try:
            line = self._lines.get(timeout=wait)
            while True:
                self.tail.append(line)
                self.logger.info("%s", line)
                line = self._lines.get_nowait()
        except queue.Empty:
            pass

    def finish(self, timeout: float = 30) -> None:
        """Wait for the stream to close (it does once the job ended) and log what is left."""
        self._thread.join(timeout)
        self.log_lines(wait=0)

    def _follow(self) -> None:
        partial = ""

        async def follow():
            nonlocal partial
            async for chunk in self.client.tail_job_logs(self.job_id):
                # chunks are not lines; tqdm's carriage-return redraws count as lines
                *lines, partial = (partial + chunk.replace("\r", "\n")).split("\n")
                for line in filter(None, (line.rstrip() for line in lines)):
                    self._lines.put(line)

        try:
            asyncio.run(follow())
        except Exception as e:  # the log stream broke; the status poll still decides how the job ended
            self.error = e
        if partial.strip():
            self._lines.put(partial.rstrip())


def submit_train_job(root: Path, params: Params, logger, params_file: str = "params.yaml") -> dict:
    """Submit the train stage as a Ray job to runtime.ray_address, log its output line by line, wait for it to end,
    and return the stage's summary (the metrics rank 0 wrote into the project, as a local run returns them).

    RayJobFailed (with the job id and its last lines) when the job fails or is stopped. An interrupt here
    (Ctrl-C, Prefect cancelling the run, SIGTERM turned into an exception) stops the job before it propagates."""
    from ray.job_submission import JobStatus

    root = Path(root).resolve()
    address = params.runtime.ray_address
    client = _jobs_client(address)
    submission_id = f"flux2lora-train-{uuid.uuid4().hex[:12]}"
    entrypoint = job_entrypoint(root, params, params_file)
    job_id = client.submit_job(entrypoint=entrypoint, submission_id=submission_id,
                               runtime_env={"env_vars": job_env()},
                               metadata={"flux2lora_stage": "train", "project": root.name})
    logger.info("ray: submitted the train stage as job %s to %s: %s", job_id, address, entrypoint)
    logs = _LogTail(client, job_id, logger).start()
    try:
        while not (status := client.get_job_status(job_id)).is_terminal():
            logs.log_lines(wait=POLL_SECONDS)
    except BaseException:
        logger.warning("ray: interrupted, stopping job %s", job_id)
        try:
            client.stop_job(job_id)
        except Exception:
            logger.warning("ray: could not stop job %s; stop it with `ray job stop --address %s %s`",
                           job_id, address, job_id, exc_info=True)
        raise
    logs.finish()
    if logs.error is not None:
        logger.warning("ray: the log stream of job %s broke (%s); its logs: ray job logs --address %s %s",
                       job_id, logs.error, address, job_id)
    if status != JobStatus.SUCCEEDED:
        info = client.get_job_info(job_id)
        reason = (info.message or "").split("\n")[0]  # Ray appends the job's logs, which the tail has already
        # stopped on purpose, or `flux2lora stage train` exited with the code of a UserError (a missing model, bad
        # params, a missing project folder: the shell's cd, too): every retry would end the same way
        permanent = status == JobStatus.STOPPED or info.driver_exit_code == USER_ERROR_EXIT_CODE
        raise RayJobFailed(f"ray job {job_id} at {address} {status.value.lower()}: {reason}\nlast lines:\n"
                           + "\n".join(logs.tail), permanent=permanent)
    logger.info("ray: job %s succeeded", job_id)
    layout = layout_for(root, params.output_dir)
    metrics = json.loads(layout.train_metrics.read_text())
    run = json.loads(layout.run_file.read_text())
    return {**metrics, "lora_file": str(layout.lora_file), "mlflow_run_id": run["run_id"], "ray_job_id": job_id}
