"""Progress in the task run's log: the library draws tqdm bars on the terminal; while a stage runs, their state is
also written to the Prefect log every few seconds, so the UI shows how far a long training is."""

from __future__ import annotations

import contextvars
import os
import threading
from contextlib import contextmanager
from typing import Iterator

from tqdm import tqdm

EVERY_S_ENV = "FLUX2LORA_PROGRESS_SECONDS"
DEFAULT_EVERY_S = 30.0
LINE = ("{desc}: {n_fmt}/{total_fmt} {unit} ({percentage:.0f}%), {rate_fmt}, elapsed {elapsed}, left {remaining}"
        "{postfix}")


def describe(bar: tqdm) -> str:
    """One log line for a bar: `train: 14/30 step (47%), 9.81step/s, elapsed 00:01, left 00:02, loss=1.6`."""
    state = dict(bar.format_dict, bar_format=LINE)
    if not state.get("total"):
        state["bar_format"] = "{desc}: {n_fmt} {unit}, {rate_fmt}, elapsed {elapsed}{postfix}"
    return tqdm.format_meter(**state)


@contextmanager
def progress_to_log(logger, every_s: float | None = None) -> Iterator[None]:
    """While the block runs, log every open bar that moved, every `every_s` seconds ($FLUX2LORA_PROGRESS_SECONDS,
    default 30)."""
    every_s = every_s or float(os.environ.get(EVERY_S_ENV) or DEFAULT_EVERY_S)
    stop = threading.Event()
    logged: dict[int, int] = {}

    def tick() -> None:
        # tqdm keeps its open bars in a class-level weak set (the library's tqdm.auto bars included)
        with tqdm.get_lock():
            bars = [bar for bar in tqdm._instances if not bar.disable]
        for bar in bars:
            if logged.get(id(bar)) != bar.n:
                logged[id(bar)] = bar.n
                logger.info("progress %s", describe(bar))

    def watch() -> None:
        while not stop.wait(every_s):
            tick()

    # the copied context carries Prefect's run and settings context into the thread, so its records reach the run
    thread = threading.Thread(target=contextvars.copy_context().run, args=(watch,), name="flux2lora-progress",
                              daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)
