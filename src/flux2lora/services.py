"""Local services for a project: a Prefect server, a Prefect process worker and an MLflow tracking server on
loopback, each a background process whose pid, port and log live under `.services/` in the project.

`flux2lora services up` starts them and waits until each answers its health check, `status` reports them,
`down` stops them (worker first, with the flow runs it started). The processes are the `prefect` and `mlflow`
command-line programs of this environment; this module imports neither.

    .services/state.json      what runs: pid, port, URL, log, command of each service
    .services/env             `export PREFECT_API_URL=...` / `export MLFLOW_TRACKING_URI=...`, to `source`
    .services/logs/*.log      each service's stdout and stderr
    .services/prefect/        the Prefect server's home and sqlite database

MLflow's store is the project's own (`sqlite:///<project>/mlflow.db`, artifacts in `<project>/mlartifacts`), the
same one training logs to without a server, so the UI shows every run of the project. Artifacts of experiments
created through the server can go to S3 or MinIO instead (`mlflow_artifacts="s3://bucket/prefix"`).
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .io import write_json_atomic, write_text_atomic

log = logging.getLogger(__name__)

STATE_DIR = ".services"
LOOPBACK = "127.0.0.1"
PREFECT_PORT = 4200
MLFLOW_PORT = 5000
WORK_POOL = "flux2lora-local"  # prefect.yaml's work pool
PREFECT_SERVER, WORKER, MLFLOW = "prefect-server", "prefect-worker", "mlflow"
# started in this order and stopped in reverse: the worker goes first, so no flow run starts while servers go away
ORDER = (MLFLOW, PREFECT_SERVER, WORKER)
GROUPS = {"prefect": (PREFECT_SERVER, WORKER), "mlflow": (MLFLOW,)}


# MLflow 3's server starts a job runner and huey consumers (GenAI judges, trace rollups, scheduled jobs) beside its
# web workers unless told not to; a tracking server for training runs uses none of them, and they are most of its
# processes and memory (bench/services_mlflow.py; bench/RESULTS.md). A value the user exported is kept.
MLFLOW_LEAN_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


class ServicesError(RuntimeError):
    """A service did not start, is not healthy, or a port is taken; the message says which and shows its log."""


@dataclass
class ServiceSettings:
    """What `up` starts and where. Port 0: a free port picked by the OS."""

    host: str = LOOPBACK
    prefect_port: int = PREFECT_PORT
    mlflow_port: int = MLFLOW_PORT
    work_pool: str = WORK_POOL
    mlflow_backend_store_uri: str | None = None  # None: sqlite:///<project>/mlflow.db
    mlflow_artifacts: str | None = None  # None: <project>/mlartifacts ; or s3://bucket/prefix
    s3_endpoint_url: str | None = None  # MinIO or another S3-compatible store (MLFLOW_S3_ENDPOINT_URL)
    only: tuple[str, ...] = ("prefect", "mlflow")  # "prefect" (server + worker) and/or "mlflow"
    timeout: float = 180  # seconds to wait for each service's health check


@dataclass
class Service:
    """One background process as recorded in state.json."""

    name: str
    pid: int
    create_time: float  # the process's start time: a recycled pid is not mistaken for ours
    url: str
    health_url: str
    log: str
    cmd: list[str]
    port: int | None = None
    extra: dict = field(default_factory=dict)


@dataclass
class ServiceStatus:
    name: str
    pid: int
    running: bool
    healthy: bool
    url: str
    log: str


def state_dir(root: Path, folder: str | Path = STATE_DIR) -> Path:
    return (Path(root) / folder).resolve()


# --- processes -------------------------------------------------------------------------------------------------


def _program(name: str) -> str:
    """`prefect` / `mlflow` of this environment: beside the running Python first, then on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if not found:
        raise ServicesError(f"`{name}` is not installed in this environment (pip install -e .)")
    return found


