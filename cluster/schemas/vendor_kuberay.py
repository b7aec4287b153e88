"""Vendor KubeRay's CRD schemas for tests/test_cluster_schemas.py.

    python cluster/schemas/vendor_kuberay.py KUBERAY_GIT_DIR v1.5.1 v1.7.0

For each tag: the served v1 `openAPIV3Schema` of the RayCluster, RayJob and RayService CRDs
(ray-operator/config/crd/bases/), without `description` fields (they do not validate anything), as
compact sorted JSON, gzipped without a timestamp, in kuberay-<tag>/<kind>.json.gz. The tag's commit is
printed for README.md.
"""

import gzip
import json
import subprocess
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
CRDS = {"raycluster": "rayclusters", "rayjob": "rayjobs", "rayservice": "rayservices"}


def without_descriptions(node):
    if isinstance(node, dict):
        return {key: without_descriptions(value) for key, value in node.items() if key != "description"}
    if isinstance(node, list):
        return [without_descriptions(value) for value in node]
    return node


def vendor(git_dir: str, tag: str) -> None:
    def git(*args: str) -> str:
        return subprocess.run(["git", f"--git-dir={git_dir}", *args], check=True, capture_output=True, text=True).stdout

    print(tag, git("rev-list", "-n1", tag).strip())
    folder = HERE / f"kuberay-{tag}"
    folder.mkdir(exist_ok=True)
    for kind, plural in CRDS.items():
        crd = yaml.safe_load(git("show", f"{tag}:ray-operator/config/crd/bases/ray.io_{plural}.yaml"))
        (version,) = [version for version in crd["spec"]["versions"] if version["name"] == "v1" and version["served"]]
        schema = without_descriptions(version["schema"]["openAPIV3Schema"])
        text = json.dumps(schema, sort_keys=True, separators=(",", ":"))
        (folder / f"{kind}.json.gz").write_bytes(gzip.compress(text.encode(), compresslevel=9, mtime=0))


if __name__ == "__main__":
    for tag in sys.argv[2:]:
        vendor(sys.argv[1], tag)
