"""Import a configuration of the seed trainer (SimpleTuner): the one place that maps its keys onto ours.

`import_simpletuner(DIR, params.yaml)` reads DIR/config.json (or config.toml: the same flat keys, `--` prefixes
optional), the data backends (`data_backend_config`, else DIR/multidatabackend.json) and the validation prompts
(`user_prompt_library`, else DIR/user_prompt_library.json), and writes them into params.yaml:

- keys with the same name in one of our sections (`lora_rank` -> train, `model_flavour` -> model, `resolution` ->
  prepare, ...) go there, after their value is checked against that section's rules;
- renamed keys (`validation_steps` -> validate.validation_step_interval, ...) are listed in RENAMED;
- each image / conditioning backend becomes an entry of `prepare.datasets` (same keys), a text_embeds backend sets
  encode_text.write_batch_size, and `prepare.data_root` becomes the folder holding every dataset;
- the prompt library is copied to `validate.user_prompt_library`.

Every key lands in one of three lists of the returned report: mapped, accepted without effect (flux2lora behaves so
anyway, e.g. `model_type: lora`), or not mapped (with the reason). Nothing is dropped silently. Other sections of
params.yaml, and its comments, are kept; `prepare` is replaced, as the datasets describe it entirely.
"""

from __future__ import annotations

import io
import json
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from .config import PARAMS_FILE, Params, ParamsError, parse_params
from .data.config import DatasetConfig, DatasetOptions

# Seed keys whose flux2lora name differs (or which must go to more than one place).
RENAMED: dict[str, list[str]] = {
    "validation_steps": ["validate.validation_step_interval"],
    "flow_schedule_shift": ["train.timestep_shift"],
    "tracker_project_name": ["tracking.experiment_name"],
    "tracker_run_name": ["tracking.run_name"],
    "hub_model_id": ["publish.hub_repo_id"],
    # the seed's global write_batch_size is used by both of its caches
    "write_batch_size": ["encode_text.write_batch_size", "encode_latents.write_batch_size"],
}

# Seed keys flux2lora accepts without effect, with the value(s) that mean "what flux2lora does anyway".
ACCEPTED_WITHOUT_EFFECT: dict[str, tuple[tuple, str]] = {
    "model_family": (("flux2",), "flux2lora trains FLUX.2 only"),
    "model_type": (("lora",), "flux2lora trains LoRAs only"),
    "lora_type": (("standard",), "flux2lora trains standard (PEFT) LoRAs"),
    "report_to": ((None, "none", "mlflow", "wandb", "tensorboard"), "flux2lora tracks every run in MLflow"),
    "cache_dir_vae": ((), "caches are content-addressed under output_dir (latents/, text_embeds/): DVC outputs"),
    "cache_dir_text": ((), "caches are content-addressed under output_dir (latents/, text_embeds/): DVC outputs"),
    "cache_dir": ((), "caches are content-addressed under output_dir (latents/, text_embeds/): DVC outputs"),
    "hash_filenames": ((), "cache entries are always named by content hash"),
    "push_to_hub": ((False, True), "set by publish.hub_repo_id (hub_model_id)"),
}

# Seed keys flux2lora does not support, with why (used when no section has a field of that name).
NOT_SUPPORTED: dict[str, str] = {
    "output_dir": "flux2lora writes under the project's output_dir, where DVC tracks the stages' outputs",
    "optimizer": "flux2lora trains with torch AdamW (adam_* keys)",
}

# Backend keys that are not dataset options.
BACKEND_ONLY_IGNORED = {
    "default": "one text cache serves every dataset",
    "cache_dir": "the text cache is content-addressed under output_dir/text_embeds (a DVC output)",
    "text_embeds": "one text cache serves every dataset",
    "image_embeds": "latents are content-addressed under output_dir/latents (a DVC output)",
    "hash_filenames": "cache entries are always named by content hash",
    "preserve_data_backend_cache": "prepare remembers each file by path, size and mtime",
    "skip_file_discovery": "prepare remembers each file by path, size and mtime, so discovery is cheap",
}
BACKEND_RENAMED = {"disable": "disabled"}

# Sections a seed config describes: what it does not set there is reset to flux2lora's default on import ...
RESET_SECTIONS = ("model", "encode_text", "encode_latents", "train", "validate")
# ... except the project's own wiring, which a seed config has no word on.
KEEP_ON_IMPORT = {"validate.user_prompt_library", "validate.validation_subject", "model.device"}

SECTION_ORDER = ("model", "train", "validate", "encode_text", "encode_latents", "prepare", "publish", "tracking")
DATASET_SHAPE_KEYS = set(DatasetOptions.model_fields) | {"instance_data_dir"}


