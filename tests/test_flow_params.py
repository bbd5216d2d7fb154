"""The flow's parameters, deployments and launch material: what the Prefect run form shows, how a run's parameters
reach params.yaml (so dvc.lock stays the truth), the two deployments, the Kubernetes pool template, the PyTorchJob
and the multi-GPU `accelerate launch` of the train stage."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import yaml
from helpers import REPO, make_project

from flux2lora.config import ParamsError, load_params


@pytest.fixture(scope="module")
def flow_schema() -> dict:
    """The parameter schema `prefect deploy` stores with the deployment (parameter_openapi_schema)."""
    from prefect.utilities.callables import parameter_schema

    from flows.train import flux2_lora

    return parameter_schema(flux2_lora).model_dump()


def _branch(prop: dict, kind: str) -> dict:
    """The non-null alternative of an optional parameter's schema."""
    return next(option for option in prop.get("anyOf", [prop]) if option.get("type") == kind)


def test_run_form_shows_typed_described_parameters(flow_schema):
    from flux2lora.flavours import FLAVOURS

    props = flow_schema["properties"]
    assert set(_branch(props["flavour"], "string")["enum"]) == set(FLAVOURS)  # a choice, never a free text
    assert _branch(props["steps"], "integer")["minimum"] == 1
    assert _branch(props["learning_rate"], "number")["exclusiveMinimum"] == 0
    assert _branch(props["lora_rank"], "integer")["minimum"] == 1
    assert _branch(props["dataset"], "string")
    assert props["only_if_changed"]["type"] == "boolean" and props["only_if_changed"]["default"] is False
    for name, prop in props.items():
        assert prop.get("description"), f"parameter {name} has no description in the run form"
    assert "train.max_train_steps" in props["steps"]["description"]
    assert flow_schema["required"] == []  # every parameter is optional: params.yaml has the defaults
    # the form's fields are plain (no None/type toggle) and open on params.yaml's values (the repository's here:
    # pytest imports the flow in the repository root, as `prefect deploy` does in a project)
    params = load_params(REPO / "params.yaml")
    for name, value in (("flavour", params.model.model_flavour), ("dataset", params.prepare.instance_data_dir),
                        ("steps", params.train.max_train_steps), ("learning_rate", params.train.learning_rate),
                        ("lora_rank", params.train.lora_rank)):
        assert "anyOf" not in props[name] and props[name]["default"] == value, (name, props[name])
    assert [p for p, _ in sorted(props.items(), key=lambda kv: kv[1]["position"])][:4] == \
        ["flavour", "dataset", "steps", "learning_rate"]


@pytest.fixture
def params_file(tmp_path) -> Path:
    path = tmp_path / "params.yaml"
    shutil.copy2(REPO / "params.yaml", path)
    return path


def test_run_parameters_are_written_into_params_yaml_keeping_its_comments(params_file):
    from tasks.params import write_overrides

    before = params_file.read_text()
    diff = write_overrides(params_file, {"train.max_train_steps": 123, "train.learning_rate": 0.02})
    after = params_file.read_text()
    params = load_params(params_file)
    assert params.train.max_train_steps == 123 and params.train.learning_rate == 0.02
    assert "+  max_train_steps: 123" in diff and "-  learning_rate: 0.01" in diff
    # only the two lines changed: comments, order and `null`s of the file survive
    changed = [line for line in diff.splitlines() if line[:1] in "+-" and not line.startswith(("+++", "---"))]
    assert len(changed) == 4, diff
    comments = [line for line in before.splitlines() if line.lstrip().startswith("#")]
    assert comments and all(line in after.splitlines() for line in comments)
    assert write_overrides(params_file, {"train.max_train_steps": 123}) == ""  # already there: no change


def test_invalid_run_parameters_change_nothing(params_file):
    from tasks.params import write_overrides

    before = params_file.read_bytes()
    with pytest.raises(ParamsError, match="learning_rate"):
        write_overrides(params_file, {"train.learning_rate": -1})
    with pytest.raises(ParamsError, match="did you mean 'train.learning_rate'"):
        write_overrides(params_file, {"train.learnig_rate": 0.1})
    assert params_file.read_bytes() == before


