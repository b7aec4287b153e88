"""cluster/: every file parses, and the fields the package relies on agree with it.

Image and Ray version, the RayJob's entrypoint and job spec, resources per pod against the job's
resources section and the GPU node they must fit, autoscaling bounds against the job and the serve
defaults, shared storage paths and their ownership, the run the RayService serves.
tests/test_cluster_schemas.py validates the files against KubeRay's and Ray's schemas.
"""

import os
import re
import shlex
from pathlib import Path

import pytest
import tomllib
import yaml

from retrikt_ray import serve
from retrikt_ray.artifacts import run_location
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


REGISTRY = "YOUR_REGISTRY"  # the placeholder the user replaces with the registry the image is pushed to
LOCAL_IMAGE = f"retrikt:{version()}"  # what cluster/Dockerfile builds
IMAGE = f"{REGISTRY}/{LOCAL_IMAGE}"
# The GPU node a worker pod must fit (g5.2xlarge, aws.yaml's GPU workers), less what the kubelet, the system
# reserve and the DaemonSets take of it.
GPU_NODE_CPUS, GPU_NODE_MEMORY_GI = 8, 32
SYSTEM_CPUS, SYSTEM_MEMORY_GI = 1, 2
RAY_UID, RAY_GID = 1000, 100  # the Ray image's user, ray:users
RAYCLUSTER = documents("raycluster.yaml")["RayCluster"]["spec"]
RAYJOB = documents("rayjob.yaml")
RAYSERVICE = documents("rayservice.yaml")["RayService"]["spec"]
AWS = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
CLUSTER_SPECS = {
    "raycluster": RAYCLUSTER,
    "rayjob": RAYJOB["RayJob"]["spec"]["rayClusterSpec"],
    "rayservice": RAYSERVICE["rayClusterConfig"],
}


def job_spec(tmp_path: Path):
    (tmp_path / "job.yaml").write_text(RAYJOB["ConfigMap"]["data"]["job.yaml"])
    return load_spec(tmp_path / "job.yaml")


def pods(cluster: dict) -> list[dict]:
    return [cluster["headGroupSpec"]["template"]["spec"]] + [
        group["template"]["spec"] for group in cluster["workerGroupSpecs"]
    ]


def container(group: dict) -> dict:
    (only,) = group["template"]["spec"]["containers"]
    return only


def cpus(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def gibibytes(quantity: str) -> float:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    number, unit = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(quantity)).groups()
    return float(number) * units.get(unit, 1) / 2**30


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
            "schemas",
            "storage.yaml",
        ]
    )
    for name in ("raycluster.yaml", "rayjob.yaml", "rayservice.yaml", "storage.yaml"):
        for doc in yaml.safe_load_all((CLUSTER / name).read_text()):
            assert doc["apiVersion"] in ("ray.io/v1", "v1") and doc["metadata"]["name"]
    yaml.safe_load(RAYSERVICE["serveConfigV2"])


def test_one_image_everywhere_built_by_the_dockerfile_with_the_registry_a_placeholder():
    images = [
        container["image"]
        for spec in CLUSTER_SPECS.values()
        for pod in pods(spec)
        for container in pod["containers"] + pod.get("initContainers", [])
    ]
    assert set(images) == {IMAGE} and AWS["docker"]["image"] == IMAGE
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert f"-t {LOCAL_IMAGE} " in dockerfile and f"docker push {IMAGE}" in dockerfile
    # No name without the registry in the YAML, comments included: nothing there pulls a local tag.
    for path in CLUSTER.glob("*.yaml"):
        assert set(re.findall(r"(\S*)retrikt:[0-9]", path.read_text())) <= {f"{REGISTRY}/"}, path.name
    # ray up pulls it on every host: aws.yaml carries the (commented) registry login, before the pull.
    assert re.search(r"^  # - aws ecr get-login-password .*\| docker login ", (CLUSTER / "aws.yaml").read_text(), re.M)


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


