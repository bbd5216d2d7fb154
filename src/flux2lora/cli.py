"""`flux2lora` command line: stages, the tiny offline model, the demo dataset."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import typer

# Plain (click-style) help: a boolean flag reads `--dry-run / --no-dry-run`, where typer's rich panels print each
# flag with a `<bool>` type as if it took a value.
HELP_STYLE = dict(rich_markup_mode=None)
app = typer.Typer(add_completion=False, no_args_is_help=True, **HELP_STYLE,
                  help="LoRA training for FLUX.2 (klein-4b, klein-9b, dev): stages, tiny models, demo data.")


_debug = False


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("flux2lora")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"flux2lora {_version()}")
        raise typer.Exit()


@app.callback()
def _options(debug: bool = typer.Option(False, "--debug/--no-debug", envvar="FLUX2LORA_DEBUG",
                                        help="show the traceback behind an error message (also FLUX2LORA_DEBUG=1)"),
             version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                          expose_value=True, help="print the version and exit")):
    global _debug
    _debug = debug


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True)


def _setup_logging() -> None:
    from rich.console import Console
    from rich.logging import RichHandler

    # stderr: stdout carries only the command's result (`flux2lora stage X --json > summary.json`)
    logging.basicConfig(level=logging.INFO, format="%(message)s", datefmt="[%X]",
                        handlers=[RichHandler(console=Console(stderr=True), rich_tracebacks=False, show_path=False)])


def _fail(message: str) -> None:
    """Print `message` (which names the file or key and what to do) on stderr and exit with code 2; with --debug,
    the traceback of the exception being handled comes first."""
    if _debug and sys.exc_info()[0] is not None:
        import traceback

        traceback.print_exc(file=sys.stderr)
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    if not _debug:
        typer.secho("(flux2lora --debug ..., or FLUX2LORA_DEBUG=1, shows the traceback)", err=True)
    raise typer.Exit(2)


@app.command("stage")
def stage(name: str = typer.Argument(..., help="params | prepare | encode-text | encode-latents | train | validate | publish"),
          params: Path = typer.Option(Path("params.yaml"), "--params",
                                      help="params file (its folder is the project root)"),
          as_json: bool = typer.Option(False, "--json/--no-json", help="the summary as one line of JSON (sorted keys) on stdout; "
                                                              "without it, indented for reading. Logs and progress "
                                                              "always go to stderr")):
    """Run one pipeline stage (what `dvc repro` calls)."""
    from .errors import UserError
    from .stages import run_stage

    _setup_logging()
    try:
        summary = _launch_if_distributed(name, params) or run_stage(name, params)
    except (UserError, FileNotFoundError, ValueError) as e:  # ParamsError is both a UserError and a ValueError
        _fail(str(e))
    typer.echo(json.dumps(summary, sort_keys=True, default=str) if as_json else
               json.dumps(summary, indent=2, default=str))


def _parse_assignment(text: str) -> tuple[str, object]:
    """`key=value` of --set: the value read as YAML (20, 0.01, true, null, a string), as params.yaml would."""
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"--set {text!r}: write it as dotted.key=value, e.g. --set train.max_train_steps=500")
    return key.strip(), yaml.safe_load(value) if value.strip() else None


@app.command("train")
def train_cmd(params: Path = typer.Option(Path("params.yaml"), "--params",
                                          help="params file (its folder is the project, with dvc.yaml)"),
              stop_after: str = typer.Option(None, "--stage", help="stop after this stage (params | prepare | "
                                             "encode-text | encode-latents | train | validate | publish)"),
              assignments: list[str] = typer.Option([], "--set", help="dotted.key=value written into params.yaml "
                                                    "first (validated; repeatable), as the flow's parameters are")):
    """Run the pipeline from params.yaml as `dvc repro` does: each stage dvc.lock says is out of date runs, in
    order, and is recorded in dvc.lock; stages up to date are skipped. One line per stage on stderr; the train
    stage shows its own step / loss / ETA bar."""
    import os
    import time
    from contextlib import chdir

    from .errors import UserError
    from .params_file import write_overrides
    from .stages import STAGES, DvcPipeline, run_stage

    _setup_logging()
    console = _stderr_console()
    if stop_after is not None and stop_after not in STAGES:
        _fail(f"--stage {stop_after!r}: stages are {', '.join(STAGES)}")
    params = params.resolve()
    root = params.parent
    if not (root / "dvc.yaml").exists():
        _fail(f"{root / 'dvc.yaml'} is missing: run `flux2lora train` in a flux2lora project (params.yaml, dvc.yaml)")
    ran, current = [], []
    try:
        overrides = dict(_parse_assignment(a) for a in assignments)
        if overrides:
            diff = write_overrides(params, overrides)
            console.print(f"params.yaml: {', '.join(f'{k}={v!r}' for k, v in overrides.items())}"
                          + ("" if diff else " (already set)"))
        with chdir(root), DvcPipeline(root) as dvc:  # DVC resolves its run cache against the working directory
            for name in STAGES:
                with console.status(f"{name}: checking dvc.lock"):
                    up_to_date = dvc.is_current(name)
                if up_to_date:
                    current.append(name)
                    console.print(f"[dim]- {name:15s} up to date[/dim]")
                else:
                    started = time.monotonic()
                    console.print(f"[bold]> {name:15s} running[/bold]")
                    summary = (_launch_if_distributed(name, params) if name == "train" and
                               not os.environ.get("WORLD_SIZE") else None) or run_stage(name, params)
                    dvc.record(name)
                    ran.append(name)
                    loss = f", final loss {summary['final_loss']:.4f}" if name == "train" and \
                        isinstance(summary, dict) and "final_loss" in summary else ""
                    console.print(f"[green]+ {name:15s} done in {time.monotonic() - started:.1f} s{loss}[/green]")
                if name == stop_after:
                    break
    except (UserError, FileNotFoundError, ValueError) as e:
        _fail(str(e))
    typer.echo(f"ran: {', '.join(ran) or 'nothing'}; up to date: {', '.join(current) or 'nothing'}")


def _launch_if_distributed(name: str, params_path: Path) -> dict | None:
    """train with runtime.num_processes > 1 or runtime.engine accelerate/ray, not yet inside a launch: `accelerate
    launch` of this same command on that many processes, or a Ray Train job (their output goes to this console);
    None otherwise."""
    import os

    if name != "train" or os.environ.get("WORLD_SIZE") or os.environ.get("FLUX2LORA_LAUNCHED"):
        return None
    from .config import load_params
    from .launch import LaunchFailed, launch_train, launched

    params = load_params(params_path)
    if not launched(params):
        return None
    try:
        return launch_train(params_path.resolve().parent, params, logging.getLogger("flux2lora.launch"),
                            params_file=params_path.name)
    except LaunchFailed as e:
        _fail(str(e))


@app.command("make-tiny-model")
def make_tiny_model_cmd(path: Path = typer.Argument(..., help="folder to write the pipeline into"),
                        flavour: str = typer.Option("klein-4b", help="klein-4b | klein-9b | dev"),
                        seed: int = typer.Option(0, help="weights are a pure function of the seed"),
                        layout: str = typer.Option("diffusers", help="diffusers: the tiny flavour (4 text layers); "
                                                   "hub: the real repo's layout and depth at tiny width (train it "
                                                   "as the real flavour); mistral-small: dev's text encoder repo"),
                        distilled: bool = typer.Option(False, "--distilled/--no-distilled",
                                                       help="klein: a step-distilled repo (is_distilled)"),
                        text_encoder_keys: str = typer.Option("legacy", help="dev: legacy | transformers5 key names")):
    """Write a random-weight FLUX.2 pipeline folder built offline, for tests and demos."""
    from .tiny import make_tiny_model

    try:
        with _stderr_console().status(f"building the tiny {flavour} pipeline in {path}"):
            out = make_tiny_model(path, flavour=flavour, seed=seed, layout=layout, distilled=distilled,
                                  text_encoder_keys=text_encoder_keys)
    except ValueError as e:
        _fail(str(e))
    typer.echo(f"tiny {flavour} pipeline ({layout} layout) written to {out}")


@app.command("demo-data")
def demo_data(folder: Path = typer.Argument(Path("data/demo")), count: int = 8, size: int = 96, seed: int = 0,
              prompt_library: Path = typer.Option(None, "--prompt-library",
                                                  help="where the validation prompt library goes (default: "
                                                       "FOLDER/user_prompt_library.json)")):
    """Write a small generated image/caption dataset and a validation prompt library, both into FOLDER."""
    from .demo import make_demo_dataset, write_prompt_library

    prompt_library = prompt_library or folder / "user_prompt_library.json"
    make_demo_dataset(folder, count=count, size=size, seed=seed)
    prompt_library.parent.mkdir(parents=True, exist_ok=True)
    write_prompt_library(prompt_library)
    typer.echo(f"{count} images with captions in {folder}; prompts in {prompt_library}")


@app.command("check-params")
def check_params(params: Path = typer.Option(Path("params.yaml"), "--params")):
    """Validate params.yaml: unknown keys and bad values are reported with the closest valid key."""
    from .config import ParamsError, load_params, project_root
    from .data.links import DVCIGNORE, sync_dvcignore

    try:
        loaded = load_params(params)
    except ParamsError as e:
        _fail(str(e))
    # the data root's dangling symlinks, hidden from DVC's hashing (which would stop at them before prepare runs)
    data_root = project_root(params) / loaded.prepare.data_root
    dangling = sync_dvcignore(data_root, project_root(params))
    for link in dangling:
        typer.secho(f"warning: {loaded.prepare.data_root}/{link} is a dangling symbolic link: prepare skips it and "
                    f"{DVCIGNORE} hides it from DVC; fix or delete it", err=True,
                    fg=typer.colors.YELLOW)
    typer.echo(f"{params}: ok")


class _GenerateProgress:
    """Rich progress bars on stderr for `generate`: the phase before denoising, the denoising steps of the current
    image, and the images."""

    def __init__(self, progress, images: int, steps: int):
        self.progress = progress
        self.images_task = progress.add_task("images", total=images)
        self.steps_task = progress.add_task("preparing", total=steps)

    def phase(self, description: str) -> None:
        self.progress.update(self.steps_task, description=description)

    def step(self, image: int, step: int, total_steps: int) -> None:
        self.progress.update(self.steps_task, description=f"image {image + 1}: denoising", completed=step,
                             total=total_steps)

    def image_done(self, image: int, total_images: int) -> None:
        self.progress.update(self.images_task, completed=image + 1)
        if image + 1 < total_images:
            self.progress.reset(self.steps_task, description=f"image {image + 2}: denoising")


def _image_paths(out: Path, count: int) -> list[Path]:
    """`out` for one image; out's stem with -0, -1, ... for several."""
    return [out] if count == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(count)]


