"""cluster/: every file parses, and the fields the package relies on agree with it.

Image and Ray version, the RayJob's entrypoint and job spec, resources per pod against the job's
resources section, autoscaling bounds against the job and the serve defaults, shared storage paths.
"""

import json
import os
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import tomllib
import yaml

from retrikt_ray import serve
from retrikt_ray.cli import app
from retrikt_ray.config import ServeSpec, load_spec

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
SHARED_MOUNT = "/mnt/retrikt"


def documents(name: str) -> dict[str, dict]:
    """A manifest file's documents by kind."""
    return {doc["kind"]: doc for doc in yaml.safe_load_all((CLUSTER / name).read_text())}


def pins(text: str) -> dict[str, str]:
    return dict(re.findall(r"([A-Za-z0-9_.-]+)==([0-9][^\s\"']*)", text))


def version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def constraint(package: str) -> str:
    return pins((ROOT / "constraints-cpu.txt").read_text())[package]


IMAGE = f"retrikt:{version()}"
RAYCLUSTER = documents("raycluster.yaml")["RayCluster"]["spec"]
RAYJOB = documents("rayjob.yaml")
RAYSERVICE = documents("rayservice.yaml")["RayService"]["spec"]
AWS = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
CLUSTER_SPECS = {
    "raycluster": RAYCLUSTER,
    "rayjob": RAYJOB["RayJob"]["spec"]["rayClusterSpec"],
    "rayservice": RAYSERVICE["rayClusterConfig"],
}


def pods(cluster: dict) -> list[dict]:
    return [cluster["headGroupSpec"]["template"]["spec"]] + [
        group["template"]["spec"] for group in cluster["workerGroupSpecs"]
    ]


def container(group: dict) -> dict:
    (only,) = group["template"]["spec"]["containers"]
    return only