@dataclass
class ImportReport:
    """What became of every seed key: mapped (source, target, value), accepted without effect, not mapped."""

    mapped: list[dict] = field(default_factory=list)
    without_effect: list[dict] = field(default_factory=list)
    not_mapped: list[dict] = field(default_factory=list)
    reset: list[dict] = field(default_factory=list)  # keys the seed does not set, put back to flux2lora's default
    notes: list[str] = field(default_factory=list)
    files_written: list[str] = field(default_factory=list)
    params: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"mapped": self.mapped, "accepted_without_effect": self.without_effect, "not_mapped": self.not_mapped,
                "reset_to_default": self.reset, "notes": self.notes, "files_written": self.files_written}


def read_seed_config(folder: Path) -> tuple[dict[str, Any], str]:
    """The flat key -> value config of a seed config folder (config.json or config.toml), `--` prefixes removed."""
    for name in ("config.json", "config.toml"):
        path = folder / name
        if path.is_file():
            try:
                raw = json.loads(path.read_text()) if name.endswith(".json") else tomllib.loads(path.read_text())
            except (ValueError, tomllib.TOMLDecodeError) as e:
                raise ParamsError(f"{path}: cannot be parsed ({e})") from None
            if not isinstance(raw, dict):
                raise ParamsError(f"{path}: expected an object of options")
            return {str(k).lstrip("-"): v for k, v in raw.items()}, name
    raise FileNotFoundError(f"{folder}: no config.json or config.toml (the seed trainer's config folder)")


def _find(folder: Path, given: str | None, default: str) -> Path | None:
    """A file the config names (relative to the config folder or the seed's working folder above it), or the
    default name in the config folder."""
    candidates = []
    if given:
        given_path = Path(given)
        candidates += [given_path] if given_path.is_absolute() else [folder / given_path, folder.parent / given_path,
                                                                     folder.parent.parent / given_path,
                                                                     folder / given_path.name]
    candidates.append(folder / default)
    return next((p for p in candidates if p.is_file()), None)


def _section_fields(section: str) -> dict:
    model = Params.model_fields["validate_" if section == "validate" else section].annotation
    return model.model_fields


def _targets(key: str) -> list[str]:
    """Where a seed key goes: RENAMED, else the one section with a field of that name."""
    if key in RENAMED:
        return RENAMED[key]
    if key in ("output_dir", "datasets", "data_root"):
        return []
    for section in SECTION_ORDER:
        if key in _section_fields(section):
            return [f"{section}.{key}"]
    return []


def _field_problem(model: type[BaseModel], key: str, value: Any, base: dict | None = None) -> str | None:
    """None if `value` is valid for field `key` of `model` (its type, constraints and field validators), else the
    validation message. Rules spanning several keys are checked later, on the whole result."""
    try:
        model.model_validate({**(base or {}), key: value})
    except ValidationError as e:
        problems = [err["msg"] for err in e.errors() if err["loc"] and err["loc"][0] == key]
        return "; ".join(problems) or None
    return None


def _check_value(target: str, value: Any) -> str | None:
    """None if `value` is valid for `target` (section.key) on its own, else the validation message."""
    section, key = target.split(".", 1)
    return _field_problem(Params.model_fields["validate_" if section == "validate" else section].annotation, key,
                          value)


def map_config(config: dict[str, Any], source: str, report: ImportReport) -> dict[str, dict[str, Any]]:
    """Seed trainer options -> {section: {key: value}}; every key is reported."""
    updates: dict[str, dict[str, Any]] = {}
    config = dict(config)
    epochs, steps = config.get("num_train_epochs"), config.get("max_train_steps")
    if epochs and steps:  # the seed trains for max_train_steps when both are set
        config.pop("num_train_epochs")
        report.without_effect.append({"source": f"{source} num_train_epochs", "value": epochs,
                                      "reason": "max_train_steps is set and decides the length, as in the seed"})
    elif epochs:
        config["max_train_steps"] = 0  # flux2lora's marker for "train by epochs"
    for key, value in config.items():
        where = f"{source} {key}"
        if key in ("data_backend_config", "user_prompt_library", "validation_prompt"):
            continue  # read by import_simpletuner itself
        if key in ACCEPTED_WITHOUT_EFFECT:
            values, why = ACCEPTED_WITHOUT_EFFECT[key]
            if not values or value in values or value is False:
                report.without_effect.append({"source": where, "value": value, "reason": why})
                continue
            report.not_mapped.append({"source": where, "value": value, "reason": f"only {values} supported: {why}"})
            continue
        targets = _targets(key)
        if not targets:
            report.not_mapped.append({"source": where, "value": value,
                                      "reason": NOT_SUPPORTED.get(key, "no flux2lora equivalent")})
            continue
        for target in targets:
            problem = _check_value(target, value)
            if problem:
                report.not_mapped.append({"source": where, "value": value, "reason": f"{target}: {problem}"})
                continue
            section, name = target.split(".", 1)
            updates.setdefault(section, {})[name] = value
            report.mapped.append({"source": where, "target": target, "value": value})
    return updates


