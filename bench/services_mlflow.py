"""Processes and memory of the MLflow tracking server as `flux2lora services up` and the README's `mlflow ui` start
it, with MLflow's job execution (job runner + huey consumers) on (MLflow 3's default) and off
(MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false, what both now use).

Each variant starts the server on a fresh sqlite store in a temporary folder and a free port, waits for /health,
waits `--settle` more seconds (MLflow's job runner launches its huey consumers ~10 s after the server starts), then
sums over the server's process and all its descendants: process count, RSS (resident pages, shared ones counted in
each process) and USS (pages only that process holds: what stopping it would free). Variants alternate, `--repeats`
times; medians are printed as a markdown table.

    python bench/services_mlflow.py --repeats 3
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import date
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from flux2lora import services  # noqa: E402

MLFLOW = str(Path(sys.executable).parent / "mlflow")
JOB_ENV = "MLFLOW_SERVER_ENABLE_JOB_EXECUTION"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_health(url: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2).read()
            return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"{url} not healthy within {timeout} s")


def _tree(pid: int) -> dict:
    root = psutil.Process(pid)
    procs = [root, *root.children(recursive=True)]
    rss = uss = 0
    names = []
    for p in procs:
        try:
            info = p.memory_full_info()
            rss += info.rss
            uss += info.uss
            names.append(" ".join(p.cmdline()[:4]))
        except psutil.Error:
            pass
    return {"processes": len(names), "rss": rss, "uss": uss, "cmdlines": names}


def measure_services_up(jobs_on: bool, settle: float) -> dict:
    """`services.up(only mlflow)`, as `flux2lora services up --only mlflow` runs it; jobs_on exports MLflow's
    default (true) the way a user would, which the service keeps."""
    with tempfile.TemporaryDirectory() as tmp:
        saved = os.environ.get(JOB_ENV)
        if jobs_on:
            os.environ[JOB_ENV] = "true"
        else:
            os.environ.pop(JOB_ENV, None)
        try:
            started = services.up(Path(tmp), services.ServiceSettings(only=("mlflow",), mlflow_port=0))
            time.sleep(settle)
            return _tree(started[services.MLFLOW].pid)
        finally:
            services.down(Path(tmp))
            if saved is None:
                os.environ.pop(JOB_ENV, None)
            else:
                os.environ[JOB_ENV] = saved


def measure_mlflow_ui(jobs_on: bool, settle: float) -> dict:
    """jobs_on: the README's earlier `mlflow ui --backend-store-uri sqlite:///...` (MLflow's defaults: jobs, 4 web
    workers); else its current `MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false mlflow ui --backend-store-uri ...
    --workers 1`."""
    with tempfile.TemporaryDirectory() as tmp:
        port = _free_port()
        env = dict(os.environ)
        env[JOB_ENV] = "true" if jobs_on else "false"
        lean = [] if jobs_on else ["--workers", "1"]
        proc = subprocess.Popen([MLFLOW, "ui", "--backend-store-uri", f"sqlite:///{tmp}/mlflow.db", *lean, "--port",
                                 str(port)], cwd=tmp, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            _wait_health(f"http://127.0.0.1:{port}")
            time.sleep(settle)
            return _tree(proc.pid)
        finally:
            services.terminate_then_kill([psutil.Process(proc.pid), *psutil.Process(proc.pid).children(True)], 10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--settle", type=float, default=20.0, help="seconds after /health before measuring")
    args = parser.parse_args()
    variants = [("services up", True, measure_services_up), ("services up", False, measure_services_up),
                ("mlflow ui", True, measure_mlflow_ui), ("mlflow ui", False, measure_mlflow_ui)]
    results: dict[tuple[str, bool], list[dict]] = {(name, on): [] for name, on, _ in variants}
    for _ in range(args.repeats):
        for name, on, fn in variants:  # interleaved: each repeat runs every variant once
            row = fn(on, args.settle)
            results[(name, on)].append(row)
            print(f"{name:12s} jobs {'on ' if on else 'off'}: {row['processes']} processes, "
                  f"RSS {row['rss'] / 2**20:.0f} MiB, USS {row['uss'] / 2**20:.0f} MiB", file=sys.stderr)

    import mlflow

    cpu = next((li.split(":", 1)[1].strip() for li in Path("/proc/cpuinfo").read_text().splitlines()
                if li.startswith("model name")), platform.processor())
    print(f"\n### {date.today()}, {cpu}, {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB; "
          f"Python {platform.python_version()}, MLflow {mlflow.__version__}, psutil {psutil.__version__}\n")
    print(f"`python bench/services_mlflow.py --repeats {args.repeats} --settle {args.settle:g}`: medians of "
          f"{args.repeats} interleaved starts each, measured {args.settle:g} s after /health answered.\n")
    print("| command | MLflow job execution (web workers) | processes | RSS (MiB) | USS (MiB) |")
    print("|---|---|---:|---:|---:|")
    for (name, on), rows in results.items():
        workers = "" if name == "services up" else (" (4)" if on else " (1)")
        print(f"| `{name}` | {'on: MLflow default' if on else 'off: ours'}{workers} | "
              f"{statistics.median(r['processes'] for r in rows):.0f} | "
              f"{statistics.median(r['rss'] for r in rows) / 2**20:.0f} | "
              f"{statistics.median(r['uss'] for r in rows) / 2**20:.0f} |")
    for (name, on), rows in results.items():
        print(f"\n{name}, jobs {'on' if on else 'off'}, processes of the last start:")
        for line in rows[-1]["cmdlines"]:
            print(f"    {line}")


if __name__ == "__main__":
    main()