def test_form_defaults_come_from_params_yaml_and_leave_other_projects_alone(tmp_path):
    """The form's defaults are a params.yaml's values (the library's where there is none); a flow parameter equal to
    its default is not written anywhere, so a flow called on another project keeps that project's params.yaml."""
    from flows.train import FORM_DEFAULTS, given_parameters
    from tasks.params import form_defaults, write_overrides

    path = tmp_path / "params.yaml"
    shutil.copy2(REPO / "params.yaml", path)
    write_overrides(path, {"train.max_train_steps": 1234, "model.model_flavour": "tiny-dev",
                           "model.pretrained_model_name_or_path": None})
    assert form_defaults(path) == {"flavour": "tiny-dev", "dataset": "data/demo", "steps": 1234,
                                   "learning_rate": 0.01, "lora_rank": 8}
    assert form_defaults(tmp_path / "missing.yaml") == {"flavour": "klein-9b", "dataset": "", "steps": 1000,
                                                        "learning_rate": 1e-4, "lora_rank": 16}
    assert given_parameters(**FORM_DEFAULTS) == dict.fromkeys(FORM_DEFAULTS)
    changed = dict(FORM_DEFAULTS, steps=FORM_DEFAULTS["steps"] + 1)
    assert given_parameters(**changed) == dict(dict.fromkeys(FORM_DEFAULTS), steps=changed["steps"])


def test_new_flavour_without_base_model_uses_the_flavours_default_repo():
    from flows.train import run_parameters

    raw = {"model": {"model_flavour": "tiny-klein-4b", "pretrained_model_name_or_path": "models/tiny-klein-4b"}}
    assert run_parameters(raw, "klein-9b", None, 100, None, None, None, None) == {
        "model.model_flavour": "klein-9b", "model.pretrained_model_name_or_path": None, "train.max_train_steps": 100}
    assert run_parameters(raw, "dev", None, None, None, None, "/models/flux2-dev", {"train.lora_alpha": 4}) == {
        "model.model_flavour": "dev", "model.pretrained_model_name_or_path": "/models/flux2-dev",
        "train.lora_alpha": 4}
    assert run_parameters(raw, "tiny-klein-4b", None, None, None, None, None, None) == {
        "model.model_flavour": "tiny-klein-4b"}  # same flavour: the model path stays


def test_prefect_yaml_has_the_manual_and_the_nightly_deployment(flow_schema):
    from prefect.cli.deploy._models import PrefectYamlModel
    from prefect.utilities.schema_tools import validate

    config = yaml.safe_load((REPO / "prefect.yaml").read_text())
    model = PrefectYamlModel.model_validate(config)  # what `prefect deploy` parses
    deployments = {d.name: d for d in model.deployments}
    assert set(deployments) == {"train", "nightly"}
    for deployment in deployments.values():
        path, _, function = deployment.entrypoint.partition(":")
        assert (REPO / path).is_file() and function == "flux2_lora"
        assert deployment.work_pool.name == "flux2lora-local"
        assert deployment.concurrency_limit.limit == 1  # runs queue rather than edit params.yaml at once
        validate(deployment.parameters, flow_schema, raise_on_error=True)
    nightly = deployments["nightly"]
    assert nightly.parameters == {"only_if_changed": True}
    (schedule,) = nightly.schedules
    assert schedule.cron == "0 2 * * *" and schedule.timezone == "UTC"
    assert not deployments["train"].schedules