@app.command("generate")
def generate_cmd(lora: Path = typer.Option(..., "--lora", help="LoRA file (diffusers or BFL format)"),
                 prompt: str = typer.Option(..., "--prompt"),
                 scale: float = typer.Option(1.0, "--scale", help="LoRA strength"),
                 seed: int = typer.Option(0, "--seed", help="seed of the first image; image i uses seed + i"),
                 images: int = typer.Option(1, "--images", min=1, help="how many images (one seed each)"),
                 out: Path = typer.Option(Path("generated.png"), "--out",
                                          help="image file to write (several images: NAME-0.png, NAME-1.png, ...)"),
                 width: int = typer.Option(1024, "--width"), height: int = typer.Option(1024, "--height"),
                 steps: int = typer.Option(50, "--steps", help="inference steps"),
                 guidance: float = typer.Option(4.0, "--guidance", help="dev: distilled guidance; klein: CFG scale"),
                 negative_prompt: str = typer.Option("", "--negative-prompt", help="klein only"),
                 model: str = typer.Option(None, "--model", help="base model (default: from the LoRA's metadata)"),
                 flavour: str = typer.Option(None, "--flavour", help="klein-4b | klein-9b | dev (default: metadata)"),
                 text_encoder: str = typer.Option(None, "--text-encoder",
                                                  help="text encoder repo or folder (default: the one the LoRA's "
                                                       "metadata records, else the base model's)"),
                 text_encoder_subfolder: str = typer.Option(None, "--text-encoder-subfolder"),
                 device: str = typer.Option("auto", "--device"),
                 dtype: str = typer.Option(None, "--dtype", help="bf16 | fp16 | fp32 (default: bf16 on GPU)")):
    """Generate images with a LoRA, to try a result on any flavour; progress bars (phase, denoising steps,
    images) go to stderr."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn

    from .errors import UserError
    from .generate import generate_images

    _setup_logging()
    paths = _image_paths(out, images)
    columns = (TextColumn("{task.description:<24}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("eta"), TimeRemainingColumn())
    try:
        with Progress(*columns, console=_stderr_console()) as bars:
            results = generate_images(prompt, lora, seeds=[seed + i for i in range(images)], scale=scale,
                                      width=width, height=height, num_inference_steps=steps, guidance=guidance,
                                      negative_prompt=negative_prompt, model_path=model, flavour=flavour,
                                      device=device, dtype=dtype, text_encoder_path=text_encoder,
                                      text_encoder_subfolder=text_encoder_subfolder,
                                      progress=_GenerateProgress(bars, images, steps))
    except (UserError, ValueError, FileNotFoundError) as e:
        _fail(str(e))
    for image, path in zip(results, paths):
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
        typer.echo(f"image written to {path}")


@app.command("export")
def export_cmd(lora: Path = typer.Argument(..., help="LoRA file: diffusers format (--to bfl), or any layout "
                                           "`flux2lora lora inspect` reads (--to diffusers)"),
               to: str = typer.Option("bfl", "--to", help="bfl: the BFL / ComfyUI layout; diffusers: the diffusers "
                                      "layout with its peft config"),
               out: Path = typer.Option(None, "--out", help="default: <lora stem>_<to>.safetensors beside it"),
               flavour: str = typer.Option(None, "--flavour", help="--to diffusers: klein-4b | klein-9b | dev "
                                           "(default: the file's metadata, else the flavour its modules fit)")):
    """Convert a LoRA between layouts: the BFL / ComfyUI file (`diffusion_model.double_blocks...`, q/k/v fused) for
    a diffusers-format LoRA, or the diffusers file for a BFL / ComfyUI / ai-toolkit / kohya / peft one."""
    from .export import export_bfl, export_diffusers

    if to not in ("bfl", "diffusers"):
        _fail(f"--to {to!r}: choose bfl or diffusers")
    if to == "bfl" and flavour is not None:
        _fail("--flavour is read with --to diffusers only (the diffusers file's module names need no flavour)")
    target = out or lora.with_name(f"{lora.stem}_{to}.safetensors")
    try:
        path = export_bfl(lora, target) if to == "bfl" else export_diffusers(lora, target, flavour)
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    typer.echo(f"{'BFL / ComfyUI' if to == 'bfl' else 'diffusers'} LoRA written to {path}")


@app.command("promote")
def promote_cmd(ref: str = typer.Argument(..., help="MLflow run id, or a version number of the registered model"),
                alias: str = typer.Option("champion", "--alias"),
                params: Path = typer.Option(Path("params.yaml"), "--params")):
    """Move the registered model's alias `champion` to the LoRA of a run (or a version number)."""
    from . import tracking
    from .config import ParamsError, load_params, project_root
    from .registry import promote

    try:
        loaded = load_params(params)
        name = loaded.publish.registered_model_name
        if not name:
            _fail("publish.registered_model_name is not set: nothing is registered")
        tracking.configure(loaded, project_root(params))
        result = promote(name, ref, alias=alias)
    except (ParamsError, ValueError) as e:
        _fail(str(e))
    typer.echo(f"{result['name']}: alias {alias} -> version {result['version']} (run {result['run_id']}; "
               f"was {result['previous'] or 'unset'})")


