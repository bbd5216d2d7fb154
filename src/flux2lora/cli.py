"""`flux2lora` command line: stages, the tiny offline model, the demo dataset."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="LoRA training for FLUX.2 (klein-4b, klein-9b, dev): stages, tiny models, demo data.")


def _setup_logging() -> None:
    from rich.logging import RichHandler

    logging.basicConfig(level=logging.INFO, format="%(message)s", datefmt="[%X]",
                        handlers=[RichHandler(rich_tracebacks=False, show_path=False)])


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


@app.command("stage")
def stage(name: str = typer.Argument(..., help="prepare | encode-text | encode-latents | train | validate | publish"),
          params: Path = typer.Option(Path("params.yaml"), "--params", help="params file (its folder is the project root)")):
    """Run one pipeline stage (what `dvc repro` calls)."""
    from .config import ParamsError
    from .stages import run_stage

    _setup_logging()
    try:
        summary = run_stage(name, params)
    except (ParamsError, FileNotFoundError, ValueError) as e:
        _fail(str(e))
    typer.echo(json.dumps(summary, indent=2, default=str))


@app.command("make-tiny-model")
def make_tiny_model_cmd(path: Path = typer.Argument(..., help="folder to write the pipeline into"),
                        flavour: str = typer.Option("klein-4b", help="klein-4b | klein-9b | dev"),
                        seed: int = typer.Option(0, help="weights are a pure function of the seed")):
    """Write a random-weight FLUX.2 pipeline folder (diffusers layout) built offline, for tests and demos."""
    from .tiny import make_tiny_model

    try:
        out = make_tiny_model(path, flavour=flavour, seed=seed)
    except ValueError as e:
        _fail(str(e))
    typer.echo(f"tiny {flavour} pipeline written to {out}")


@app.command("demo-data")
def demo_data(folder: Path = typer.Argument(Path("data/demo")), count: int = 8, size: int = 96, seed: int = 0,
              prompt_library: Path = typer.Option(Path("user_prompt_library.json"))):
    """Write a small generated image/caption dataset and a validation prompt library."""
    from .demo import make_demo_dataset, write_prompt_library

    make_demo_dataset(folder, count=count, size=size, seed=seed)
    write_prompt_library(prompt_library)
    typer.echo(f"{count} images with captions in {folder}; prompts in {prompt_library}")


@app.command("check-params")
def check_params(params: Path = typer.Option(Path("params.yaml"), "--params")):
    """Validate params.yaml: unknown keys and bad values are reported with the closest valid key."""
    from .config import ParamsError, load_params

    try:
        load_params(params)
    except ParamsError as e:
        _fail(str(e))
    typer.echo(f"{params}: ok")


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
