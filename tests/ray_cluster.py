"""A real Ray cluster on this machine for tests and benches: a head and worker nodes, each its own `ray start`
process on a loopback address, in their own temp dir, stopped by pid; and a psutil watch of the connections that
processes open."""

from __future__ import annotations

import ipaddress
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import psutil
from helpers import REPO, VENV_BIN, project_env
from servers import free_port

# A loopback address other than 127.0.0.1: Ray (services.resolve_ip_for_localhost) replaces a node IP of
# "127.0.0.1"/"localhost" by the default route's address (eth0) to make it "remotely reachable"; 127.0.0.2 is on lo
# (127/8) and kept as given.
NODE_IP = "127.0.0.2"


class LocalRayCluster:
    """A head and worker nodes as separate `ray start --block` processes on NODE_IP, in their own temp dir.

    With `jobs=True` the head also runs the dashboard, whose HTTP server is the Ray Jobs API, on NODE_IP:
    `jobs_url` (http://NODE_IP:port) is the address to submit jobs to."""

    def __init__(self, workers: int = 2, jobs: bool = False, env: dict[str, str | None] | None = None):
        # a short path: Ray's unix sockets live under it (108-byte limit)
        self.temp_dir = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
        self.port = free_port(NODE_IP)
        self.address = f"{NODE_IP}:{self.port}"
        self.jobs_port = free_port(NODE_IP) if jobs else None
        self.jobs_url = f"http://{NODE_IP}:{self.jobs_port}" if jobs else None
        self.env = project_env(PYTHONPATH=os.pathsep.join([str(REPO / "src"), str(REPO / "tests")]),
                               GLOO_SOCKET_IFNAME="lo", RAY_USAGE_STATS_ENABLED="0", ACCELERATE_USE_CPU="true",
                               TQDM_MININTERVAL="30")
        self.env.pop("RAY_ADDRESS", None)
        for key, value in (env or {}).items():  # the nodes' own environment; None: not set on them
            if value is None:
                self.env.pop(key, None)
            else:
                self.env[key] = value
        self.nodes: list[subprocess.Popen] = []
        self.logs: list[Path] = []
        try:
            self._start(head=True)
            for _ in range(workers):
                self._start(head=False)
            self._wait_for_nodes(1 + workers)
            if jobs:
                self._wait_for_jobs_api()
        except BaseException:
            self.stop()
            raise

    def _start(self, head: bool, attempts: int = 3) -> None:
        """Start one node; again (new ports) when `ray start` gave up: it waits only 30 s for its raylet to register
        (hard-coded in ray._private.node), which a loaded 2-core machine can exceed."""
        for attempt in range(attempts):
            try:
                return self._start_once(head)
            except RuntimeError:
                failed, log = self.nodes.pop(), self.logs.pop()
                if failed.poll() is None or attempt == attempts - 1:
                    raise
                try:  # what it started before giving up (the node's processes share its process group)
                    os.killpg(failed.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                log.rename(log.with_suffix(f".failed-{attempt}"))
                if head:
                    self.port = free_port(NODE_IP)
                    self.address = f"{NODE_IP}:{self.port}"

    def _start_once(self, head: bool) -> None:
        ports = {"--node-manager-port": free_port(), "--object-manager-port": free_port(),
                 "--runtime-env-agent-port": free_port(), "--dashboard-agent-grpc-port": free_port(),
                 "--dashboard-agent-listen-port": free_port(), "--metrics-export-port": free_port()}
        # workers' ports below the OS's ephemeral range (where free_port's come from), 200 a node
        base = 11000 + 600 * (os.getpid() % 30) + 200 * len(self.nodes)
        cmd = [str(VENV_BIN / "ray"), "start", "--block", f"--node-ip-address={NODE_IP}", "--num-cpus=1",
               "--num-gpus=0", f"--min-worker-port={base}", f"--max-worker-port={base + 199}",
               *[f"{k}={v}" for k, v in ports.items()]]
        if head:
            cmd += [f"--port={self.port}", "--head", f"--temp-dir={self.temp_dir}"]
            if self.jobs_port:
                cmd += ["--include-dashboard=true", f"--dashboard-host={NODE_IP}", f"--dashboard-port={self.jobs_port}"]
            else:
                cmd += ["--include-dashboard=false"]
        else:
            cmd += [f"--address={self.address}"]
        log = self.temp_dir / f"node-{len(self.nodes)}.log"
        self.logs.append(log)
        self.nodes.append(subprocess.Popen(["nice", "-n", "5", *cmd], stdout=log.open("w"), stderr=subprocess.STDOUT,
                                           env=self.env, start_new_session=True))
        # one node at a time: raylets registering together on 2 loaded cores time out
        deadline = time.monotonic() + 120
        while "Ray runtime started" not in log.read_text():
            if self.nodes[-1].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray start did not start a node: {log.read_text()[-4000:]}")
            time.sleep(0.5)

    def _wait_for_nodes(self, count: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for node, log in zip(self.nodes, self.logs):
                if node.poll() is not None:
                    raise RuntimeError(f"ray start exited: {log.read_text()[-4000:]}")
            result = subprocess.run([str(VENV_BIN / "ray"), "status", f"--address={self.address}"],
                                    capture_output=True, text=True, env=self.env)
            if result.returncode == 0 and result.stdout.count("node_") >= count:
                return
            time.sleep(2)
        raise RuntimeError(f"{count} Ray nodes did not come up: {result.stdout[-2000:]} {result.stderr[-2000:]}")

    def _wait_for_jobs_api(self, timeout: float = 120) -> None:
        """Until the head's Jobs API answers (the dashboard starts after the node reports it started)."""
        import urllib.request

        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{self.jobs_url}/api/version", timeout=5) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            if self.nodes[0].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the Ray Jobs API at {self.jobs_url} did not answer: "
                                   f"{self.logs[0].read_text()[-4000:]}")
            time.sleep(0.5)

    def processes(self) -> list[psutil.Process]:
        """Every process of this cluster: the `ray start` processes and all their descendants."""
        found = []
        for node in self.nodes:
            try:
                parent = psutil.Process(node.pid)
                found += [parent, *parent.children(recursive=True)]
            except psutil.NoSuchProcess:
                pass
        return found

    def stop(self) -> None:
        """SIGTERM each `ray start --block` (it stops its node's processes), then SIGKILL what is left, by pid."""
        survivors = self.processes()
        for node in reversed(self.nodes):
            if node.poll() is None:
                node.send_signal(signal.SIGTERM)
        for node in self.nodes:
            try:
                node.wait(timeout=10)
            except subprocess.TimeoutExpired:
                node.kill()
        for proc in survivors:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        shutil.rmtree(self.temp_dir, ignore_errors=True)


S3_BUCKET = "runs"
S3_SECRET = "flux2lora-test-secret-key"  # moto accepts any: a distinctive one, to look for where it must not be


def s3_env(endpoint: str) -> dict[str, str | None]:
    """The AWS environment of a Ray node (and of the driver, in test_ray_storage) for moto's S3 at `endpoint`: test
    credentials with S3_SECRET, no ~/.aws files; None for what must not be set (a profile, a session token, another
    endpoint or region)."""
    from servers import S3_TEST_ENV

    return {**S3_TEST_ENV, "AWS_SECRET_ACCESS_KEY": S3_SECRET, "AWS_ENDPOINT_URL": endpoint,
            "AWS_CONFIG_FILE": "/nonexistent/aws-config", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
            **dict.fromkeys(("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_REGION"))}


class ConnectionWatch:
    """Samples the inet connections of the given processes every 0.2 s in a thread; `remote` collects every remote
    address seen."""

    def __init__(self, processes):
        self.processes, self.remote, self.local = processes, set(), set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _run(self):
        while not self._stop.is_set():
            for proc in [psutil.Process(), *self.processes()]:
                try:
                    for conn in proc.net_connections(kind="inet"):
                        if conn.raddr:
                            self.remote.add(conn.raddr.ip)
                        if conn.laddr and conn.status == psutil.CONN_ESTABLISHED:
                            self.local.add(conn.laddr.ip)
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
            self._stop.wait(0.2)

    def not_loopback(self) -> set[str]:
        """The addresses seen that are not loopback (an IPv4-mapped IPv6 address counts as its IPv4 one)."""
        def loopback(ip: str) -> bool:
            address = ipaddress.ip_address(ip)
            mapped = getattr(address, "ipv4_mapped", None)
            return (mapped or address).is_loopback

        return {ip for ip in self.remote | self.local if not loopback(ip)}




def worker_killer(marker: Path, timeout: float = 300) -> tuple[threading.Thread, list[int]]:
    """A thread (not started) that SIGKILLs the Ray worker holding at a fault point (FLUX2LORA_FAULT=...:hold) as
    soon as the fault's marker file names its pid, and the list it appends that pid to."""
    import re

    killed: list[int] = []

    def kill_the_holding_worker():
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(r"pid (\d+)", marker.read_text()) if marker.exists() else None
            if found:
                os.kill(int(found.group(1)), signal.SIGKILL)
                killed.append(int(found.group(1)))
                return
            time.sleep(0.2)

    return threading.Thread(target=kill_the_holding_worker, daemon=True), killed


def ray_params(cluster: LocalRayCluster, **extra) -> dict:
    """params.yaml values that run the train stage on `cluster` through its GCS address (Ray Train from this
    process), torch.distributed's rendezvous on NODE_IP."""
    return {"runtime.engine": "ray", "runtime.ray_address": cluster.address, "runtime.ray_master_addr": NODE_IP,
            **extra}


def launch(root: Path) -> dict:
    """The train stage of the project at `root` as its runtime section says (Ray, accelerate or this process)."""
    import logging

    from flux2lora.config import load_params
    from flux2lora.launch import launch_train

    return launch_train(root, load_params(root / "params.yaml"), logging.getLogger("test.ray"))