services_app = typer.Typer(no_args_is_help=True, **HELP_STYLE, help="Local Prefect server, process worker and MLflow server on "
                           "loopback (pids, ports and logs under .services/).")
app.add_typer(services_app, name="services")


@services_app.command("up")
def services_up(prefect_port: int = typer.Option(4200, "--prefect-port", help="0: a free port"),
                mlflow_port: int = typer.Option(5000, "--mlflow-port", help="0: a free port"),
                host: str = typer.Option("127.0.0.1", "--host"),
                work_pool: str = typer.Option("flux2lora-local", "--pool", help="the worker's work pool"),
                mlflow_artifacts: str = typer.Option(None, "--mlflow-artifacts",
                                                     help="artifact store: a folder or s3://bucket/prefix "
                                                          "(default: ./mlartifacts)"),
                s3_endpoint_url: str = typer.Option(None, "--s3-endpoint-url", help="MinIO: http://127.0.0.1:9000"),
                only: list[str] = typer.Option(["prefect", "mlflow"], "--only", help="prefect | mlflow"),
                folder: Path = typer.Option(Path(".services"), "--dir", help="where pids, ports and logs go"),
                timeout: float = typer.Option(180, "--timeout", help="seconds to wait for each health check")):
    """Start the services in the background, wait until they are healthy, print their URLs and env exports."""
    from .services import ServicesError, ServiceSettings, env_exports, up

    settings = ServiceSettings(host=host, prefect_port=prefect_port, mlflow_port=mlflow_port, work_pool=work_pool,
                               mlflow_artifacts=mlflow_artifacts, s3_endpoint_url=s3_endpoint_url,
                               only=tuple(only), timeout=timeout)
    try:
        with _stderr_console().status(f"starting {', '.join(only)} and waiting for their health checks"):
            services = up(Path.cwd(), settings, folder)
    except ServicesError as e:
        _fail(str(e))
    for service in services.values():
        typer.echo(f"{service.name:15s} {service.url:45s} pid {service.pid:<8d} log {service.log}")
    typer.echo("")
    for key, value in env_exports(services).items():
        typer.echo(f"export {key}={value}")
    typer.echo(f"# or: source {folder / 'env'}")
    if "prefect" in only:
        typer.echo("# then: prefect --no-prompt deploy --all && prefect deployment run flux2-lora/train --watch")