def map_backends(backends: list[dict], source: str, report: ImportReport,
                 updates: dict[str, dict[str, Any]]) -> list[dict]:
    """Seed data backends -> `prepare.datasets` entries (text_embeds -> encode_text); every key is reported."""
    datasets = []
    for index, backend in enumerate(backends):
        name = backend.get("id", f"#{index}")
        where = f"{source}[{name}]"
        kind = backend.get("dataset_type", "image")
        if backend.get("type", "local") != "local":
            report.not_mapped.append({"source": where, "value": backend.get("type"),
                                      "reason": "only local folders are supported (type: local)"})
            continue
        if kind == "text_embeds":
            for key, value in backend.items():
                if key == "write_batch_size":
                    updates.setdefault("encode_text", {})["write_batch_size"] = value
                    report.mapped.append({"source": f"{where} write_batch_size",
                                          "target": "encode_text.write_batch_size", "value": value})
                elif key in ("id", "type", "dataset_type", "disabled"):
                    continue
                else:
                    reason = BACKEND_ONLY_IGNORED.get(key)
                    target = report.without_effect if reason else report.not_mapped
                    target.append({"source": f"{where} {key}", "value": value,
                                   "reason": reason or "no flux2lora equivalent for a text_embeds backend"})
            continue
        if kind not in ("image", "conditioning"):
            report.not_mapped.append({"source": where, "value": kind,
                                      "reason": "only image, conditioning and text_embeds datasets are supported"})
            continue
        entry: dict[str, Any] = {}
        for key, value in backend.items():
            key = BACKEND_RENAMED.get(key, key)
            if key == "only_instance_prompt":
                if value:
                    entry["caption_strategy"] = "instanceprompt"
                    report.mapped.append({"source": f"{where} only_instance_prompt",
                                          "target": f"prepare.datasets[{name}].caption_strategy",
                                          "value": "instanceprompt"})
                continue
            if key in BACKEND_ONLY_IGNORED:
                report.without_effect.append({"source": f"{where} {key}", "value": value,
                                              "reason": BACKEND_ONLY_IGNORED[key]})
                continue
            if key not in DatasetConfig.model_fields:
                report.not_mapped.append({"source": f"{where} {key}", "value": value,
                                          "reason": "no flux2lora dataset option of that name"})
                continue
            problem = _field_problem(DatasetConfig, key, value, {"id": "x", "instance_data_dir": "x"})
            if problem:
                report.not_mapped.append({"source": f"{where} {key}", "value": value, "reason": problem})
                continue
            entry[key] = value
            if key == "cache_dir_vae":
                report.without_effect.append({"source": f"{where} {key}", "value": value,
                                              "reason": ACCEPTED_WITHOUT_EFFECT["cache_dir_vae"][1]})
            elif key not in ("id", "type", "dataset_type"):
                report.mapped.append({"source": f"{where} {key}", "target": f"prepare.datasets[{name}].{key}",
                                      "value": value})
        try:
            DatasetConfig.model_validate(entry)
        except ValidationError as e:
            report.not_mapped.append({"source": where, "value": None, "reason": "; ".join(
                f"{'.'.join(map(str, err['loc'])) or 'dataset'}: {err['msg']}" for err in e.errors())})
            continue
        datasets.append(entry)
    return datasets


def data_root_for(datasets: list[dict], report: ImportReport) -> str:
    """The deepest folder holding every dataset folder: the one DVC dependency of prepare."""
    folders = [d["instance_data_dir"] for d in datasets if d.get("instance_data_dir")]
    if not folders:
        return "data"
    absolute = {os.path.isabs(f) for f in folders}
    if len(absolute) > 1:
        report.notes.append("datasets mix absolute and relative folders; prepare.data_root must hold all of them: "
                            "move them under one folder")
        return "data"
    common = os.path.commonpath([os.path.normpath(f) for f in folders])
    if common in ("", ".", os.sep):
        report.notes.append(f"the dataset folders {folders} share no folder but {common or '.'}: move them under one "
                            "folder (e.g. data/) and set prepare.data_root to it (it must not contain output_dir)")
    if any(os.path.isabs(f) for f in folders):
        report.notes.append("dataset folders are absolute paths outside the project: DVC tracks them as external "
                            "dependencies; copying them under the project (e.g. data/) makes the project portable")
    return common or "."


