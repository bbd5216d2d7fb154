"""Validation prompt libraries in the seed's format: a JSON object {shortname: prompt}."""

from __future__ import annotations

import json
from pathlib import Path

SUBJECT_PLACEHOLDER = "<subject>"


def load_prompt_library(path: Path, subject: str = "") -> dict[str, str]:
    """Read `{shortname: prompt}` and replace `<subject>` with the configured subject / trigger phrase."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: prompt library not found; create it as a JSON object "
                                '{"shortname": "a prompt with <subject>"} or set validate.user_prompt_library')
    try:
        library = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(library, dict) or not all(isinstance(v, str) for v in library.values()):
        raise ValueError(f"{path}: expected a JSON object mapping shortnames to prompt strings")
    if not library:
        raise ValueError(f"{path}: the prompt library is empty; add at least one prompt")
    return {name: prompt.replace(SUBJECT_PLACEHOLDER, subject).strip() for name, prompt in library.items()}