@services_app.command("status")
def services_status(folder: Path = typer.Option(Path(".services"), "--dir")):
    """Each service's pid, URL and health; exit code 1 when one is down or unhealthy, 3 when none is recorded."""
    from .services import status

    rows = status(Path.cwd(), folder)
    if not rows:
        typer.echo("no services recorded (flux2lora services up)")
        raise typer.Exit(3)
    for row in rows:
        state = "healthy" if row.healthy else ("running, not healthy" if row.running else "not running")
        typer.echo(f"{row.name:15s} {state:22s} {row.url:40s} pid {row.pid:<8d} log {row.log}")
    if not all(row.healthy for row in rows):
        raise typer.Exit(1)


@services_app.command("down")
def services_down(folder: Path = typer.Option(Path(".services"), "--dir")):
    """Stop the services (worker first, with its flow runs); logs and stores stay."""
    from .services import down

    stopped = down(Path.cwd(), folder)
    typer.echo(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")


@app.command("plan")
def plan(params: Path = typer.Option(Path("params.yaml"), "--params"),
         vram: str = typer.Option(None, "--vram", help="GPU memory budget, e.g. 24GiB: propose the fastest fit"),
         ram: str = typer.Option(None, "--ram", help="host RAM, e.g. 64GiB: say when the run needs more"),
         host_bandwidth: float = typer.Option(None, "--host-bandwidth",
                                              help="host -> GPU copy speed in GB/s for offload (default 25: PCIe "
                                                   "4.0 x16; ~50 on PCIe 5.0)"),
         as_json: bool = typer.Option(False, "--json/--no-json", help="the report as JSON, for machines")):
    """Predict GPU memory, host RAM and speed of the configured run's GPU stages (encode-text, encode-latents,
    train); with --vram, propose the fastest settings of each that fit, headroom included (calibrated on H100
    measurements of the plain diffusers + peft recipe)."""
    from .config import ParamsError, load_params
    from .planner import HOST_BANDWIDTH_GBPS, parse_size, plan_report, render_table

    try:
        loaded = load_params(params)
        budget = parse_size(vram) if vram else None
        host_ram = parse_size(ram, "--ram") if ram else None
        if host_bandwidth is not None and host_bandwidth <= 0:
            raise ValueError(f"--host-bandwidth: {host_bandwidth} must be a positive number of GB/s")
        report = plan_report(loaded, budget, host_ram, host_bandwidth or HOST_BANDWIDTH_GBPS)
    except (ParamsError, ValueError) as e:
        _fail(str(e))
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        from rich.console import Console

        render_table(report, Console(width=160))


@app.command("import-simpletuner")
def import_simpletuner_cmd(folder: Path = typer.Argument(..., help="the seed trainer's config folder: config.json or "
                                                                    "config.toml, multidatabackend.json, "
                                                                    "user_prompt_library.json"),
                           params: Path = typer.Option(Path("params.yaml"), "--params"),
                           dry_run: bool = typer.Option(False, "--dry-run/--no-dry-run", help="report only; write nothing"),
                           as_json: bool = typer.Option(False, "--json/--no-json", help="the report as JSON")):
    """Write a SimpleTuner configuration into params.yaml, so that it trains the run SimpleTuner would; list every key
    as mapped (with SimpleTuner's meaning), defaulted (with the value), refused or without effect (with the reason)."""
    from .config import ParamsError
    from .simpletuner import import_simpletuner

    try:
        report = import_simpletuner(folder, params, write=not dry_run)
    except (ParamsError, FileNotFoundError, ValueError) as e:
        _fail(str(e))
    if as_json:
        typer.echo(json.dumps(report.to_json(), indent=2, default=str))
        return
    typer.echo(f"{len(report.mapped)} mapped, {len(report.defaulted)} defaulted, {len(report.refused)} refused, "
               f"{len(report.no_effect)} without effect")
    for row in report.mapped:
        typer.echo(f"  mapped      {row['source']} -> {row['target']} = {row['value']!r} ({row['meaning']})")
    for row in report.defaulted:
        typer.echo(f"  defaulted   {row['target']} = {row['value']!r}: {row['reason']}")
    for row in report.refused:
        typer.secho(f"  REFUSED     {row['source']} = {row['value']!r}: {row['reason']}", fg=typer.colors.YELLOW)
    for row in report.no_effect:
        typer.echo(f"  no effect   {row['source']} = {row['value']!r}: {row['reason']}")
    for note in report.notes:
        typer.echo(f"  note: {note}")
    typer.echo("dry run: nothing written" if dry_run else f"written: {', '.join(report.files_written)}")


lora_app = typer.Typer(no_args_is_help=True, **HELP_STYLE, help="Adapter files: what they hold and where they load.")
app.add_typer(lora_app, name="lora")


@lora_app.command("inspect")
def lora_inspect_cmd(file: Path = typer.Argument(..., help="an adapter file (.safetensors) in any trainer's layout"),
                     flavour: str = typer.Option(None, "--flavour", help="klein-4b | klein-9b | dev (default: the "
                                                 "file's metadata, else the flavour its modules fit)"),
                     as_json: bool = typer.Option(False, "--json/--no-json", help="the report as JSON")):
    """Name a FLUX.2 adapter file's layout (diffusers, BFL/ComfyUI, kohya, LyCORIS, ...) and kind (lora, dora,
    lokr, loha), its rank and alpha per module, the modules it touches and the keys that match no module of the
    flavour. Exit code 1 when some key matches no module (or has the wrong shape)."""
    from .adapter_files import inspect_adapter

    try:
        report = inspect_adapter(file, flavour)
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    if as_json:
        typer.echo(json.dumps(report.to_json(), indent=2))
    else:
        _print_inspect_report(report)
    if report.unmatched_keys or report.shape_mismatches:
        raise typer.Exit(1)


def _print_inspect_report(report) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=160)
    console.print(f"[bold]{report.file}[/bold]: layout [bold]{report.layout}[/bold], kind [bold]{report.kind}"
                  f"[/bold], flavour {report.flavour} (from {report.flavour_from}), {len(report.modules)} modules "
                  f"({len(report.targets)} of the transformer's)" + (f", written by {report.producer}"
                                                                      if report.producer else ""))
    table = Table("module (as in the file)", "kind", "rank", "alpha", "delta (out, in)", "changes")
    for m in report.modules:
        table.add_row(m.module, m.kind, "full" if m.rank is None else str(m.rank),
                      "-" if m.alpha is None else f"{m.alpha:g}", f"{m.delta_shape[0]} x {m.delta_shape[1]}",
                      ", ".join(m.targets))
    console.print(table)
    for key in report.unmatched_keys:
        console.print(f"[yellow]matches no module of {report.flavour}:[/yellow] {key}")
    for line in report.shape_mismatches:
        console.print(f"[yellow]wrong shape for {report.flavour}:[/yellow] {line}")


