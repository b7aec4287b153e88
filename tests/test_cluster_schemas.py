"""cluster/ against the schemas that check it when it is applied: KubeRay's CRDs for the RayCluster, RayJob
and RayService (vendored in cluster/schemas/, one folder per KubeRay version), and the installed Ray's
cluster launcher schema for aws.yaml (what `ray up` validates it with).

KubeRay's schemas are Kubernetes structural schemas (OpenAPI v3 with x-kubernetes-* extensions); read as
JSON Schema they would let through what the API server refuses. `as_jsonschema` closes the gaps:
- an unknown field: the API server rejects it (kubectl's default, strict field validation) unless the
  object has x-kubernetes-preserve-unknown-fields; JSON Schema accepts it unless additionalProperties is
  false, so an object with `properties` and no `additionalProperties` gets `additionalProperties: false`;
- x-kubernetes-int-or-string: an integer or a string (controller-gen writes the anyOf too; added if not);
- nullable: null besides the type.
Not checked: x-kubernetes-validations (CEL rules), `format`, and ObjectMeta (`metadata`), which the
API server validates on its own.
"""

import copy
import functools
import gzip
import json
import re
from collections.abc import Callable
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
SCHEMAS = CLUSTER / "schemas"
KINDS = {"RayCluster": "raycluster", "RayJob": "rayjob", "RayService": "rayservice"}
VERSIONS = sorted(path.name.removeprefix("kuberay-") for path in SCHEMAS.glob("kuberay-v*"))