def read_prompt_library(path: Path | None, extra: str | None, report: ImportReport) -> dict[str, str]:
    """The seed's prompt library ({shortname: prompt}; entries that are objects give their "prompt"), plus the
    config's single `validation_prompt` if it has one."""
    library = json.loads(path.read_text()) if path else {}
    if not isinstance(library, dict):
        raise ParamsError(f"{path}: expected a JSON object {{shortname: prompt}}")
    prompts = {}
    for name, value in library.items():
        if isinstance(value, dict) and isinstance(value.get("prompt"), str):
            prompts[name] = value["prompt"]
            report.notes.append(f"{path.name} {name}: only its prompt is used")
        elif isinstance(value, str):
            prompts[name] = value
        else:
            report.not_mapped.append({"source": f"{path.name} {name}", "value": value,
                                      "reason": "a prompt must be a string"})
    if extra:
        prompts.setdefault("validation_prompt", extra)
        report.mapped.append({"source": "config validation_prompt", "target": "prompt library 'validation_prompt'",
                              "value": extra})
    return prompts


def _yaml():
    from ruamel.yaml import YAML

    yaml = YAML()  # round-trip: comments and key order of params.yaml survive the import
    yaml.width = 4096
    yaml.indent(mapping=2, sequence=4, offset=2)
    yaml.representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    return yaml


def reset_unset_keys(tree, updates: dict[str, dict[str, Any]], report: ImportReport) -> None:
    """In the sections the seed config describes, keys it does not set go back to flux2lora's defaults (which follow
    the seed's), so the imported run behaves like the seed's rather than like whatever params.yaml held before."""
    for section in RESET_SECTIONS:
        node = tree.get(section)
        if not node:
            continue
        defaults = Params.model_fields["validate_" if section == "validate" else section].annotation().model_dump(
            mode="json")
        for key in list(node):
            if key in updates.get(section, {}) or f"{section}.{key}" in KEEP_ON_IMPORT or key not in defaults:
                continue
            if node[key] != defaults[key]:
                report.reset.append({"target": f"{section}.{key}", "was": node[key], "now": defaults[key]})
                node[key] = defaults[key]


def import_simpletuner(source: Path, params_path: Path = Path(PARAMS_FILE), write: bool = True) -> ImportReport:
    """Map a seed config folder onto `params_path` (written unless write=False) and copy its prompt library.

    Raises FileNotFoundError when the folder has no config, ParamsError when the result would not validate.
    """
    source, params_path = Path(source), Path(params_path)
    report = ImportReport()
    config, config_name = read_seed_config(source)
    updates = map_config(config, config_name, report)

    backends_path = _find(source, config.get("data_backend_config"), "multidatabackend.json")
    datasets = []
    if backends_path is None:
        report.notes.append("no multidatabackend.json found: prepare keeps its single-dataset form")
    else:
        backends = json.loads(backends_path.read_text())
        if not isinstance(backends, list):
            raise ParamsError(f"{backends_path}: expected a JSON list of data backends")
        datasets = map_backends(backends, backends_path.name, report, updates)

    yaml = _yaml()
    tree = yaml.load(params_path.read_text()) if params_path.exists() else None
    if tree is None:
        from ruamel.yaml.comments import CommentedMap

        tree = CommentedMap()
    for section, values in updates.items():
        if section == "prepare":
            continue
        node = tree.setdefault("validate" if section == "validate_" else section, {})
        for key, value in values.items():
            node[key] = value
    reset_unset_keys(tree, updates, report)
    if datasets:
        prepare = {"data_root": data_root_for(datasets, report)}
        kept = tree.get("prepare") or {}
        if "image_extensions" in kept:
            prepare["image_extensions"] = kept["image_extensions"]
        # the seed's global dataset options are the defaults of every dataset, as in the seed
        prepare.update({k: v for k, v in updates.get("prepare", {}).items() if k in DATASET_SHAPE_KEYS
                        and k != "instance_data_dir"})
        prepare["datasets"] = datasets
        tree["prepare"] = prepare
        report.notes.append("prepare was replaced: the seed's data backends describe it entirely")
    elif updates.get("prepare"):
        tree.setdefault("prepare", {}).update(updates["prepare"])

    prompts_path = _find(source, config.get("user_prompt_library"), "user_prompt_library.json")
    library = read_prompt_library(prompts_path, config.get("validation_prompt"), report)
    if prompts_path is None and not config.get("validation_prompt"):
        report.notes.append("no user_prompt_library.json found: the current prompt library is kept")

    buffer = io.StringIO()
    yaml.dump(tree, buffer)
    text = buffer.getvalue()
    import yaml as pyyaml

    parse_params(pyyaml.safe_load(text), source=f"{params_path} (after importing {source})")
    report.params = pyyaml.safe_load(text)
    if write:
        params_path.write_text(text)
        report.files_written.append(str(params_path))
        if library:
            library_path = params_path.parent / (tree.get("validate") or {}).get("user_prompt_library",
                                                                                  "user_prompt_library.json")
            library_path.write_text(json.dumps(library, indent=2, ensure_ascii=False) + "\n")
            report.files_written.append(str(library_path))
    return report
