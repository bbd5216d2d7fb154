"""Real servers on loopback for end-to-end tests: a Prefect API server, a Prefect process worker, and the generic
pieces (free ports, background processes with logs in files, bounded readiness waits) to add others (MLflow).

Every process starts in its own session (process group) and the whole group is terminated on exit, also when the
test fails; every wait is bounded and, on timeout, raises with the tail of the process's log.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from helpers import VENV_BIN, project_env

LOOPBACK = "127.0.0.1"


class ServerError(RuntimeError):
    """A background process did not come up (or died); the message carries its log tail."""


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that was free a moment ago (the OS picks it; a tiny race remains, hence retries in callers)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def log_tail(path: Path, chars: int = 6000) -> str:
    """The last `chars` characters of a log file ("" when it does not exist)."""
    try:
        return Path(path).read_text(errors="replace")[-chars:]
    except FileNotFoundError:
        return ""


class Background:
    """A process started by `background()`: the Popen, its log file, and helpers to wait on it."""

    def __init__(self, name: str, proc: subprocess.Popen, log: Path):
        self.name, self.proc, self.log = name, proc, log

    def tail(self, chars: int = 6000) -> str:
        return log_tail(self.log, chars)

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise ServerError(f"{self.name} exited with code {self.proc.returncode}; log {self.log}:\n{self.tail()}")

    def wait_until(self, ready: Callable[[], bool], timeout: float, what: str, interval: float = 0.5) -> None:
        """Poll `ready()` until it is true; raise with the log tail if the process dies or `timeout` passes."""
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            try:
                if ready():
                    return
            except Exception:  # not up yet
                pass
            if time.monotonic() > deadline:
                raise ServerError(f"{self.name}: {what} not reached within {timeout:.0f}s; log {self.log}:\n"
                                  f"{self.tail()}")
            time.sleep(interval)


def _descendants(pid: int) -> list:
    """The process's descendants (psutil.Process objects; [] when psutil is missing or the process is gone)."""
    try:
        import psutil

        return psutil.Process(pid).children(recursive=True)
    except Exception:
        return []


def _stop(proc: subprocess.Popen, first: int, grace: float) -> None:
    """Signal the process group with `first`, then SIGTERM, then SIGKILL, each bounded by `grace` seconds; then end
    descendants that left the group (Prefect starts flow-run processes in sessions of their own)."""
    children = {p.pid: p for p in _descendants(proc.pid)}
    for sig in (first, signal.SIGTERM, signal.SIGKILL):
        if proc.poll() is not None:
            break
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        children.update({p.pid: p for p in _descendants(proc.pid)})
        try:
            proc.wait(timeout=grace)
            break
        except subprocess.TimeoutExpired:
            continue
    # whatever the leader left behind in its group (uvicorn workers, ...)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if proc.poll() is None:
        proc.wait(timeout=10)
    if children:
        from flux2lora.services import terminate_then_kill

        terminate_then_kill(list(children.values()), min(grace, 10))