def as_jsonschema(schema: dict) -> dict:
    """A Kubernetes structural schema as the JSON Schema that accepts what the API server accepts."""
    schema = dict(schema)
    for key in ("properties", "patternProperties"):
        if key in schema:
            schema[key] = {name: as_jsonschema(value) for name, value in schema[key].items()}
    for key in ("items", "additionalProperties", "not"):
        if isinstance(schema.get(key), dict):
            schema[key] = as_jsonschema(schema[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in schema:
            schema[key] = [as_jsonschema(value) for value in schema[key]]
    if schema.get("x-kubernetes-int-or-string") and "anyOf" not in schema:
        schema["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if schema.get("nullable") and isinstance(schema.get("type"), str):
        schema["type"] = [schema["type"], "null"]
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        schema["additionalProperties"] = False
    return schema


@functools.cache
def crd_validator(version: str, kind: str) -> jsonschema.Draft4Validator:
    """The validator of one CRD's served v1 schema (OpenAPI v3's schema object is JSON Schema draft 4's)."""
    raw = json.loads(gzip.decompress((SCHEMAS / f"kuberay-{version}" / f"{KINDS[kind]}.json.gz").read_bytes()))
    schema = as_jsonschema(raw)
    jsonschema.Draft4Validator.check_schema(schema)
    return jsonschema.Draft4Validator(schema)


def ray_resources() -> dict[str, dict]:
    """Every KubeRay resource in cluster/, by file name and kind."""
    found = {}
    for path in sorted(CLUSTER.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") in KINDS:
                assert doc["apiVersion"] == "ray.io/v1", path.name
                found[f"{path.name}:{doc['kind']}"] = doc
    return found


RESOURCES = ray_resources()
AWS = yaml.safe_load((CLUSTER / "aws.yaml").read_text())


def errors(version: str, doc: dict) -> list[str]:
    found = crd_validator(version, doc["kind"]).iter_errors(doc)
    return [f"{'.'.join(map(str, error.absolute_path))}: {error.message}" for error in found]


def ray_launcher_schema() -> dict:
    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def test_the_vendored_schemas_are_complete_small_and_say_where_they_come_from():
    assert "v1.5.1" in VERSIONS  # the oldest operator the manifests support (authOptions)
    readme = (SCHEMAS / "README.md").read_text()
    for version in VERSIONS:
        assert sorted(path.name for path in (SCHEMAS / f"kuberay-{version}").iterdir()) == sorted(
            f"{name}.json.gz" for name in KINDS.values()
        )
        assert re.search(rf"`kuberay-{re.escape(version)}/` \| {re.escape(version)}\b.*\| `[0-9a-f]{{40}}` \|", readme)
    assert sum(path.stat().st_size for path in SCHEMAS.glob("kuberay-*/*")) < 300_000
    assert set(doc["kind"] for doc in RESOURCES.values()) == set(KINDS)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("name", sorted(RESOURCES))
def test_every_kuberay_resource_matches_its_crd(version, name):
    assert errors(version, RESOURCES[name]) == []


def test_aws_matches_the_ray_cluster_launcher_schema():
    jsonschema.validate(AWS, ray_launcher_schema())


def raycluster() -> dict:
    return copy.deepcopy(RESOURCES["raycluster.yaml:RayCluster"])


def gpu_worker(doc: dict) -> dict:
    (group,) = doc["spec"]["workerGroupSpecs"]
    return group


def rename(mapping: dict, old: str, new: str) -> None:
    mapping[new] = mapping.pop(old)


def misspelled_spec_field(doc):
    rename(doc["spec"], "enableInTreeAutoscaling", "enableInTreeAutoScaling")


def misspelled_container_field(doc):
    rename(gpu_worker(doc)["template"]["spec"]["containers"][0], "resources", "resource")


def misspelled_pod_security_field(doc):
    rename(gpu_worker(doc)["template"]["spec"]["securityContext"], "fsGroup", "fsgroup")


def replicas_as_a_string(doc):
    gpu_worker(doc)["maxReplicas"] = "4"


def ray_start_param_as_a_number(doc):
    gpu_worker(doc)["rayStartParams"]["num-cpus"] = 7


def cpu_not_a_quantity(doc):
    gpu_worker(doc)["template"]["spec"]["containers"][0]["resources"]["requests"]["cpu"] = "seven"


def memory_as_a_list(doc):
    gpu_worker(doc)["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"] = ["28Gi"]


def unknown_auth_mode(doc):
    doc["spec"]["authOptions"]["mode"] = "password"


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize(
    "break_it",
    [
        misspelled_spec_field,
        misspelled_container_field,
        misspelled_pod_security_field,
        replicas_as_a_string,
        ray_start_param_as_a_number,
        cpu_not_a_quantity,
        memory_as_a_list,
        unknown_auth_mode,
    ],
)
def test_a_broken_raycluster_fails(version, break_it: Callable[[dict], None]):
    doc = raycluster()
    break_it(doc)
    assert errors(version, doc)


def test_unknown_fields_are_caught_by_the_conversion():
    doc = raycluster()
    misspelled_spec_field(doc)
    raw = json.loads(gzip.decompress((SCHEMAS / f"kuberay-{VERSIONS[0]}" / "raycluster.json.gz").read_bytes()))
    assert list(jsonschema.Draft4Validator(raw).iter_errors(doc)) == []  # as JSON Schema reads it
    assert errors(VERSIONS[0], doc)  # as the API server does


@pytest.mark.parametrize("version", VERSIONS)
def test_a_broken_rayjob_and_rayservice_fail(version):
    rayjob = copy.deepcopy(RESOURCES["rayjob.yaml:RayJob"])
    rename(rayjob["spec"], "entrypoint", "entryPoint")
    rayservice = copy.deepcopy(RESOURCES["rayservice.yaml:RayService"])
    rayservice["spec"]["serveConfigV2"] = yaml.safe_load(rayservice["spec"]["serveConfigV2"])  # a string, not a map
    assert errors(version, rayjob) and errors(version, rayservice)


@pytest.mark.parametrize("version", VERSIONS)
def test_quantities_are_integers_or_strings(version):
    doc = raycluster()
    requests = gpu_worker(doc)["template"]["spec"]["containers"][0]["resources"]["requests"]
    requests["cpu"], requests["memory"] = 7, "28672Mi"
    assert errors(version, doc) == []


@pytest.mark.parametrize(
    "break_it",
    [
        lambda aws: rename(aws["docker"], "pull_before_run", "pull_before_runs"),
        lambda aws: aws.update(max_workers="4"),
        lambda aws: aws.update(initialization_command=aws.pop("initialization_commands")),
    ],
    ids=["misspelled docker key", "max_workers as a string", "misspelled top-level key"],
)
def test_a_broken_aws_config_fails(break_it):
    aws = copy.deepcopy(AWS)
    break_it(aws)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(aws, ray_launcher_schema())
