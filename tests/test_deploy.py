"""deploy/ validated offline: the cluster launcher YAML by Ray's own prepare_config and
validate_config, the Kubernetes manifests by kubernetes-validate --strict (the RayJob against
deploy/kuberay/schema.json, its pod templates as Kubernetes PodTemplates), and the same
entrypoint in every example (tests/test_jobs.py runs it against a real head)."""

from __future__ import annotations

import copy
import json
import re
import shlex
import subprocess

import jsonschema
import kubernetes_validate
import pytest
import yaml

from condense.config import load_config
from tests.conftest import REPO

DEPLOY = REPO / "deploy"
# The config and the run directory come from the job's runtime env (CONDENSE_CONFIG,
# CONDENSE_RUN_DIR): `ray job submit` quotes its arguments, so no `$VARIABLE` could expand.
ENTRYPOINT = "python jobs/condense.py"
K8S = kubernetes_validate.latest_version()


def manifests() -> list[dict]:
    docs = []
    for path in sorted((DEPLOY / "kuberay").glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def rayjob() -> dict:
    return next(d for d in manifests() if d["kind"] == "RayJob")


def launcher() -> dict:
    return yaml.safe_load((DEPLOY / "cluster-launcher" / "aws.yaml").read_text())


def pod_templates(job: dict) -> list[dict]:
    cluster = job["spec"]["rayClusterSpec"]
    templates = [job["spec"]["submitterPodTemplate"], cluster["headGroupSpec"]["template"]]
    return templates + [g["template"] for g in cluster["workerGroupSpecs"]]


def check_pod_template(template: dict) -> None:
    kubernetes_validate.validate(
        {
            "apiVersion": "v1",
            "kind": "PodTemplate",
            "metadata": {"name": "t"},
            "template": template,
        },
        K8S,
        strict=True,
    )


def check_rayjob(job: dict) -> None:
    jsonschema.validate(job, json.loads((DEPLOY / "kuberay" / "schema.json").read_text()))
    for template in pod_templates(job):
        check_pod_template(template)


def test_launcher_yaml_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = launcher()
    validate_config(prepare_config(copy.deepcopy(config)))
    assert set(config["available_node_types"]) == {"head", "gpu", "cpu"}
    misspelt = copy.deepcopy(config)
    misspelt["available_node_types"]["gpu"]["max_workrs"] = 8
    with pytest.raises(jsonschema.ValidationError, match="max_workrs"):
        validate_config(prepare_config(misspelt))


def test_kubernetes_manifests_validate_strictly():
    kinds = []
    for doc in manifests():
        kinds.append(doc["kind"])
        if doc["kind"] == "RayJob":
            check_rayjob(doc)
        else:  # a kind Kubernetes knows
            kubernetes_validate.validate(doc, K8S, strict=True)
    assert sorted(kinds) == ["RayJob", "Secret"]


def test_a_misspelt_field_fails_the_rayjob_checks():
    job = rayjob()
    wrong = copy.deepcopy(job)
    wrong["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replica"] = 2
    with pytest.raises(jsonschema.ValidationError, match="replica"):
        check_rayjob(wrong)
    wrong = copy.deepcopy(job)
    wrong["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0][
        "envfrom"
    ] = []
    with pytest.raises(kubernetes_validate.ValidationError, match="envfrom"):
        check_rayjob(wrong)


def test_the_rayjob_runs_the_laion_recipe_with_gpu_and_cpu_groups():
    job = rayjob()
    env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]
    assert env["CONDENSE_CONFIG"] == "configs/laion2b.yaml"
    assert env["CONDENSE_RUN_DIR"].startswith("s3://")
    config = load_config(REPO / env["CONDENSE_CONFIG"])
    assert config.cluster.k == 100_000 and config.sample.n == 2_000_000
    groups = {g["groupName"]: g for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]}
    gpu = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpu["nvidia.com/gpu"] == "8"
    assert "nvidia.com/gpu" not in groups["cpu"]["template"]["spec"]["containers"][0]["resources"]
    # Credentials reach every pod from one Secret, never from the manifest itself.
    for template in pod_templates(job)[1:]:
        (container,) = template["spec"]["containers"]
        assert container["envFrom"] == [{"secretRef": {"name": "condense-object-store"}}]
    assert "AWS_SECRET_ACCESS_KEY" not in json.dumps(job)


def test_every_example_runs_the_same_entrypoint():
    assert rayjob()["spec"]["entrypoint"] == ENTRYPOINT
    for path in (DEPLOY / "cluster-launcher" / "aws.yaml", DEPLOY / "slurm" / "condense.sbatch"):
        submitted = re.findall(r" -- (python jobs/condense\.py.*)$", path.read_text(), flags=re.M)
        assert [" ".join(shlex.split(line)) for line in submitted] == [ENTRYPOINT], path


def test_the_slurm_script_parses():
    script = DEPLOY / "slurm" / "condense.sbatch"
    subprocess.run(["bash", "-n", str(script)], check=True)
    assert "#SBATCH --gpus-per-node=8" in script.read_text()