@contextmanager
def background(name: str, cmd: list[str], cwd: Path, env: dict, log: Path, stop_signal: int = signal.SIGTERM,
               grace: float = 20) -> Iterator[Background]:
    """Run `cmd` in its own process group with stdout+stderr in `log`; stop the whole group on exit."""
    log = Path(log)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab", buffering=0) as out:
        out.write(f"$ {' '.join(map(str, cmd))}   (cwd {cwd})\n".encode())
        proc = subprocess.Popen([str(c) for c in cmd], cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        yield Background(name, proc, log)
    finally:
        _stop(proc, stop_signal, grace)


def http_ok(url: str, timeout: float = 2.0) -> bool:
    """True when GET `url` answers 2xx."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return 200 <= response.status < 300
    except (urllib.error.URLError, ConnectionError, OSError):
        return False


# What Prefect's own client retries (prefect.client.base.PrefectHttpxAsyncClient.send): its server answers 503 when
# SQLite is busy (prefect.server.api.server.is_client_retryable_exception), which happens on a 2-core machine under
# load while a worker and flow runs write to the same database; the failed transaction was rolled back, so the request
# can be sent again. CI saw one such 503 on a PATCH of a deployment.
RETRIED_STATUS = frozenset({408, 429, 502, 503})


def _json_request(request: urllib.request.Request | str, timeout: float, attempts: int = 6):
    """Send `request`; the decoded JSON answer. An answer in RETRIED_STATUS is retried with backoff (0.5 s, doubling,
    at most 8 s, or the server's Retry-After), like Prefect's client; the last one raises urllib.error.HTTPError."""
    for attempt in range(attempts):
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as error:
            if error.code not in RETRIED_STATUS or attempt == attempts - 1:
                raise
            retry_after = error.headers.get("Retry-After", "")
            time.sleep(float(retry_after) if retry_after.replace(".", "", 1).isdigit() else min(8.0, 0.5 * 2 ** attempt))


def api_post(api_url: str, path: str, body: dict | None = None, timeout: float = 10.0, method: str = "POST"):
    """POST (or `method`) JSON to a REST API (e.g. Prefect's `/work_pools/NAME/workers/filter`); returns the decoded
    answer (503 and the other RETRIED_STATUS answers are retried)."""
    request = urllib.request.Request(f"{api_url.rstrip('/')}/{path.lstrip('/')}",
                                     data=json.dumps(body or {}).encode(), method=method,
                                     headers={"Content-Type": "application/json"})
    return _json_request(request, timeout)


def api_get(api_url: str, path: str, timeout: float = 10.0):
    """GET from a REST API; returns the decoded JSON answer (RETRIED_STATUS answers are retried; other 4xx/5xx, and
    the last retry, raise urllib.error.HTTPError)."""
    return _json_request(f"{api_url.rstrip('/')}/{path.lstrip('/')}", timeout)


# --- Prefect ---------------------------------------------------------------------------------------------------

PREFECT = str(VENV_BIN / "prefect")


def prefect_env(home: Path, api_url: str | None = None, **extra) -> dict:
    """Environment for Prefect processes (server, worker, CLI, flow runs): the project env, an isolated
    PREFECT_HOME (no ~/.prefect profiles or database), no analytics, and PREFECT_API_URL when given."""
    home = Path(home)
    env = project_env(
        PREFECT_HOME=str(home),
        PREFECT_PROFILES_PATH=str(home / "profiles.toml"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_CLI_PROMPT="false",
        **extra,
    )
    # nothing from the caller's environment may point the processes at another server or profile
    for key in ("PREFECT_API_KEY", "PREFECT_PROFILE"):
        env.pop(key, None)
    if api_url:
        env["PREFECT_API_URL"] = api_url
    else:
        env.pop("PREFECT_API_URL", None)
    return env


@contextmanager
def prefect_server(home: Path, timeout: float = 180, attempts: int = 3, **extra_env) -> Iterator[str]:
    """`prefect server start` on 127.0.0.1 and a free port, with its own PREFECT_HOME and sqlite database in
    `home`; yields the API URL (http://127.0.0.1:PORT/api) once /api/health answers. Log: home/server.log."""
    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, attempts + 1):
        port = free_port()
        api_url = f"http://{LOOPBACK}:{port}/api"
        env = prefect_env(
            home, api_url,
            PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{home / 'prefect.db'}",
            PREFECT_SERVER_API_HOST=LOOPBACK,
            PREFECT_SERVER_API_PORT=str(port),
            PWD=str(home),
            **extra_env,
        )
        log = home / "server.log"
        with background("prefect server", [PREFECT, "server", "start", "--host", LOOPBACK, "--port", str(port)],
                        cwd=home, env=env, log=log, stop_signal=signal.SIGTERM) as server:
            try:
                server.wait_until(lambda: http_ok(f"{api_url}/health"), timeout, f"{api_url}/health")
            except ServerError:
                # lost the race for the port to another process: try another one
                if attempt < attempts and "address already in use" in server.tail().lower():
                    continue
                raise
            yield api_url
            return


@contextmanager
def prefect_worker(pool: str, api_url: str, cwd: Path, env: dict, log: Path | None = None, timeout: float = 120,
                   worker_type: str = "process") -> Iterator[Background]:
    """`prefect worker start --pool POOL --type process` in the background (log in `log`, default
    cwd/worker-POOL.log), ready once it has registered with the server; stopped with SIGINT (graceful), then its
    process group and the flow-run processes it started are terminated. `env`: e.g. prefect_env(home)."""
    log = Path(log) if log else Path(cwd) / f"worker-{pool}.log"
    # PWD as the worker's real directory: an inherited PWD (the test runner's, often the repository checkout) must
    # never be where a flow run ends up if a deployment's "{{ $PWD }}" is resolved at run time
    env = dict(env, PREFECT_API_URL=api_url, PWD=str(cwd))
    # pick scheduled runs up within 2 s (default 10 s); each poll is a write to the server's sqlite database, so
    # not every second
    env.setdefault("PREFECT_WORKER_QUERY_SECONDS", "2")
    name = f"test-worker-{os.getpid()}-{free_port()}"
    cmd = [PREFECT, "worker", "start", "--pool", pool, "--type", worker_type, "--name", name]
    with background("prefect worker", cmd, cwd=cwd, env=env, log=log, stop_signal=signal.SIGINT) as worker:

        def registered() -> bool:
            workers = api_post(api_url, f"work_pools/{pool}/workers/filter", {})
            return any(w.get("name") == name for w in workers or [])

        worker.wait_until(registered, timeout, f"worker {name} registered in pool {pool}", interval=1.0)
        yield worker


class PrefectAPI:
    """The few reads the tests need from Prefect's REST API, without importing prefect into the test process
    (importing it creates ~/.prefect and reads the user's profiles)."""

    def __init__(self, api_url: str):
        self.url = api_url

    def work_pool_exists(self, name: str) -> bool:
        try:
            api_get(self.url, f"work_pools/{name}")
            return True
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return False
            raise

    def flow_run(self, flow_run_id: str) -> dict:
        return api_get(self.url, f"flow_runs/{flow_run_id}")

    def task_runs(self, flow_run_id: str) -> list[dict]:
        return self._all("task_runs/filter",
                         {"flow_runs": {"id": {"any_": [flow_run_id]}}, "sort": "EXPECTED_START_TIME_ASC"})

    def logs(self, flow_run_id: str) -> list[dict]:
        return self._all("logs/filter",
                         {"logs": {"flow_run_id": {"any_": [flow_run_id]}}, "sort": "TIMESTAMP_ASC"})

    def _all(self, path: str, body: dict, page: int = 200) -> list[dict]:
        items: list[dict] = []
        while True:
            batch = api_post(self.url, path, dict(body, limit=page, offset=len(items)))
            items.extend(batch)
            if len(batch) < page:
                return items


# --- MLflow ----------------------------------------------------------------------------------------------------

MLFLOW = str(VENV_BIN / "mlflow")


@contextmanager
def mlflow_server(workdir: Path, backend_store_uri: str | None = None, artifacts_destination: str | None = None,
                  timeout: float = 120, attempts: int = 3, **extra_env) -> Iterator[str]:
    """`mlflow server` (one uvicorn worker) on 127.0.0.1 and a free port; yields its URL once /health answers.

    Store: `backend_store_uri` (default sqlite in `workdir`), artifacts proxied to `artifacts_destination` (default
    `workdir/mlartifacts`; s3://... with MLFLOW_S3_ENDPOINT_URL in `extra_env`). Log: workdir/mlflow.log."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    backend = backend_store_uri or f"sqlite:///{workdir / 'mlflow.db'}"
    artifacts = artifacts_destination or str(workdir / "mlartifacts")
    for attempt in range(1, attempts + 1):
        port = free_port()
        url = f"http://{LOOPBACK}:{port}"
        cmd = [MLFLOW, "server", "--host", LOOPBACK, "--port", str(port), "--workers", "1",
               "--backend-store-uri", backend, "--artifacts-destination", artifacts]
        with background("mlflow server", cmd, cwd=workdir, env=project_env(**extra_env),
                        log=workdir / "mlflow.log") as server:
            try:
                server.wait_until(lambda: http_ok(f"{url}/health"), timeout, f"{url}/health")
            except ServerError:
                if attempt < attempts and "address already in use" in server.tail().lower():
                    continue
                raise
            yield url
            return


# --- S3 (moto) -------------------------------------------------------------------------------------------------

# Credentials for clients of moto_server (boto3, dvc, mlflow): any value works. The environment comes first in
# boto's credential chain, so the machine's own ~/.aws is not used.
S3_TEST_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@contextmanager
def moto_server(buckets: tuple[str, ...] = ()) -> Iterator[str]:
    """An S3 API (moto's ThreadedMotoServer, in this process) on 127.0.0.1 and a free port, with `buckets`
    created; yields the endpoint URL. Subprocesses reach it over HTTP with S3_TEST_ENV in their environment."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address=LOOPBACK, port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    try:
        client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing",
                              aws_secret_access_key="testing", region_name="us-east-1")
        for bucket in buckets:
            client.create_bucket(Bucket=bucket)
        yield endpoint
    finally:
        try:  # moto's state is per process: leave no buckets behind for the next server
            urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST"), timeout=10)
        except (urllib.error.URLError, OSError):
            pass
        server.stop()


# --- Prefect flows in the test process -------------------------------------------------------------------------

@contextmanager
def prefect_in_process(home: Path, **extra_env) -> Iterator[str]:
    """A Prefect server (prefect_server) that flows and tasks called in this process report to; yields its API URL.

    For tests that call a flow function directly: faster than a deployment and a worker, and still a real server
    whose logs, states, artifacts and concurrency limits the test can read back. Imports prefect into the test
    process (its settings are pointed at `home` and the server for the duration)."""
    with prefect_server(home, **extra_env) as api_url:
        from prefect.logging.handlers import APILogWorker
        from prefect.settings import (PREFECT_API_URL, PREFECT_HOME, PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW,
                                      PREFECT_SERVER_ANALYTICS_ENABLED, temporary_settings)

        # tasks called outside a flow (to test one stage) log locally only, without a warning each time
        with temporary_settings(updates={PREFECT_API_URL: api_url, PREFECT_HOME: str(home),
                                         PREFECT_SERVER_ANALYTICS_ENABLED: False,
                                         PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW: "ignore"}):
            try:
                yield api_url
            finally:
                APILogWorker.drain_all(timeout=30)  # ship the last log batch while the server is up