cache_app = typer.Typer(no_args_is_help=True, **HELP_STYLE, help="The latent and text-embedding caches.")
app.add_typer(cache_app, name="cache")


@cache_app.command("info")
def cache_info_cmd(params: Path = typer.Option(Path("params.yaml"), "--params"),
                   verify: bool = typer.Option(False, "--verify/--no-verify", help="read every tensor and check its checksum; "
                                                                       "damaged shards are re-encoded next run"),
                   as_json: bool = typer.Option(False, "--json/--no-json")):
    """Entries, shards and bytes per cache store, and how many entries the current index uses."""
    from .cache.info import cache_info, human_bytes
    from .config import ParamsError, load_params, project_root

    try:
        info = cache_info(load_params(params), project_root(params), verify=verify)
    except ParamsError as e:
        _fail(str(e))
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    typer.echo(f"{'store':<12} {'entries':>8} {'shards':>7} {'size':>11} {'indexed':>8} {'unused':>7} {'damaged':>8}"
               "  dtypes")
    for name, row in info.items():
        dtypes = ", ".join(f"{d}:{n}" for d, n in sorted(row["dtypes"].items())) or "-"
        typer.echo(f"{name:<12} {row['entries']:>8} {row['shards']:>7} {human_bytes(row['bytes']):>11} "
                   f"{row['indexed']:>8} {row['not_indexed']:>7} {len(row['damaged']):>8}  {dtypes}")