def cpus(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def test_every_file_parses():
    assert sorted(path.name for path in CLUSTER.iterdir()) == sorted(
        [
            "README.md",
            "Dockerfile",
            "Dockerfile.dockerignore",
            "aws.yaml",
            "raycluster.yaml",
            "rayjob.yaml",
            "rayservice.yaml",
            "storage.yaml",
        ]
    )
    for name in ("raycluster.yaml", "rayjob.yaml", "rayservice.yaml", "storage.yaml"):
        for doc in yaml.safe_load_all((CLUSTER / name).read_text()):
            assert doc["apiVersion"] in ("ray.io/v1", "v1") and doc["metadata"]["name"]
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(AWS, schema)
    yaml.safe_load(RAYSERVICE["serveConfigV2"])


def test_one_image_everywhere_built_by_the_dockerfile():
    images = [
        container["image"] for spec in CLUSTER_SPECS.values() for pod in pods(spec) for container in pod["containers"]
    ]
    assert set(images) == {IMAGE} and AWS["docker"]["image"] == IMAGE
    assert f"-t {IMAGE} " in (CLUSTER / "Dockerfile").read_text()


def test_ray_torch_and_packaged_models_match_the_cpu_stack():
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    ray_image = re.search(r"^ARG RAY_IMAGE=rayproject/ray:(\S+)-py\d+-gpu$", dockerfile, re.M)
    assert ray_image and ray_image.group(1) == constraint("ray")
    assert {spec["rayVersion"] for spec in CLUSTER_SPECS.values()} == {constraint("ray")}
    installed = pins(dockerfile)
    assert installed["torch"] == constraint("torch")
    setup_models = pins(re.search(r"--no-deps (.*)", (ROOT / "setup.sh").read_text()).group(1))
    assert setup_models and all(installed[name] == pinned for name, pinned in setup_models.items())


def test_rayjob_entrypoint_runs_its_job_spec(tmp_path):
    argv = shlex.split(RAYJOB["RayJob"]["spec"]["entrypoint"])
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert argv[0] in scripts and argv[1] == "run"
    assert "run" in {command.name or command.callback.__name__ for command in app.registered_commands}
    head = RAYJOB["RayJob"]["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    config_maps = {volume["name"]: volume["configMap"]["name"] for volume in head["volumes"] if "configMap" in volume}
    mounts = {mount["name"]: mount["mountPath"] for mount in head["containers"][0]["volumeMounts"]}
    ((volume, config_map),) = config_maps.items()
    assert config_map == RAYJOB["ConfigMap"]["metadata"]["name"]
    folder, key = os.path.split(argv[2])
    assert folder == mounts[volume] and key in RAYJOB["ConfigMap"]["data"]
    (tmp_path / key).write_text(RAYJOB["ConfigMap"]["data"][key])
    spec = load_spec(tmp_path / key)
    assert spec.resources.address == "auto" and spec.resources.use_gpu
    assert spec.storage.runs_dir.startswith(SHARED_MOUNT + "/")


def test_gpu_workers_fit_the_cluster_job_and_scale_within_the_same_bounds(tmp_path):
    (tmp_path / "job.yaml").write_text(RAYJOB["ConfigMap"]["data"]["job.yaml"])
    resources = load_spec(tmp_path / "job.yaml").resources
    for name in ("raycluster", "rayjob"):
        spec = CLUSTER_SPECS[name]
        assert spec["enableInTreeAutoscaling"] and spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
        (gpu,) = spec["workerGroupSpecs"]
        limits = container(gpu)["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) == 1  # use_gpu: one GPU per worker and per teacher replica
        assert cpus(limits["cpu"]) >= max(resources.cpus_per_worker, resources.cpus_per_replica)
        assert gpu["minReplicas"] == 0 and gpu["maxReplicas"] >= max(
            resources.num_workers, resources.generation_replicas
        )
    assert CLUSTER_SPECS["rayjob"]["workerGroupSpecs"] == RAYCLUSTER["workerGroupSpecs"]
    assert (
        container(CLUSTER_SPECS["rayjob"]["headGroupSpec"])["resources"]
        == container(RAYCLUSTER["headGroupSpec"])["resources"]
    )
    aws_gpu = AWS["available_node_types"]["ray.worker.gpu"]
    (gpu,) = RAYCLUSTER["workerGroupSpecs"]
    assert (
        (aws_gpu["min_workers"], aws_gpu["max_workers"])
        == (gpu["minReplicas"], gpu["maxReplicas"])
        == (0, AWS["max_workers"])
    )
    assert AWS["available_node_types"][AWS["head_node_type"]]["resources"] == {"CPU": 0}


def test_rayservice_matches_the_serve_defaults():
    defaults = ServeSpec()
    config = yaml.safe_load(RAYSERVICE["serveConfigV2"])
    assert config["http_options"]["port"] == defaults.port
    (application,) = config["applications"]
    assert application["import_path"] == serve.IMPORT_PATH
    assert application["args"]["run_dir"].startswith(SHARED_MOUNT + "/")
    deployments = {deployment["name"]: deployment for deployment in application["deployments"]}
    ingress, student_store = deployments["Ingress"], deployments["StudentStore"]
    assert ingress["num_replicas"] == 1 and ingress["ray_actor_options"]["num_cpus"] == defaults.ingress_num_cpus
    assert ingress["max_ongoing_requests"] == defaults.max_replicas * defaults.max_ongoing_requests
    assert student_store["autoscaling_config"] == {
        "min_replicas": defaults.min_replicas,
        "max_replicas": defaults.max_replicas,
        "target_ongoing_requests": defaults.target_ongoing_requests,
    }
    assert student_store["max_ongoing_requests"] == defaults.max_ongoing_requests
    assert student_store["ray_actor_options"]["num_cpus"] == defaults.num_cpus
    (workers,) = RAYSERVICE["rayClusterConfig"]["workerGroupSpecs"]
    capacity = workers["maxReplicas"] * cpus(container(workers)["resources"]["limits"]["cpu"])
    assert capacity >= defaults.max_replicas * defaults.num_cpus + defaults.ingress_num_cpus
    for pod in pods(RAYSERVICE["rayClusterConfig"]):
        assert defaults.token_env in {variable["name"] for variable in pod["containers"][0]["env"]}


def test_every_pod_mounts_the_shared_claim_and_aws_nodes_the_shared_folder():
    claim = documents("storage.yaml")["PersistentVolumeClaim"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    for spec in CLUSTER_SPECS.values():
        for pod in pods(spec):
            claims = {
                volume["name"]: volume["persistentVolumeClaim"]["claimName"]
                for volume in pod["volumes"]
                if "persistentVolumeClaim" in volume
            }
            mounts = {mount["name"]: mount["mountPath"] for mount in pod["containers"][0]["volumeMounts"]}
            assert {mounts[name] for name, claim_name in claims.items() if claim_name == claim["metadata"]["name"]} == {
                SHARED_MOUNT
            }
    assert f"--volume {SHARED_MOUNT}:{SHARED_MOUNT}" in AWS["docker"]["run_options"]


@pytest.mark.parametrize("commands", ["head_start_ray_commands", "worker_start_ray_commands"])
def test_aws_nodes_share_the_token(commands):
    assert AWS["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert "RAY_AUTH_MODE=token ray start" in AWS[commands][-1]
    assert all(spec["authOptions"]["mode"] == "token" for spec in CLUSTER_SPECS.values())
