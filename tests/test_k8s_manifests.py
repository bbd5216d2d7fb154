"""The KubeRay manifests (infra/k8s/raycluster.yaml, rayjob-train.yaml).

KubeRay's CRD schemas are not published on the package index these tests install from, so KubeRay's own fields are
checked here against what flux2lora needs of them (the Ray pin, a GPU worker group, the entrypoint). Every pod
template in them is a plain Kubernetes PodTemplateSpec, and that part is validated against Kubernetes' published
core models (the ones kubeflow-trainer-api ships, generated from Kubernetes' OpenAPI): strict types, and a round
trip that keeps every key (an unknown or misspelt key would be dropped). The TrainJob is validated whole in
tests/test_flow_params.py."""

from __future__ import annotations

import copy
import re

import yaml

from helpers import REPO

K8S = REPO / "infra" / "k8s"


def pod_templates(cluster: dict) -> dict[str, dict]:
    """A RayCluster's pod templates by where they are: the head's and each worker group's."""
    spec = cluster["spec"]
    return {"headGroupSpec": spec["headGroupSpec"]["template"],
            **{f"workerGroupSpecs[{g['groupName']}]": g["template"] for g in spec["workerGroupSpecs"]}}


def test_raycluster_pod_templates_are_valid_kubernetes_and_every_pod_mounts_the_project():
    from kubeflow_trainer_api.models.io_k8s_api_core_v1_pod_template_spec import IoK8sApiCoreV1PodTemplateSpec

    cluster = yaml.safe_load((K8S / "raycluster.yaml").read_text())
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    pin = re.search(r'ray\[[a-z,]+\]==([0-9.]+)', (REPO / "pyproject.toml").read_text()).group(1)
    assert cluster["spec"]["rayVersion"] == pin  # the image's Ray and the cluster's must agree
    templates = pod_templates(cluster)
    assert len(templates) >= 2
    for where, template in templates.items():
        assert IoK8sApiCoreV1PodTemplateSpec.from_dict(template).to_dict() == template, where
        pod = template["spec"]
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]
                  if "persistentVolumeClaim" in v}
        for container in pod["containers"]:
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            # the caches, checkpoints and Ray's run storage: on the volume every node sees
            assert claims[mounts["/project"]] == "flux2lora-project", where
            assert container["workingDir"] == "/project", where
            # credentials by reference only, never a literal value in the manifest
            secrets = [e for e in container["env"] if re.search(r"TOKEN|SECRET|KEY_ID", e["name"])]
            assert secrets and all("valueFrom" in e and "value" not in e for e in secrets), where

    workers = cluster["spec"]["workerGroupSpecs"]
    gpus = [w["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] for w in workers]
    assert all(g >= 1 for g in gpus)  # the training group is a GPU group

    misspelt = copy.deepcopy(templates["headGroupSpec"])
    misspelt["spec"]["containers"][0]["volumeMount"] = misspelt["spec"]["containers"][0].pop("volumeMounts")
    assert IoK8sApiCoreV1PodTemplateSpec.from_dict(misspelt).to_dict() != misspelt  # the check does catch it


def test_rayjob_runs_the_train_stage_on_that_cluster():
    cluster = yaml.safe_load((K8S / "raycluster.yaml").read_text())
    job = yaml.safe_load((K8S / "rayjob-train.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert job["metadata"]["namespace"] == cluster["metadata"]["namespace"]
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    assert job["spec"]["entrypoint"] == "cd /project && flux2lora stage train --params params.yaml"
    assert job["spec"]["shutdownAfterJobFinishes"] is False  # the cluster is shared, not this job's
