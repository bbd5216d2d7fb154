"""Rehearse the GPU machine's Python environment here, in one process: only torch's own distributions and those in
bench/gpu_requirements.txt can be imported or found by importlib.metadata; every other installed distribution
looks absent, as on a machine that has a bare CUDA torch install plus our wheels. A module the GPU run imports but
the wheels do not carry then fails in CI, not on the GPU machine.

    python bench/bare_env.py bench/gpu_requirements.txt SCRIPT [ARGS...]    # runs SCRIPT as __main__

Modules that belong to no installed distribution (the standard library, src/flux2lora, bench/) stay importable.
The filter wraps importlib's PathFinder (module search and distribution metadata), so paths stay the real ones
(nothing compiled against them, such as optimum-quanto's C++ extension, is rebuilt).
"""

from __future__ import annotations

import importlib.machinery
import importlib.metadata as md
import re
import runpy
import sys
from pathlib import Path

# Markers evaluated as on the GPU machine (CPython 3.12, x86-64 Linux)
GPU_MACHINE = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
               "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
               "platform_python_implementation": "CPython", "os_name": "posix", "extra": ""}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def torch_closure() -> set[str]:
    """torch and the distributions it requires (a bare torch install), as installed here."""
    from packaging.requirements import Requirement

    seen, todo = set(), ["torch"]
    while todo:
        name = canonical(todo.pop())
        if name in seen:
            continue
        try:
            requires = md.requires(name) or []
        except md.PackageNotFoundError:
            continue  # nvidia-* and triton: not part of a CPU torch install
        seen.add(name)
        for text in requires:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate(GPU_MACHINE):
                todo.append(req.name)
    return seen


def requirements(path: Path) -> dict[str, str]:
    out = {}
    for line in Path(path).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            out[canonical(name)] = version
    return out


def install(requirements_file: Path) -> set[str]:
    """Hide every installed distribution outside torch's closure and the requirements file; returns the hidden
    top-level module names. Listed versions must be the installed ones (the pins are what CI ran)."""
    wanted = requirements(requirements_file)
    for name, version in wanted.items():
        installed = md.version(name)
        if installed != version:
            raise SystemExit(f"{requirements_file}: {name}=={version} but {installed} is installed here; update "
                             "the pin")
    allowed = torch_closure() | set(wanted) | {"flux2lora"}  # the project itself: src/ is on the GPU run's path
    owners = md.packages_distributions()
    hidden = {top for top, dists in owners.items() if not any(canonical(d) in allowed for d in dists)}
    hidden_dists = {canonical(d) for dists in owners.values() for d in dists} - allowed

    class BareMachineFinder(importlib.machinery.PathFinder):
        @classmethod
        def find_spec(cls, fullname, path=None, target=None):
            if fullname.partition(".")[0] in hidden:
                return None
            return super().find_spec(fullname, path, target)

        @classmethod
        def find_distributions(cls, context=md.DistributionFinder.Context()):
            return (d for d in super().find_distributions(context)
                    if canonical(d.metadata["Name"] or "") not in hidden_dists)

    sys.meta_path[:] = [BareMachineFinder if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
    for module in [m for m in sys.modules if m.partition(".")[0] in hidden]:
        del sys.modules[module]  # imported before the filter (by packaging, say): gone as well
    return hidden


if __name__ == "__main__":
    install(Path(sys.argv[1]))
    script = sys.argv[2]
    sys.argv = sys.argv[2:]
    sys.path.insert(0, str(Path(script).resolve().parent))
    runpy.run_path(script, run_name="__main__")