def _process(service: Service):
    """The live psutil.Process of a recorded service, or None when it has exited (or its pid was reused)."""
    import psutil

    try:
        proc = psutil.Process(service.pid)
        if abs(proc.create_time() - service.create_time) > 1.0 or proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc
    except psutil.Error:
        return None


def _spawn(name: str, cmd: list[str], cwd: Path, env: dict, log_file: Path) -> tuple[int, float]:
    """Start `cmd` detached (own session, so it outlives the CLI and its group can be signalled) with stdout and
    stderr appended to `log_file`; returns (pid, start time)."""
    import psutil

    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "ab", buffering=0) as out:
        out.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {name}: {shlex.join(cmd)}\n".encode())
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    return proc.pid, psutil.Process(proc.pid).create_time()


def _stop_process(service: Service, grace: float) -> bool:
    """Stop a service's process group and every descendant (Prefect starts flow runs in sessions of their own):
    SIGINT for the worker (its graceful shutdown), SIGTERM for the servers, SIGKILL after `grace` seconds.
    Returns False when it was not running."""
    import psutil

    proc = _process(service)
    if proc is None:
        return False
    family = [proc, *proc.children(recursive=True)]
    first = signal.SIGINT if service.name == WORKER else signal.SIGTERM
    for sig in (first, signal.SIGTERM):
        try:
            os.killpg(service.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        family += [p for p in _children(proc) if p not in family]
        _, alive = psutil.wait_procs([proc], timeout=grace)
        if not alive:
            break
    # flow runs and server workers outside the group, and anything that ignored the signals
    terminate_then_kill(family, min(grace, 10))
    return True


def terminate_then_kill(processes: list, grace: float) -> None:
    """SIGTERM every psutil process still running, SIGKILL those alive after `grace` seconds."""
    import psutil

    for p in processes:
        try:
            if p.is_running():
                p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(processes, timeout=grace)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)


def _children(proc) -> list:
    import psutil

    try:
        return proc.children(recursive=True)
    except psutil.Error:
        return []


# --- health checks ---------------------------------------------------------------------------------------------