def test_gpu_workers_fit_the_node_the_cluster_job_and_scale_within_the_same_bounds(tmp_path):
    resources = job_spec(tmp_path).resources
    for name in ("raycluster", "rayjob"):
        spec = CLUSTER_SPECS[name]
        assert spec["enableInTreeAutoscaling"] and spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
        (gpu,) = spec["workerGroupSpecs"]
        requests, limits = container(gpu)["resources"]["requests"], container(gpu)["resources"]["limits"]
        # A pod asking for the whole 8-vCPU / 32 GiB node stays Pending: the node's allocatable is less.
        assert requests == limits  # Guaranteed QoS, and what KubeRay advertises is what the pod got
        assert cpus(requests["cpu"]) <= GPU_NODE_CPUS - SYSTEM_CPUS
        assert gibibytes(requests["memory"]) <= GPU_NODE_MEMORY_GI - SYSTEM_MEMORY_GI
        assert cpus(gpu["rayStartParams"]["num-cpus"]) == cpus(requests["cpu"])  # Ray schedules what the pod has
        assert int(limits["nvidia.com/gpu"]) == 1  # use_gpu: one GPU per worker and per teacher replica
        assert cpus(gpu["rayStartParams"]["num-cpus"]) >= max(resources.cpus_per_worker, resources.cpus_per_replica)
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


def test_rayservice_serves_the_run_the_rayjob_writes(tmp_path):
    (application,) = yaml.safe_load(RAYSERVICE["serveConfigV2"])["applications"]
    expected = run_location(job_spec(tmp_path))
    assert application["args"]["run_dir"] == expected, (
        f"rayjob.yaml's run directory is now {expected}: put it in rayservice.yaml's args.run_dir, "
        "rayjob.yaml's header and cluster/README.md"
    )
    assert expected in (CLUSTER / "rayjob.yaml").read_text() and expected in (CLUSTER / "README.md").read_text()


def test_every_pod_mounts_the_shared_claim_writable_by_the_image_user_and_aws_nodes_the_shared_folder(tmp_path):
    claim = documents("storage.yaml")["PersistentVolumeClaim"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert claim["spec"]["storageClassName"]  # the clouds' defaults are ReadWriteOnce: the user must check it
    runs_dir = job_spec(tmp_path).storage.runs_dir
    for spec in CLUSTER_SPECS.values():
        for pod in pods(spec):
            claims = {
                volume["name"]: volume["persistentVolumeClaim"]["claimName"]
                for volume in pod["volumes"]
                if "persistentVolumeClaim" in volume
            }
            (shared,) = [name for name, claim_name in claims.items() if claim_name == claim["metadata"]["name"]]
            mounts = {mount["name"]: mount["mountPath"] for mount in pod["containers"][0]["volumeMounts"]}
            assert mounts[shared] == SHARED_MOUNT
            # The image runs as uid 1000; a new share's root is root's. fsGroup where the driver applies it,
            # and an init container, as root, that gives the runs folder to uid 1000 and checks it can write.
            assert pod["securityContext"]["fsGroup"] == RAY_UID
            (init,) = pod["initContainers"]
            assert init["securityContext"]["runAsUser"] == 0
            assert {mount["mountPath"] for mount in init["volumeMounts"] if mount["name"] == shared} == {SHARED_MOUNT}
            script = init["command"][-1]
            assert f"chown {RAY_UID}:{RAY_GID} {runs_dir}" in script
            assert f"--reuid={RAY_UID} --regid={RAY_GID}" in script and f"test -w {runs_dir}" in script
    assert f"--volume {SHARED_MOUNT}:{SHARED_MOUNT}" in AWS["docker"]["run_options"]
    assert f"sudo chown {RAY_UID}:{RAY_GID} {runs_dir}" in AWS["initialization_commands"][-1]


@pytest.mark.parametrize("commands", ["head_start_ray_commands", "worker_start_ray_commands"])
def test_aws_nodes_share_the_token(commands):
    assert AWS["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert "RAY_AUTH_MODE=token ray start" in AWS[commands][-1]
    assert all(spec["authOptions"]["mode"] == "token" for spec in CLUSTER_SPECS.values())
