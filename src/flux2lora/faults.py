"""Fault injection: make a stage fail once, at a chosen point, to check that retries resume.

`FLUX2LORA_FAULT="train:step=7"` makes the train stage raise `InjectedFault` right after step 7 is done (after its
checkpoint, when one was due). `STAGE:start` fails a stage before it runs, `STAGE:end` after it ran but before the
Prefect task records it in dvc.lock. Several faults are separated by commas: `"prepare:start,train:step=7"`.

A point ending in `:hold` (`train:step=2:hold`) does not raise: the process that reaches it writes its pid into the
marker and waits (up to FLUX2LORA_FAULT_HOLD_SECONDS, default 300) to be killed from outside, as a lost machine
would lose it; a test kills that pid.

Each fault fires once: the first time it fires it leaves a marker file in `<output_dir>/.faults/`, so the retried
task, and any later run, passes the same point. Delete the marker (or the folder) to arm the fault again.
"""

from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path

log = logging.getLogger(__name__)

ENV = "FLUX2LORA_FAULT"
MARKER_DIR = ".faults"
_POINT = re.compile(r"^(start|end|step=\d+)(:hold)?$")
HOLD = ":hold"


class InjectedFault(RuntimeError):
    """The failure asked for by FLUX2LORA_FAULT; a retry passes because the fault has fired."""


def armed(spec: str | None = None) -> list[tuple[str, str]]:
    """The (stage, point) pairs in `spec` (default: $FLUX2LORA_FAULT); a malformed entry is an error naming it."""
    spec = os.environ.get(ENV, "") if spec is None else spec
    faults = []
    for entry in filter(None, (part.strip() for part in spec.split(","))):
        stage, _, point = entry.partition(":")
        if not stage or not _POINT.match(point):
            raise ValueError(f"{ENV}: {entry!r} is not STAGE:start, STAGE:end or STAGE:step=N, optionally "
                             "followed by :hold (e.g. train:step=7)")
        faults.append((stage, point))
    return faults


def marker_path(output_dir: Path, stage: str, point: str) -> Path:
    """Where the fault (stage, point) records that it has fired."""
    return Path(output_dir) / MARKER_DIR / f"{stage}_{point.replace('=', '-')}"


def maybe_fail(stage: str, point: str, output_dir: Path) -> None:
    """Raise InjectedFault when FLUX2LORA_FAULT names (stage, point) and that fault has not fired yet."""
    if not os.environ.get(ENV):
        return
    faults = armed()
    hold = (stage, point + HOLD) in faults
    if not hold and (stage, point) not in faults:
        return
    marker = marker_path(output_dir, stage, point)
    marker.parent.mkdir(parents=True, exist_ok=True)
    try:
        # exclusive create: of several processes (accelerate launch) only one fires the fault
        with marker.open("x") as f:
            f.write(f"{stage}:{point} fired by pid {os.getpid()}\n")
    except FileExistsError:
        return
    if hold:
        log.warning("%s: injected fault at %s (%s): pid %d waits to be killed, marker %s", stage, point, ENV,
                    os.getpid(), marker)
        time.sleep(float(os.environ.get("FLUX2LORA_FAULT_HOLD_SECONDS", "300")))
    log.warning("%s: injected fault at %s (%s); it fires once, marker %s", stage, point, ENV, marker)
    raise InjectedFault(f"{stage}: injected fault at {point} ({ENV}); a retry passes it (marker {marker})")
