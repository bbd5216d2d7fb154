"""Editing params.yaml by dotted keys, keeping its comments, order and quoting: what a flow run's parameters and
`flux2lora train --set key=value` write (validated first; the file is left as it was when the result is invalid)."""

from __future__ import annotations

import difflib
import io
from pathlib import Path
from typing import Any

import yaml

from .config import apply_overrides, parse_params, read_raw_params
from .io import write_text_atomic

_MISSING = object()


def _get(tree: dict, dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _set(tree, dotted: str, value: Any) -> None:
    """Set a dotted key in a ruamel round-trip tree, creating sections as needed."""
    from ruamel.yaml.comments import CommentedMap

    node = tree
    *parents, leaf = dotted.split(".")
    for part in parents:
        if part not in node or node[part] is None:
            node[part] = CommentedMap()
        node = node[part]
    node[leaf] = value


def write_overrides(params_path: Path, overrides: dict[str, Any]) -> str:
    """Write dotted-key overrides into params.yaml; returns the unified diff ("" when nothing changed).

    Raises ParamsError, naming the key, when the result is not valid; the file is then left as it was."""
    from ruamel.yaml import YAML

    params_path = Path(params_path)
    raw = read_raw_params(params_path)
    changed = {k: v for k, v in overrides.items() if _get(raw, k) != v}
    if not changed:
        return ""
    wanted = apply_overrides(raw, changed)
    # keys only in the message: a value typed into the wrong key (a token, say) must not reach the log
    parse_params(wanted, source=f"{params_path} with this run's parameters ({', '.join(changed)})")

    before = params_path.read_text()
    rt = YAML()  # round trip: comments, order and quoting survive
    rt.preserve_quotes = True
    rt.width = 4096
    # keep `null` spelled out (ruamel writes an empty value), as params.yaml writes it
    rt.representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    tree = rt.load(before)
    for key, value in changed.items():
        _set(tree, key, value)
    out = io.StringIO()
    rt.dump(tree, out)
    after = out.getvalue()
    if yaml.safe_load(after) != wanted:  # the edit must mean exactly what was validated
        raise RuntimeError(f"{params_path}: writing {', '.join(changed)} did not give the validated params")
    write_text_atomic(params_path, after)
    return "".join(difflib.unified_diff(before.splitlines(keepends=True), after.splitlines(keepends=True),
                                        fromfile=f"{params_path.name} (before)", tofile=f"{params_path.name}"))