@cache_app.command("prune")
def cache_prune_cmd(params: Path = typer.Option(Path("params.yaml"), "--params"),
                    dry_run: bool = typer.Option(False, "--dry-run/--no-dry-run",
                                                 help="report what would be removed; remove nothing"),
                    as_json: bool = typer.Option(False, "--json/--no-json")):
    """Remove the cache entries that no store's index.json uses (older datasets, captions, prompts or settings),
    with the bytes they hold; stages up to date before stay up to date in dvc.lock."""
    from .cache.info import human_bytes, prune_unused
    from .config import ParamsError, load_params, project_root

    try:
        with _stderr_console().status("pruning the caches"):
            result = prune_unused(load_params(params), project_root(params), dry_run=dry_run)
    except ParamsError as e:
        _fail(str(e))
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    verb = "would remove" if dry_run else "removed"
    for name, row in result["stores"].items():
        if "skipped" in row:
            typer.echo(f"{name:<14} skipped: {row['skipped']}")
        else:
            typer.echo(f"{name:<14} {verb} {row['entries']} entries, {human_bytes(row['bytes'])}")
    total = sum(row["entries"] for row in result["stores"].values())
    freed = sum(row["bytes"] for row in result["stores"].values())
    typer.echo(f"{'total':<14} {verb} {total} entries, {human_bytes(freed)}"
               + (" (dry run: nothing removed)" if dry_run else ""))
    if result["recorded_stages"]:
        typer.echo(f"dvc.lock: {', '.join(result['recorded_stages'])} recorded again (still up to date)")

def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
