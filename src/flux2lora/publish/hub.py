"""Push a published LoRA folder to the Hugging Face Hub: the LoRA files, sample images and the model card.

The token is huggingface_hub's business: `HF_TOKEN` or the file `huggingface-cli login` writes. It is never a
parameter here, so it cannot reach params.yaml, MLflow or the model card.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

# What goes to the Hub from the publish folder: params.json stays on S3 / in MLflow (it names local paths).
HUB_FILES = ["*.safetensors", "*.png", "*.jpg", "*.webp", "README.md"]
# Files of an earlier push that this one does not contain (another run's `<run-name>_bfl.safetensors`, old samples)
# are deleted in the same commit, so the repo holds one LoRA and the card describes it.
HUB_REPLACED = ["*.safetensors", "*.png", "*.jpg", "*.webp"]


def push_to_hub(folder: Path, repo_id: str, *, private: bool = True, commit_message: str | None = None,
                api=None) -> dict:
    """Create the model repo if it does not exist (reuse it if it does) and upload the folder's LoRA files,
    images and README.md in one commit, replacing the LoRA files and images of an earlier push.
    Returns {"repo_id", "url", "commit_url"}.

    `api`: an `huggingface_hub.HfApi` (tests pass a stand-in); by default one that finds the token itself.
    """
    from huggingface_hub import HfApi

    api = api or HfApi()
    repo_url = api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
    commit = api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=str(folder),
                               allow_patterns=HUB_FILES, delete_patterns=HUB_REPLACED,
                               commit_message=commit_message or "Upload LoRA (flux2lora)")
    url = str(repo_url)
    log.info("hub: %s updated (%s)", repo_id, url)
    return {"repo_id": repo_id, "url": url, "commit_url": str(getattr(commit, "commit_url", "") or "")}