def _http(url: str, body: dict | None = None, timeout: float = 3.0):
    """GET (or POST JSON `body`) `url`; the decoded JSON answer, or the text when it is not JSON."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        text = response.read().decode(errors="replace")
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _healthy(service: Service) -> bool:
    try:
        if service.name == WORKER:
            # the server lists it ONLINE (its name carries the pid of the `up` that started it: no stale record)
            workers = _http(service.health_url, body={})
            return any(w.get("name") == service.extra["worker_name"] and w.get("status") == "ONLINE"
                       for w in workers or [])
        _http(service.health_url)
        return True
    except (urllib.error.URLError, ConnectionError, OSError, ValueError):
        return False


def _log_tail(path: str | Path, chars: int = 4000) -> str:
    try:
        return Path(path).read_text(errors="replace")[-chars:]
    except FileNotFoundError:
        return ""


def _wait_healthy(service: Service, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not _healthy(service):
        if _process(service) is None:
            raise ServicesError(f"{service.name} exited while starting; log {service.log}:\n{_log_tail(service.log)}")
        if time.monotonic() > deadline:
            raise ServicesError(f"{service.name} not healthy within {timeout:.0f}s ({service.health_url}); "
                                f"log {service.log}:\n{_log_tail(service.log)}")
        time.sleep(0.5)


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _claim_port(host: str, port: int, flag: str) -> int:
    """`port`, or a free one when 0; a port something else listens on is an error that says what to do."""
    if port == 0:
        return _free_port(host)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            raise ServicesError(f"port {port} on {host} is in use; stop what listens there or pass {flag} 0 "
                                "for a free port") from None
    return port


# --- state -----------------------------------------------------------------------------------------------------


def read_state(folder: Path) -> dict[str, Service]:
    path = Path(folder) / "state.json"
    if not path.exists():
        return {}
    raw = json.loads(path.read_text())
    return {name: Service(**entry) for name, entry in raw.get("services", {}).items()}


def _write_state(folder: Path, root: Path, services: dict[str, Service]) -> None:
    write_json_atomic(folder / "state.json", {"project": str(root), "services": {
        name: asdict(s) for name, s in services.items()}})


def env_exports(services: dict[str, Service]) -> dict[str, str]:
    """The environment variables that point clients at the services: PREFECT_API_URL, MLFLOW_TRACKING_URI."""
    env = {}
    if PREFECT_SERVER in services:
        env["PREFECT_API_URL"] = services[PREFECT_SERVER].extra["api_url"]
    if MLFLOW in services:
        env["MLFLOW_TRACKING_URI"] = services[MLFLOW].url
    return env


def _write_env_file(folder: Path, services: dict[str, Service]) -> None:
    lines = [f"export {k}={shlex.quote(v)}" for k, v in env_exports(services).items()]
    write_text_atomic(folder / "env", "# source this file: points prefect and mlflow clients at the services\n"
                      + "\n".join(lines) + "\n")


# --- up / status / down ----------------------------------------------------------------------------------------


def _base_env(folder: Path) -> dict:
    env = dict(os.environ)
    env.update(PREFECT_HOME=str(folder / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_CLI_PROMPT="false")
    # the caller's profile must not point the processes at another server
    for key in ("PREFECT_PROFILE", "PREFECT_API_KEY", "PREFECT_API_URL"):
        env.pop(key, None)
    return env


def _start_mlflow(root: Path, folder: Path, settings: ServiceSettings, env: dict) -> Service:
    port = _claim_port(settings.host, settings.mlflow_port, "--mlflow-port")
    url = f"http://{settings.host}:{port}"
    backend = settings.mlflow_backend_store_uri or f"sqlite:///{root / 'mlflow.db'}"
    artifacts = settings.mlflow_artifacts or str(root / "mlartifacts")
    env = {**MLFLOW_LEAN_ENV, **env}
    if settings.s3_endpoint_url:
        env["MLFLOW_S3_ENDPOINT_URL"] = settings.s3_endpoint_url
    cmd = [_program("mlflow"), "server", "--host", settings.host, "--port", str(port),
           "--backend-store-uri", backend, "--artifacts-destination", artifacts, "--workers", "1"]
    log_file = folder / "logs" / "mlflow.log"
    pid, created = _spawn(MLFLOW, cmd, root, env, log_file)
    return Service(MLFLOW, pid, created, url, f"{url}/health", str(log_file), cmd, port,
                   {"backend_store_uri": backend, "artifacts_destination": artifacts})


def _start_prefect_server(root: Path, folder: Path, settings: ServiceSettings, env: dict) -> Service:
    port = _claim_port(settings.host, settings.prefect_port, "--prefect-port")
    url = f"http://{settings.host}:{port}"
    home = folder / "prefect"
    home.mkdir(parents=True, exist_ok=True)
    env = dict(env, PREFECT_API_URL=f"{url}/api", PREFECT_SERVER_API_HOST=settings.host,
               PREFECT_SERVER_API_PORT=str(port),
               PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{home / 'prefect.db'}")
    cmd = [_program("prefect"), "server", "start", "--host", settings.host, "--port", str(port)]
    log_file = folder / "logs" / "prefect-server.log"
    pid, created = _spawn(PREFECT_SERVER, cmd, home, env, log_file)
    return Service(PREFECT_SERVER, pid, created, url, f"{url}/api/health", str(log_file), cmd, port,
                   {"api_url": f"{url}/api"})


def _start_worker(root: Path, folder: Path, settings: ServiceSettings, env: dict, api_url: str,
                  tracking_uri: str | None) -> Service:
    """A process worker on the project's pool (created by the worker when missing). Flow runs inherit its
    environment, so MLFLOW_TRACKING_URI sends their tracking to the MLflow service."""
    name = f"flux2lora-{socket.gethostname()}-{os.getpid()}"
    env = dict(env, PREFECT_API_URL=api_url, PWD=str(root))
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    cmd = [_program("prefect"), "worker", "start", "--pool", settings.work_pool, "--type", "process",
           "--name", name]
    log_file = folder / "logs" / "prefect-worker.log"
    pid, created = _spawn(WORKER, cmd, root, env, log_file)
    return Service(WORKER, pid, created, f"{api_url}/work_pools/{settings.work_pool}",
                   f"{api_url}/work_pools/{settings.work_pool}/workers/filter", str(log_file), cmd, None,
                   {"worker_name": name, "work_pool": settings.work_pool,
                    "mlflow_tracking_uri": tracking_uri or ""})


def up(root: Path, settings: ServiceSettings | None = None, folder: str | Path = STATE_DIR) -> dict[str, Service]:
    """Start the services `settings.only` names and wait until each is healthy; returns them by name.

    Already running and healthy: returned as they are. A failure stops whatever this call started.
    """
    settings = settings or ServiceSettings()
    unknown = set(settings.only) - set(GROUPS)
    if unknown or not settings.only:
        raise ServicesError(f"unknown services {sorted(unknown)}; choose from {sorted(GROUPS)}")
    root = Path(root).resolve()
    folder = state_dir(root, folder)
    wanted = [name for group in settings.only for name in GROUPS[group]]

    services = read_state(folder)
    running = {n: s for n, s in services.items() if _process(s) is not None}
    if running:
        if set(wanted) <= set(running) and all(_healthy(s) for s in running.values()):
            log.info("services already running: %s", ", ".join(running))
            return running
        raise ServicesError(f"{', '.join(running)} already running from {folder} but not all of "
                            f"{', '.join(wanted)} healthy; run `flux2lora services down` first")

    folder.mkdir(parents=True, exist_ok=True)
    env = _base_env(folder)
    started: dict[str, Service] = {}
    try:
        # both servers start at once; the worker needs the Prefect API
        if MLFLOW in wanted:
            started[MLFLOW] = _start_mlflow(root, folder, settings, env)
            _write_state(folder, root, started)
        if PREFECT_SERVER in wanted:
            started[PREFECT_SERVER] = _start_prefect_server(root, folder, settings, env)
            _write_state(folder, root, started)
        for service in list(started.values()):
            _wait_healthy(service, settings.timeout)
        if WORKER in wanted:
            tracking_uri = started[MLFLOW].url if MLFLOW in started else os.environ.get("MLFLOW_TRACKING_URI")
            started[WORKER] = _start_worker(root, folder, settings, env, started[PREFECT_SERVER].extra["api_url"],
                                            tracking_uri)
            _write_state(folder, root, started)
            _wait_healthy(started[WORKER], settings.timeout)
    except BaseException:
        for name in reversed(ORDER):
            if name in started:
                _stop_process(started[name], grace=10)
        (folder / "state.json").unlink(missing_ok=True)
        raise
    _write_env_file(folder, started)
    return started


def status(root: Path, folder: str | Path = STATE_DIR) -> list[ServiceStatus]:
    """Each recorded service: whether its process runs and whether it answers its health check."""
    out = []
    for name, service in read_state(state_dir(root, folder)).items():
        running = _process(service) is not None
        out.append(ServiceStatus(name, service.pid, running, running and _healthy(service), service.url,
                                 service.log))
    return out


def down(root: Path, folder: str | Path = STATE_DIR, grace: float = 20) -> list[str]:
    """Stop the recorded services, worker first; returns the names of those that were running. Logs, the
    Prefect database and MLflow's store stay."""
    folder = state_dir(root, folder)
    services = read_state(folder)
    stopped = [name for name in reversed(ORDER) if name in services and _stop_process(services[name], grace)]
    (folder / "state.json").unlink(missing_ok=True)
    (folder / "env").unlink(missing_ok=True)
    return stopped