def test_kubernetes_pool_template_requests_a_gpu_on_selected_nodes():
    from prefect.utilities.templating import apply_values, find_placeholders

    template = json.loads((REPO / "infra/k8s/base-job-template.json").read_text())
    variables = template["variables"]["properties"]
    placeholders = {p.name for p in find_placeholders(template["job_configuration"])}
    assert placeholders <= set(variables), f"undeclared: {placeholders - set(variables)}"
    defaults = {name: prop["default"] for name, prop in variables.items() if "default" in prop}
    rendered = apply_values(template["job_configuration"], {**defaults, "gpu_count": 2,
                                                            "node_selector": {"gpu": "h100"}})
    pod = rendered["job_manifest"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert pod["nodeSelector"] == {"gpu": "h100"}
    assert defaults["node_selector"] and defaults["gpu_count"] == 1
    # the cluster's scheduler gives each pod its own GPU: no Prefect GPU limit there
    assert rendered["env"]["FLUX2LORA_GPU_LIMIT"] == ""


def test_trainjob_is_valid_against_kubeflow_trainer_models_and_runs_the_train_stage_under_accelerate():
    """The TrainJob read by Kubeflow's published models (PyPI kubeflow-trainer-api, generated from the Trainer CRDs'
    OpenAPI): strict types, and a round trip that keeps every key (an unknown or misspelt key would be dropped)."""
    from kubeflow_trainer_api.models.trainer_v1alpha1_train_job import TrainerV1alpha1TrainJob

    manifest = yaml.safe_load((REPO / "infra/k8s/trainjob-train.yaml").read_text())
    assert (manifest["apiVersion"], manifest["kind"]) == ("trainer.kubeflow.org/v1alpha1", "TrainJob")
    assert TrainerV1alpha1TrainJob.from_dict(manifest).to_dict() == manifest
    misspelt = yaml.safe_load((REPO / "infra/k8s/trainjob-train.yaml").read_text())
    misspelt["spec"]["trainer"]["numNode"] = misspelt["spec"]["trainer"].pop("numNodes")
    assert TrainerV1alpha1TrainJob.from_dict(misspelt).to_dict() != misspelt  # the check does catch it

    trainer = manifest["spec"]["trainer"]
    command = " ".join(trainer["args"])
    assert "accelerate launch" in command and "-m flux2lora.cli stage train" in command
    for flag in ("--num_machines", "--machine_rank", "--main_process_ip", "--main_process_port"):
        assert flag in command
    assert (REPO / command.split("--config_file ")[1].split()[0]).is_file()
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == trainer["numProcPerNode"]
    assert not any("value" in e and "TOKEN" in e["name"] for e in trainer["env"])  # secrets by reference


def test_accelerate_config_is_valid():
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(REPO / "infra/accelerate/multi-gpu.yaml"))
    assert config.distributed_type.value == "MULTI_GPU" and config.mixed_precision == "no"


def test_accelerate_launch_command_for_several_gpus(tmp_path):
    from tasks.launch import accelerate_command

    shutil.copytree(REPO / "infra", tmp_path / "infra")
    params = load_params(REPO / "params.yaml", overrides={"runtime.num_processes": 4})
    cmd = accelerate_command(tmp_path, params)
    assert cmd[1:3] == ["-m", "accelerate.commands.launch"]
    assert cmd[cmd.index("--config_file") + 1] == str(tmp_path / "infra/accelerate/multi-gpu.yaml")
    assert cmd[cmd.index("--num_processes") + 1] == "4"
    assert cmd[cmd.index("-m", 3):] == ["-m", "flux2lora.cli", "stage", "train", "--params",
                                        str(tmp_path / "params.yaml")]
    no_config = load_params(REPO / "params.yaml", overrides={"runtime.num_processes": 2,
                                                               "runtime.accelerate_config": None})
    assert "--multi_gpu" in accelerate_command(tmp_path, no_config)


def test_accelerate_launch_trains_and_streams_its_output_to_the_log(tmp_path, caplog):
    """The real `accelerate launch` (one process: this machine has no GPU) of the train stage: the stage runs, its
    output reaches the task log line by line, and the summary comes from the files it wrote."""
    from tasks.launch import launch_train

    from flux2lora.stages import run_stage

    project = make_project(tmp_path / "project", git=False, **{"train.max_train_steps": 4})
    shutil.copytree(REPO / "infra", project / "infra")
    for name in ("prepare", "encode-text", "encode-latents"):
        run_stage(name, project / "params.yaml")
    logger = logging.getLogger("test.launch")
    with caplog.at_level(logging.INFO, logger="test.launch"):
        summary = launch_train(project, load_params(project / "params.yaml"), logger)
    # the task logger's records only: the stages run above log too, kept or not by earlier tests' logging setup
    lines = [r.getMessage() for r in caplog.records if r.name == "test.launch"]
    assert lines[0].startswith("launching: ") and "accelerate.commands.launch" in lines[0]
    assert any("LoRA written to" in line for line in lines), lines[-20:]
    assert summary["steps"] == 4 and summary["mlflow_run_id"]
    assert Path(summary["lora_file"]).is_file()


def test_mlflow_system_metrics_follow_psutil_unless_set(monkeypatch):
    from flux2lora.config import RuntimeParams

    monkeypatch.delenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", raising=False)
    assert RuntimeParams().log_system_metrics() is True  # psutil is installed here
    assert RuntimeParams(system_metrics=False).log_system_metrics() is False
    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
    assert RuntimeParams().log_system_metrics() is None  # MLflow's own switch decides
