"""Where each stage writes its declared outputs under `output_dir`.

`dvc.yaml` declares the same paths; `tests/test_dvc.py` checks that the two agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Layout:
    output_dir: Path

    # prepare: images and captions are separate files so that editing a caption leaves the image manifest
    # byte-identical and DVC does not re-run encode-latents.
    @property
    def images_manifest(self) -> Path:
        return self.output_dir / "prepare" / "images.jsonl"

    @property
    def captions_manifest(self) -> Path:
        return self.output_dir / "prepare" / "captions.jsonl"

    @property
    def prepare_report(self) -> Path:
        return self.output_dir / "prepare" / "report.json"

    # Bookkeeping that only saves time, kept out of DVC's sight on purpose (no stage declares it): prepare's
    # per-file inspection records and the caches' shard-verification stamps. Deleting it is always safe.
    @property
    def state_dir(self) -> Path:
        return self.output_dir / "state"

    @property
    def prepare_records(self) -> Path:
        return self.state_dir / "prepare_files.sqlite"

    @property
    def text_embeds_dir(self) -> Path:
        return self.output_dir / "text_embeds"

    @property
    def prompt_embeds_dir(self) -> Path:
        """The validation prompts' embeddings (and the empty prompt's): validate's input, never train's."""
        return self.output_dir / "prompt_embeds"

    @property
    def params_dir(self) -> Path:
        """The `params` stage's files: per stage, the values of the params keys that compute it."""
        return self.output_dir / "params"

    def stage_params(self, stage: str) -> Path:
        return self.params_dir / f"{stage}.json"

    @property
    def latents_dir(self) -> Path:
        return self.output_dir / "latents"

    @property
    def lora_dir(self) -> Path:
        return self.output_dir / "lora"

    @property
    def lora_file(self) -> Path:
        return self.lora_dir / "pytorch_lora_weights.safetensors"

    @property
    def train_dir(self) -> Path:
        return self.output_dir / "train"

    @property
    def train_metrics(self) -> Path:
        return self.train_dir / "metrics.json"

    @property
    def run_file(self) -> Path:
        """The MLflow run id travels from train to validate and publish in this file."""
        return self.train_dir / "mlflow_run.json"

    @property
    def checkpoints_dir(self) -> Path:
        return self.output_dir / "checkpoints"

    @property
    def validation_dir(self) -> Path:
        return self.output_dir / "validation"

    @property
    def publish_dir(self) -> Path:
        return self.output_dir / "publish"


def layout_for(root: Path, output_dir: str) -> Layout:
    out = Path(output_dir)
    return Layout(out if out.is_absolute() else root / out)
