"""Symbolic links in the data root, handled on purpose.

DVC hashes `prepare.data_root` (prepare's dependency) by following every link, and stops with `[Errno 2] No such
file or directory` at a link whose target is gone, before prepare could skip it (DVC has no option to pass over
broken links: treeverse/dvc#9971). So the dangling links are kept out of DVC's sight by a block of the project's
`.dvcignore` (DVC refuses one inside a dependency folder) that flux2lora maintains, and prepare skips them with the
reason `dangling_symlink`. The block is brought up to date by the `params` stage (the first `dvc repro`
runs; DVC re-reads .dvcignore before hashing the next stage's deps), `prepare`, `flux2lora check-params` and the
Prefect flow's DVC check (before DVC hashes anything); the lines outside it are the user's and are kept as they are.
A link that breaks after `params` last ran (params.yaml unchanged) stops a plain `dvc repro` in DVC itself, and a
repaired link stays hidden until one of them runs: `flux2lora check-params` settles both in one step.

Links that resolve are followed, as DVC follows them: a link to a file outside the data root is trained on, and DVC
hashes the content it points to, so editing the target re-runs prepare; such files are listed in report.json
(`linked_outside_data_root`) because a clone of the project elsewhere will not have them. Links to folders are not
descended into by prepare (a link cycle would never end) and are reported as skipped (`linked_folder`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

DVCIGNORE = ".dvcignore"
BEGIN = "# >>> flux2lora: dangling symlinks, kept out of DVC's hashing (maintained by flux2lora prepare; do not edit)"
END = "# <<< flux2lora"

# never walked: DVC ignores these itself
_SKIPPED_DIRS = {".git", ".dvc", ".hg"}


def dangling_links(data_root: Path) -> list[str]:
    """Links under `data_root` whose target does not exist, as /-separated paths relative to it, sorted. Every
    folder is walked, hidden ones included (DVC hashes those too); links to folders are not followed."""
    data_root = Path(data_root)
    found = []
    for dirpath, dirnames, filenames in os.walk(data_root):
        dirnames[:] = [d for d in dirnames if d not in _SKIPPED_DIRS]
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            if os.path.islink(path) and not os.path.exists(path):
                found.append(Path(path).relative_to(data_root).as_posix())
    return sorted(found)


def _pattern(relative: str) -> str:
    """A .dvcignore (gitignore syntax) line matching exactly `relative`, anchored at the file's folder."""
    escaped = re.sub(r"([\\*?\[\]!#])", r"\\\1", relative)
    if escaped.endswith(" "):
        escaped = escaped[:-1] + "\\ "
    return "/" + escaped


def sync_dvcignore(data_root: Path, project: Path) -> list[str]:
    """Make the flux2lora block of `<project>/.dvcignore` list exactly the dangling links under `data_root` now;
    returns them (relative to data_root). The file is only written when the block changes, and removed when
    nothing but an empty block would be left. A data root outside the project is not DVC's to hash: nothing is
    written then."""
    data_root, project = Path(data_root).resolve(), Path(project).resolve()
    links = dangling_links(data_root) if data_root.is_dir() else []
    try:
        prefix = data_root.relative_to(project).as_posix()
    except ValueError:
        return links
    prefix = "" if prefix == "." else prefix + "/"
    path = project / DVCIGNORE
    text = path.read_text() if path.exists() else ""
    lines = text.splitlines()
    if BEGIN in lines:
        start = lines.index(BEGIN)
        end = start + lines[start:].index(END) if END in lines[start:] else len(lines) - 1
        user = lines[:start] + lines[end + 1:]
    else:
        user = lines
    block = [BEGIN, *(_pattern(prefix + link) for link in links), END] if links else []
    new_lines = user + block
    new = "\n".join(new_lines) + "\n" if new_lines else ""
    if new != text:
        if new:
            path.write_text(new)
        else:
            path.unlink(missing_ok=True)
    return links
